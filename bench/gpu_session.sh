#!/usr/bin/env bash
# Everything to do on a lent GPU machine, in one call: install the carried wheels, build the
# extension, run the test suite (the GPU tests included), run every benchmark. Results go to $OUT.
#
# Here, once per session (PyPI and ../shared are reachable from here, not from there):
#     bash bench/fetch_gpu_wheels.sh                      # .whl/: cuCIM, anndata, nvtx, readers (~57 MB)
# The wheels and the repo fill most of the 64 MiB a call carries, so ../shared/data does not travel:
# tests that need it skip there (they run in CI), and bench/slide.py measures the demo slide (a
# real C3 crop) at a dense 27.5 um grid. Then, with the device tool:
#     run(command="bash bench/gpu_session.sh tests", carry=[".whl"], timeout_s=600)
#     run(command="bash bench/gpu_session.sh bench", carry=[".whl"], timeout_s=600)
# ("all" does both in one call when they fit in 10 minutes.)
set -uo pipefail
cd "$(dirname "$0")/.."
what="${1:-all}"
OUT="${OUT:-/tmp/m2ort-gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 M2ORT_FAST_CACHE=/tmp/m2ort-cache

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "gpu_session: carried wheels did not install"; exit 1; }
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1 \
  || { tail -30 "$OUT/build.log"; exit 1; }
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} | tee "$OUT/device.txt"

if [[ "$what" == tests || "$what" == all ]]; then
  # GPU tests first (Triton fp16/bf16, TensorRT where it imports, cuCIM on the GPU), then the rest.
  python3 -m pytest -q -rs -m gpu tests 2>&1 | tee "$OUT/tests_gpu.log" | tail -40
  python3 -m pytest -q -rs -m "not gpu" -x tests 2>&1 | tee "$OUT/tests_rest.log" | tail -15
fi

if [[ "$what" == bench || "$what" == all ]]; then
  python3 bench/kernels.py --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.txt"
  # the host path's CPU kernels on the lent machine's CPU (seconds)
  python3 bench/core_kernels.py --json "$OUT/core_kernels.json" 2>&1 | tee "$OUT/core_kernels.txt"
  if [[ -f bench/backends.py ]]; then
    python3 bench/backends.py --json "$OUT/backends.json" 2>&1 | tee "$OUT/backends.txt"
  fi
  # naive, host and device data paths side by side, the model alone and decoding the tiles alone
  python3 bench/slide.py --slide m2ort_fast/assets/demo_slide.tiff --spacing-um 27.5 --level-source pyramid --reader cucim --device cuda \
    --json "$OUT/slide.json" 2>&1 | tail -20 | tee "$OUT/slide.txt"
  python3 bench/slide.py --slide m2ort_fast/assets/demo_slide.tiff --spacing-um 27.5 --reader cucim --device cuda \
    --json "$OUT/slide_resize.json" 2>&1 | tail -20 | tee "$OUT/slide_resize.txt"
  # the default model (M2ORT over EfficientNet-Lite0's stride-8 stage): bf16 against fp32 eager
  python3 bench/slide.py --slide m2ort_fast/assets/demo_slide.tiff --spacing-um 27.5 --reader cucim --device cuda \
    --checkpoint m2ort-her2st-tiny-efficientnet-lite0-s8 --precision bf16 --baseline torch:fp32 \
    --json "$OUT/slide_encoder.json" 2>&1 | tail -20 | tee "$OUT/slide_encoder.txt"
  for path in host device; do
    m2ort-fast predict --quiet --overwrite --device cuda --data-path "$path" --profile "$OUT/profile_demo_$path.json" \
      --out "/tmp/m2ort-demo-$path" 2>&1 | tail -5
  done
  if command -v nsys > /dev/null; then  # a timeline of the device path: decode, upload, assemble, model, d2h overlapping
    nsys profile --trace=cuda,nvtx --force-overwrite=true -o "$OUT/device_path_timeline" \
      m2ort-fast predict m2ort_fast/assets/demo_slide.tiff --quiet --overwrite --device cuda --data-path device --spacing-um 27.5 --out /tmp/m2ort-nsys 2>&1 | tail -5
  else
    echo "gpu_session: no nsys on this machine: no timeline" | tee "$OUT/nsys.txt"
  fi
fi
