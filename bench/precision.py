"""The quality bound of each precision, measured on real sections with the evaluate pipeline.

    python bench/precision.py [SECTION_DIR ...] [--checkpoint CKPT] [--device cpu]
                              [--runs torch:fp32,torch:bf16,aoti:bf16,onnxruntime:int8]
                              [--batch-size 64] [--mates-batch-size 23] [--json out.json]

Default: the default shipped model on the four her2st sections (../shared/data/her2st/C2..C5). Each
section goes through what `m2ort-fast evaluate` does (the same patch cache, targets and
:func:`m2ort_fast.metrics.summarize`), once per backend:precision; the first run (torch:fp32) is
the reference. Per section and run it prints the predictions' max and mean abs difference from
the reference (log1p-CPM units) and how far each evaluate metric moved from the reference's:
PCC per spot, PCC per gene, RMSE (per spot), and, beside them, MAE and PCC per gene over the top
50. A run holds the bound when, on every section, PCC per spot, PCC per gene and RMSE each moved
by at most ``QUALITY_BOUND`` (0.005; m2ort_fast.precision).

"batch-mates": each run predicts every section a second time, in reverse spot order at
``--mates-batch-size`` spots a batch, and the column is the largest move of any spot's prediction
between the two passes (log1p-CPM): how much a spot's prediction depends on the other spots of its
batch. ``--precision auto`` only picks precisions whose move is the precision's rounding (not int8:
its activation scales are per batch; m2ort_fast.precision.BATCH_DEPENDENT).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from m2ort_fast import metrics as M
from m2ort_fast.backends import make_backend
from m2ort_fast.checkpoint import load_checkpoint
from m2ort_fast.device import resolve_device
from m2ort_fast.evaluate import predict_levels, section_patches, section_targets
from m2ort_fast.patch_cache import PatchCache
from m2ort_fast.precision import QUALITY_BOUND
from m2ort_fast.predict import DEFAULT_MODEL, checkpoint_path

HER2ST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "her2st"
DEFAULT_SECTIONS = [str(HER2ST / name) for name in ("C2", "C3", "C4", "C5")]
DEFAULT_RUNS = "torch:fp32,torch:bf16,aoti:bf16,onnxruntime:int8"
# metric key in metrics.summarize -> column label; the first three are the bound's
BOUND_METRICS = {"pcc_spot_mean": "PCC/spot", "pcc_gene_mean": "PCC/gene", "rmse_spot_mean": "RMSE"}
OTHER_METRICS = {"mae": "MAE", f"pcc_gene_top{M.TOP_GENES}_mean": f"PCC/gene top{M.TOP_GENES}"}


class AsModel:
    """A backend where evaluate.predict_levels expects a model (it calls .eval() and the model)."""

    def __init__(self, backend):
        self.backend = backend

    def eval(self):
        return self

    def __call__(self, *levels):
        return self.backend(*levels)


def deviation(pred: np.ndarray, ref: np.ndarray, true: np.ndarray, ref_metrics: dict) -> dict:
    """How ``pred`` differs from the reference ``ref``: abs differences and each metric's move."""
    got = M.summarize(pred, true)
    out = {"max_abs": float(np.abs(pred - ref).max()), "mean_abs": float(np.abs(pred - ref).mean())}
    for key in (*BOUND_METRICS, *OTHER_METRICS):
        out[f"d_{key}"] = got[key] - ref_metrics[key]
        out[key] = got[key]
    out["holds"] = all(abs(out[f"d_{key}"]) <= QUALITY_BOUND for key in BOUND_METRICS)
    return out


