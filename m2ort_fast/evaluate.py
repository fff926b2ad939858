"""`m2ort-fast evaluate`: a checkpoint against measured expression of held-out sections.

    m2ort-fast evaluate --checkpoint model.safetensors SECTION_DIR [SECTION_DIR ...] [--out DIR]

Everything about the model comes from the checkpoint: its working resolution (the section's
pixel size comes from its own files, e.g. the spot table's pitch), its gene panel, its pixel
normalisation. Measured counts are put on the model's scale with the checkpoint's panel (log1p
CPM of the panel total; panel genes the section lacks count as 0 and are reported). Per section
it writes ``<name>.json`` (metrics of the model and of the mean baseline), ``<name>_genes.csv``
(per-gene table) and ``<name>_best_genes.png`` (measured vs predicted maps); ``report.json``
gathers all sections. Metrics: see :mod:`m2ort_fast.metrics`.

The mean baseline predicts, for every spot, the mean expression of the training spots; it is
stored in the checkpoint's provenance (``train_mean_expression``) by ``m2ort-fast train``, or
computed from ``--baseline-sections``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import metrics as M
from .backends import resolve_device
from .checkpoint import ModelCard
from .errors import M2ORTError
from .predict import normalize_levels
from .targets import expression_targets

log = logging.getLogger(__name__)

PLOT_GENES = 4


@torch.no_grad()
def predict_levels(model, card: ModelCard, levels: list[np.ndarray], *, batch_size: int = 64,
                   device: torch.device | str = "cpu", progress: bool = False, desc: str = "predict") -> np.ndarray:
    """Model predictions (N, G) float32 for uint8 patches (N, S, S, 3) of the three levels."""
    device = torch.device(device)
    model.eval()
    n = len(levels[0])
    out = np.empty((n, len(card.genes)), dtype=np.float32)
    starts = range(0, n, batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=desc, unit="batch", leave=False)
    for start in starts:
        rows = slice(start, min(n, start + batch_size))
        inputs = [x.to(device) for x in normalize_levels(levels, card, rows)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pred = model(*inputs)
        out[rows] = pred.float().cpu().numpy()
    return out


def section_targets(sample, genes: list[str]):
    """Measured values on the model's scale and which spots count: see targets.expression_targets."""
    return expression_targets(sample.counts, sample.genes, genes)


def section_patches(sample, card: ModelCard, cache, level_source: str, progress: bool = False) -> list[np.ndarray]:
    return cache.patches(sample.slide_path, sample.centers_px, card.level_mpp, slide_mpp=sample.mpp,
                         mpp_source=sample.mpp_source, sizes_px=card.patch_sizes_px, level_source=level_source,
                         progress=progress)


def per_gene_table(pred: np.ndarray, true: np.ndarray, baseline: np.ndarray | None, genes: list[str],
                   missing: list[str]) -> pd.DataFrame:
    """One row per panel gene: its PCC across spots (model), RMSE, means; sorted by PCC."""
    table = pd.DataFrame({
        "gene": genes,
        "pcc": M.pcc_per_gene(pred, true) if len(pred) >= 2 else np.nan,
        "rmse": np.sqrt(((pred - true) ** 2).mean(axis=0)),
        "mae": np.abs(pred - true).mean(axis=0),
        "measured_mean": true.mean(axis=0),
        "predicted_mean": pred.mean(axis=0),
        "measured_std": true.std(axis=0),
        "predicted_std": pred.std(axis=0),
        "missing_in_section": [g in set(missing) for g in genes],
    })
    if baseline is not None:
        table["baseline_rmse"] = np.sqrt(((baseline[None, :] - true) ** 2).mean(axis=0))
    table = table.sort_values("pcc", ascending=False, na_position="last", kind="stable")
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    return table


