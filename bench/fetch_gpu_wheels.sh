#!/usr/bin/env bash
# Download, here (where PyPI is reachable), the wheels the GPU machine's image lacks, for its
# Python 3.12, into .whl/ (ignored by git; carried to the device with carry=[".whl"]).
# The image has torch, triton, numpy, scipy, pandas, h5py, pillow, matplotlib, tqdm, safetensors,
# onnx, onnxruntime, pybind11, cmake, ninja, setuptools, click, lazy-loader, fsspec (KINDS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info; grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
wheels=(
  cucim-cu13==26.10.0 nvtx==0.2.17
  anndata==0.12.19 scverse-misc==0.0.3 array-api-compat==1.16.0 legacy-api-wrap==1.5 natsort==8.4.0
  zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c
  tiffslide==3.0.1 imagecodecs==2026.3.6 tifffile==2026.3.3
  openslide-python==1.4.7 openslide-bin==4.0.1.2
)
for wheel in "${wheels[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64 \
    -d .whl "$wheel"
done
du -sh .whl