def batch_mates_move(backend, card, levels: list[np.ndarray], mates: int, preds: np.ndarray) -> float:
    """Largest move of a spot's prediction when predicted in reverse order at ``mates`` a batch."""
    backwards = predict_levels(backend, card, [np.ascontiguousarray(x[::-1]) for x in levels], batch_size=mates)
    return float(np.abs(backwards[::-1] - preds).max())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sections", nargs="*", default=DEFAULT_SECTIONS)
    parser.add_argument("--checkpoint", default=DEFAULT_MODEL, help="a checkpoint or shipped model's name")
    parser.add_argument(
        "--runs", default=DEFAULT_RUNS, help="comma-separated backend:precision; the first is the reference"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--mates-batch-size", type=int, default=23, help="the batch-mates pass's batch size")
    parser.add_argument("--cache-dir", default=None, help="artifact cache (default: $M2ORT_FAST_CACHE or ~/.cache)")
    parser.add_argument("--patch-cache", default=None, help="patch cache (default: evaluate's)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    args.checkpoint = str(checkpoint_path(args.checkpoint))

    device = resolve_device(args.device)
    runs = [tuple(run.split(":")) for run in args.runs.split(",")]
    _, card = load_checkpoint(args.checkpoint)
    backends = {}
    for name, precision in runs:
        model, _ = load_checkpoint(args.checkpoint)  # each backend its own copy: some cast it in place
        options = {"precision": precision, "checkpoint_path": args.checkpoint}
        if name not in ("torch", "triton"):
            options["cache_dir"] = args.cache_dir
        backends[(name, precision)] = AsModel(make_backend(name, model, card, device=device, **options))
    device_label = f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"# {Path(args.checkpoint).name} ({card.variant}), reference {':'.join(runs[0])}, device {device_label}")

    from m2ort_fast.datasets import read_sample

    cache = PatchCache(args.patch_cache)
    rows = []
    for folder in args.sections:
        sample = read_sample(folder)
        targets = section_targets(sample, card.genes)
        keep = np.flatnonzero(targets.keep)
        levels = [np.asarray(level[keep]) for level in section_patches(sample, card, cache, card.level_source)]
        preds = {run: predict_levels(b, card, levels, batch_size=args.batch_size) for run, b in backends.items()}
        n_mates = args.mates_batch_size
        mates = {run: batch_mates_move(b, card, levels, n_mates, preds[run]) for run, b in backends.items()}
        ref = preds[runs[0]]
        ref_metrics = M.summarize(ref, targets.values)
        first = {"section": sample.name, "run": ":".join(runs[0]), "reference": True, "mates": mates[runs[0]]}
        rows.append({**first, **ref_metrics})
        for run in runs[1:]:
            rows.append(
                {
                    "section": sample.name,
                    "run": ":".join(run),
                    "mates": mates[run],
                    **deviation(preds[run], ref, targets.values, ref_metrics),
                }
            )

    labels = {**BOUND_METRICS, **OTHER_METRICS}
    print(
        "| section | backend:precision | max abs | mean abs | "
        + " | ".join(f"d {v}" for v in labels.values())
        + " | holds | batch-mates |"
    )
    print("|---|---|---:|---:|" + "---:|" * len(labels) + "---|---:|")
    for r in rows:
        if r.get("reference"):
            print(
                f"| {r['section']} | {r['run']} (reference) | - | - | "
                + " | ".join(f"{r[k]:.4f}" for k in labels)
                + f" | - | {r['mates']:.2g} |"
            )
            continue
        print(
            f"| {r['section']} | {r['run']} | {r['max_abs']:.4f} | {r['mean_abs']:.5f} | "
            + " | ".join(f"{r['d_' + k]:+.5f}" for k in labels)
            + f" | {'yes' if r['holds'] else 'NO'} | {r['mates']:.2g} |"
        )
    verdict = {}
    for run in runs[1:]:
        label = ":".join(run)
        mine = [r for r in rows if r["run"] == label and not r.get("reference")]
        worst = {k: max(abs(r[f"d_{k}"]) for r in mine) for k in BOUND_METRICS}
        verdict[label] = {
            "holds": all(r["holds"] for r in mine),
            "worst_abs_move": worst,
            "max_abs": max(r["max_abs"] for r in mine),
            "mean_abs": float(np.mean([r["mean_abs"] for r in mine])),
            "batch_mates_max_abs": max(r["mates"] for r in mine),
        }
        moves = ", ".join(f"{BOUND_METRICS[k]} {v:.5f}" for k, v in worst.items())
        holds = "holds" if verdict[label]["holds"] else "does NOT hold"
        mates = verdict[label]["batch_mates_max_abs"]
        print(f"# {label}: {holds} the {QUALITY_BOUND} bound (worst moves: {moves}); batch-mates move {mates:.2g}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_label, "rows": rows, "verdict": verdict}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