def plot_best_genes(path: Path, centers_px: np.ndarray, pred: np.ndarray, true: np.ndarray, genes: list[str],
                    table: pd.DataFrame, title: str, count: int = PLOT_GENES) -> None:
    """Measured (top row) vs predicted (bottom row) maps of the ``count`` best-predicted genes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = [g for g in table["gene"] if np.isfinite(table.set_index("gene").loc[g, "pcc"])][:count]
    if not best:
        return
    index = {g: i for i, g in enumerate(genes)}
    fig, axes = plt.subplots(2, len(best), figsize=(3.2 * len(best), 6.4), squeeze=False)
    x, y = centers_px[:, 0], centers_px[:, 1]
    for col, gene in enumerate(best):
        j = index[gene]
        lo = float(min(true[:, j].min(), pred[:, j].min()))
        hi = float(max(true[:, j].max(), pred[:, j].max()))
        pcc = table.set_index("gene").loc[gene, "pcc"]
        for row, (values, label) in enumerate(((true[:, j], "measured"), (pred[:, j], "predicted"))):
            ax = axes[row, col]
            points = ax.scatter(x, y, c=values, s=18, cmap="viridis", vmin=lo, vmax=hi, marker="s")
            ax.set_aspect("equal")
            ax.invert_yaxis()
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{gene} {label}" + (f"\nPCC {pcc:.2f}" if row == 0 else ""), fontsize=9)
            fig.colorbar(points, ax=ax, fraction=0.046, pad=0.02)
    fig.suptitle(f"{title}: log1p CPM, best-predicted genes", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.partial.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def mean_baseline(card: ModelCard, baseline_sections=None) -> tuple[np.ndarray | None, str]:
    """(G,) mean log1p CPM of the training spots over the checkpoint's panel, and where it came from."""
    if baseline_sections:
        from .datasets import read_sample

        values = [section_targets(read_sample(folder), card.genes).values for folder in baseline_sections]
        stacked = np.concatenate(values)
        return stacked.mean(axis=0).astype(np.float32), "computed from " + ", ".join(str(Path(f).name) for f in baseline_sections)
    stored = card.provenance.get("train_mean_expression")
    if stored is not None and len(stored) == len(card.genes):
        return np.asarray(stored, dtype=np.float32), "checkpoint provenance (training spots)"
    return None, "unavailable (checkpoint has no train_mean_expression; pass --baseline-sections)"


def evaluate_sample(model, card: ModelCard, sample, cache, *, baseline: np.ndarray | None = None,
                    level_source: str = "resize", batch_size: int = 64, device="cpu", progress: bool = False) -> dict:
    """Predict one section and score it: {"metrics", "baseline_metrics", "pred", "true", "table", ...}."""
    targets = section_targets(sample, card.genes)
    kept = sample.subset(targets.keep)
    if kept.n_spots == 0:
        raise M2ORTError("no spot has any count over the model's gene panel", sample.slide_path.parent)
    levels = section_patches(sample, card, cache, level_source, progress)
    rows = np.flatnonzero(targets.keep)
    levels = [np.asarray(level[rows]) for level in levels]
    pred = predict_levels(model, card, levels, batch_size=batch_size, device=device, progress=progress,
                          desc=f"predict {sample.name}")
    true = targets.values
    result = {
        "section": sample.name,
        "slide": str(sample.slide_path),
        "format": sample.format,
        "section_mpp": sample.mpp,
        "section_mpp_source": sample.mpp_source,
        "model_mpp": card.mpp,
        "n_spots_dropped_zero_panel_total": int((~targets.keep).sum()),
        "n_panel_genes_missing": len(targets.missing_genes),
        "panel_genes_missing": targets.missing_genes[:50],
        "notes": sample.notes,
        "metrics": M.summarize(pred, true),
    }
    if baseline is not None:
        result["baseline_metrics"] = M.summarize(np.broadcast_to(baseline, true.shape), true)
    result["pred"], result["true"], result["centers_px"] = pred, true, kept.centers_px
    result["table"] = per_gene_table(pred, true, baseline, card.genes, targets.missing_genes)
    return result


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, path)


def evaluate_sections(checkpoint, sections, *, out_dir=None, baseline_sections=None, cache_dir=None,
                      level_source: str | None = None, batch_size: int = 64, device: str = "auto",
                      progress: bool = True, plot_genes: int = PLOT_GENES) -> dict:
    """Evaluate a checkpoint on section folders; writes the reports when ``out_dir`` is given."""
    from .checkpoint import load_checkpoint
    from .datasets import read_sample
    from .patch_cache import PatchCache

    torch_device = resolve_device(device)
    model, card = load_checkpoint(checkpoint, device=torch_device)
    level_source = level_source or card.level_source
    baseline, baseline_source = mean_baseline(card, baseline_sections)
    cache = PatchCache(cache_dir)
    out = Path(out_dir) if out_dir else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    report = {"checkpoint": str(checkpoint), "variant": card.variant, "model_id": card.model_id,
              "n_genes": len(card.genes), "model_mpp": card.mpp, "level_source": level_source,
              "scale": card.target_transform, "baseline": baseline_source, "sections": []}
    for folder in sections:
        sample = read_sample(folder)
        result = evaluate_sample(model, card, sample, cache, baseline=baseline, level_source=level_source,
                                 batch_size=batch_size, device=torch_device, progress=progress)
        summary = {k: v for k, v in result.items() if k not in ("pred", "true", "centers_px", "table")}
        report["sections"].append(summary)
        if out:
            name = sample.name
            _write_json(out / f"{name}.json", summary)
            tmp = out / f".{name}_genes.csv.partial"
            result["table"].to_csv(tmp, index=False, float_format="%.5f")
            os.replace(tmp, out / f"{name}_genes.csv")
            if plot_genes:
                plot_best_genes(out / f"{name}_best_genes.png", result["centers_px"], result["pred"], result["true"],
                                card.genes, result["table"], name, plot_genes)
    report["mean_over_sections"] = _mean_over_sections([s["metrics"] for s in report["sections"]])
    if baseline is not None:
        report["baseline_mean_over_sections"] = _mean_over_sections([s["baseline_metrics"] for s in report["sections"]])
    if out:
        _write_json(out / "report.json", report)
    return report


def _mean_over_sections(per_section: list[dict]) -> dict:
    """Unweighted mean of each metric over sections (NaN where undefined in every section)."""
    out = {}
    for key in per_section[0]:
        if key.startswith(("pcc", "rmse", "mae")):
            values = np.asarray([m[key] for m in per_section], dtype=np.float64)
            finite = values[np.isfinite(values)]
            out[key] = float(finite.mean()) if finite.size else float("nan")
    return out


def _format_row(label: str, m: dict) -> str:
    top = f"pcc_gene_top{M.TOP_GENES}_mean"
    return (f"{label:<22} PCC/spot {m['pcc_spot_mean']:.4f}  RMSE/spot {m['rmse_spot_mean']:.4f}  MAE {m['mae']:.4f}  "
            f"PCC/gene {m['pcc_gene_mean']:.4f}  PCC/gene top{M.TOP_GENES} {m[top]:.4f}")


def run_evaluate(args) -> int:
    report = evaluate_sections(args.checkpoint, args.sections, out_dir=args.out,
                               baseline_sections=args.baseline_sections, cache_dir=args.cache_dir,
                               level_source=args.level_source, batch_size=args.batch_size, device=args.device,
                               progress=not args.quiet)
    for section in report["sections"]:
        print(_format_row(f"{section['section']} model", section["metrics"]))
        if "baseline_metrics" in section:
            print(_format_row(f"{section['section']} mean baseline", section["baseline_metrics"]))
        if section["n_panel_genes_missing"]:
            print(f"  {section['n_panel_genes_missing']} panel genes missing from the section's counts (counted as 0)")
    if args.out:
        print(f"report: {Path(args.out) / 'report.json'}")
    return 0


def add_subcommands(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="score a checkpoint on held-out sections (PCC, RMSE, MAE; per spot and per gene)")
    p.add_argument("sections", nargs="+", help="section folders (HER2ST/ST-Net, Visium Space Ranger or HEST layout)")
    p.add_argument("--checkpoint", required=True, help="model checkpoint (.safetensors)")
    p.add_argument("--out", default=None, help="folder for report.json, per-section JSON, per-gene CSV and PNG maps")
    p.add_argument("--baseline-sections", nargs="*", default=None,
                   help="training sections for the mean baseline (default: the mean stored in the checkpoint)")
    p.add_argument("--cache-dir", default=None, help="patch cache folder (default ~/.cache/m2ort-fast/patches)")
    p.add_argument("--level-source", default=None, choices=["pyramid", "resize"],
                   help="how levels 2 and 3 are made (default: as the checkpoint was trained)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_evaluate)
