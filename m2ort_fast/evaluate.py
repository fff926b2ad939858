"""`m2ort-fast evaluate`: a checkpoint against measured expression of held-out sections.

    m2ort-fast evaluate --checkpoint model.safetensors SECTION_DIR [SECTION_DIR ...] [--out DIR]

Everything about the model comes from the checkpoint: its working resolution (the section's
pixel size comes from its own files, e.g. the spot table's pitch), its gene panel, its pixel
normalisation. Measured counts are put on the model's scale with the checkpoint's panel (log1p
CPM of the panel total; panel genes the section lacks count as 0 and are reported). Per section
it writes ``<name>.json`` (metrics of the model and of the mean baseline), ``<name>_genes.csv``
(per-gene table) and ``<name>_best_genes.png`` (measured vs predicted maps); ``report.json``
gathers all sections. Metrics: see :mod:`m2ort_fast.metrics`.

Two baselines are scored like the model, side by side:

* the **mean baseline** predicts, for every spot, the mean expression of the training spots; it
  is stored in the checkpoint's provenance (``train_mean_expression``) by ``m2ort-fast train``, or
  computed from ``--baseline-sections``;
* the **ridge baseline** (:mod:`m2ort_fast.baselines`) predicts expression from colour and
  texture statistics of the spot's three input patches (the same cached uint8 patches the model
  sees), by ridge regression fitted on the training sections: ``--baseline-sections`` where
  given, else the training sections named in the checkpoint's provenance (``split.train`` under
  ``config.data_root``) where those folders exist on this machine. A section that is also one of
  the ridge's training sections is scored in-sample and flagged (``ridge_in_sample``).

Besides PCC / RMSE / MAE, every metrics block has the variance share of the first principal
components of the prediction and of the measurement and the per-gene PCC beyond the measured PC1
(see :mod:`m2ort_fast.metrics`): a model that only tracks one tissue axis shows it there.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from m2ort_fast import metrics as M
from m2ort_fast.checkpoint import ModelCard
from m2ort_fast.device import resolve_device
from m2ort_fast.errors import M2ORTError, OutputError
from m2ort_fast.options import device_name, positive_int
from m2ort_fast.outputs import check_out_dir, ensure_out_dir, output_errors
from m2ort_fast.predict import normalize_levels
from m2ort_fast.targets import expression_targets, panel_counts

log = logging.getLogger(__name__)

PLOT_GENES = 4


@torch.no_grad()
def predict_levels(
    model,
    card: ModelCard,
    levels: list[np.ndarray],
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    progress: bool = False,
    desc: str = "predict",
) -> np.ndarray:
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
    return cache.patches(
        sample.slide_path,
        sample.centers_px,
        card.level_mpp,
        slide_mpp=sample.mpp,
        mpp_source=sample.mpp_source,
        sizes_px=card.patch_sizes_px,
        level_source=level_source,
        progress=progress,
    )


def per_gene_table(
    pred: np.ndarray,
    true: np.ndarray,
    baseline: np.ndarray | None,
    genes: list[str],
    missing: list[str],
    ridge_pred: np.ndarray | None = None,
) -> pd.DataFrame:
    """One row per panel gene: its PCC across spots (model; also beyond the measured PC1), RMSE,
    means, and the ridge baseline's PCCs where given; sorted by the model's PCC."""
    table = pd.DataFrame(
        {
            "gene": genes,
            "pcc": M.pcc_per_gene(pred, true) if len(pred) >= 2 else np.nan,
            "pcc_beyond_pc1": M.pcc_per_gene_beyond_pc1(pred, true),
            "rmse": np.sqrt(((pred - true) ** 2).mean(axis=0)),
            "mae": np.abs(pred - true).mean(axis=0),
            "measured_mean": true.mean(axis=0),
            "predicted_mean": pred.mean(axis=0),
            "measured_std": true.std(axis=0),
            "predicted_std": pred.std(axis=0),
            "missing_in_section": [g in set(missing) for g in genes],
        }
    )
    if baseline is not None:
        table["baseline_rmse"] = np.sqrt(((baseline[None, :] - true) ** 2).mean(axis=0))
    if ridge_pred is not None:
        table["ridge_pcc"] = M.pcc_per_gene(ridge_pred, true) if len(pred) >= 2 else np.nan
        table["ridge_pcc_beyond_pc1"] = M.pcc_per_gene_beyond_pc1(ridge_pred, true)
        table["ridge_rmse"] = np.sqrt(((ridge_pred - true) ** 2).mean(axis=0))
    table = table.sort_values("pcc", ascending=False, na_position="last", kind="stable")
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    return table


def plot_best_genes(
    path: Path,
    centers_px: np.ndarray,
    pred: np.ndarray,
    true: np.ndarray,
    genes: list[str],
    table: pd.DataFrame,
    title: str,
    count: int = PLOT_GENES,
) -> None:
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
        from m2ort_fast.datasets import read_sample

        values = [section_targets(read_sample(folder), card.genes).values for folder in baseline_sections]
        stacked = np.concatenate(values)
        return stacked.mean(axis=0).astype(np.float32), "computed from " + ", ".join(
            str(Path(f).name) for f in baseline_sections
        )
    stored = card.provenance.get("train_mean_expression")
    if stored is not None and len(stored) == len(card.genes):
        return np.asarray(stored, dtype=np.float32), "checkpoint provenance (training spots)"
    return None, "unavailable (checkpoint has no train_mean_expression; pass --baseline-sections)"


def baseline_folders(card: ModelCard, baseline_sections=None) -> tuple[list[Path] | None, str]:
    """The training sections a fitted baseline uses: ``--baseline-sections`` where given, else the
    checkpoint's training sections where they exist here. (folders, origin) or (None, why not)."""
    if baseline_sections:
        return [Path(f) for f in baseline_sections], "--baseline-sections"
    split = card.provenance.get("split") or {}
    root = (card.provenance.get("config") or {}).get("data_root")
    names = split.get("train") or []
    if not names or not root:
        return None, "unavailable (checkpoint names no training sections; pass --baseline-sections)"
    folders = [Path(root) / name for name in names]
    absent = [str(f) for f in folders if not f.is_dir()]
    if absent:
        return None, (
            "unavailable (the checkpoint's training sections are not on this machine: "
            + ", ".join(absent)
            + "; pass --baseline-sections)"
        )
    return folders, "the checkpoint's training sections"


def _training_data(card: ModelCard, folders, cache, level_source: str, progress: bool):
    """Per training section: (name, kept spots' levels, targets)."""
    from m2ort_fast.datasets import read_sample

    for folder in folders:
        sample = read_sample(folder)
        section = section_targets(sample, card.genes)
        rows = np.flatnonzero(section.keep)
        levels = section_patches(sample, card, cache, level_source, progress)
        yield sample.name, [np.asarray(level[rows]) for level in levels], section.values


def ridge_baseline(card: ModelCard, cache, level_source: str, baseline_sections=None, progress: bool = False):
    """The ridge image-feature baseline fitted on the training sections (see the module's docstring).

    Returns (RidgeBaseline or None, a description of where it came from, the training sections'
    names)."""
    from m2ort_fast.baselines import RidgeBaseline, spot_image_features

    folders, origin = baseline_folders(card, baseline_sections)
    if folders is None:
        return None, origin, []
    features, targets, groups = [], [], []
    for name, levels, values in _training_data(card, folders, cache, level_source, progress):
        features.append(spot_image_features(levels))
        targets.append(values)
        groups += [name] * len(values)
    ridge = RidgeBaseline.fit(np.concatenate(features), np.concatenate(targets), groups=groups)
    names = list(dict.fromkeys(groups))
    return ridge, f"ridge on image features, fitted on {', '.join(names)} ({origin})", names


def probe_baseline(
    card: ModelCard,
    model,
    cache,
    level_source: str,
    spec: str,
    weights=None,
    baseline_sections=None,
    progress: bool = False,
):
    """The encoder probe (:mod:`m2ort_fast.encoders.probe`) fitted on the training sections.

    ``spec`` "auto": the checkpoint's own encoder where it has one, else EfficientNet-Lite0; else an
    encoder spec (``weights`` for timm). Returns ((ProbeBaseline, ViewZero) or None, description)."""
    from m2ort_fast.encoders import DEFAULT_ENCODER, DEFAULT_VIEWS, build_encoder
    from m2ort_fast.encoders.probe import ProbeBaseline, ViewZero, pooled_features

    folders, origin = baseline_folders(card, baseline_sections)
    if folders is None:
        return None, origin
    if spec == "auto" and getattr(model, "token_embed", None) is not None:
        encoder = model.token_embed.encoder.float().cpu()
    else:
        encoder = build_encoder(DEFAULT_ENCODER if spec == "auto" else spec, weights)
    store = ViewZero(encoder, DEFAULT_VIEWS)  # training's feature cache where it has the spots
    features, targets, groups = [], [], []
    for name, levels, values in _training_data(card, folders, cache, level_source, progress):
        features.append(pooled_features(store, levels, progress))
        targets.append(values)
        groups += [name] * len(values)
    probe = ProbeBaseline.fit(np.concatenate(features), np.concatenate(targets), groups, encoder.info["name"])
    names = ", ".join(dict.fromkeys(groups))
    return (probe, store), f"PCA-ridge probe on {encoder.info['name']} features, fitted on {names} ({origin})"


def evaluate_sample(
    model,
    card: ModelCard,
    sample,
    cache,
    *,
    baseline: np.ndarray | None = None,
    ridge=None,
    probe=None,
    level_source: str = "resize",
    batch_size: int = 64,
    device="cpu",
    progress: bool = False,
) -> dict:
    """Predict one section and score it: {"metrics", "baseline_metrics", "ridge_baseline_metrics",
    "pred", "true", "ridge_pred", "table", ...} (baseline entries only for the baselines given)."""
    targets = section_targets(sample, card.genes)
    kept = sample.subset(targets.keep)
    if kept.n_spots == 0:
        raise M2ORTError("no spot has any count over the model's gene panel", sample.slide_path.parent)
    levels = section_patches(sample, card, cache, level_source, progress)
    rows = np.flatnonzero(targets.keep)
    levels = [np.asarray(level[rows]) for level in levels]
    pred = predict_levels(
        model, card, levels, batch_size=batch_size, device=device, progress=progress, desc=f"predict {sample.name}"
    )
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
    ridge_pred = None
    if ridge is not None:
        from m2ort_fast.baselines import spot_image_features

        ridge_pred = ridge.predict(spot_image_features(levels))
        result["ridge_baseline_metrics"] = M.summarize(ridge_pred, true)
    if probe is not None:  # (ProbeBaseline, ViewZero)
        from m2ort_fast.encoders.probe import pooled_features

        result["probe_baseline_metrics"] = M.summarize(probe[0].predict(pooled_features(probe[1], levels)), true)
    signal = M.measurement_signal(panel_counts(kept.counts, sample.genes, card.genes)[0])
    result["measurement"] = {key: signal[key] for key in ("var_share_pc1_signal", "pcc_gene_ceiling_mean")}
    result["pred"], result["true"], result["centers_px"] = pred, true, kept.centers_px
    result["ridge_pred"] = ridge_pred
    result["table"] = per_gene_table(pred, true, baseline, card.genes, targets.missing_genes, ridge_pred)
    result["table"]["pcc_ceiling"] = signal["pcc_gene_ceiling"][result["table"].index]
    return result


def check_inputs(sections, baseline_sections=None, out_dir=None) -> Path | None:
    """Every input checked before the checkpoint, the training sections or any patch is read:
    the output folder one that can be made and written, each section (and baseline section) a
    sample folder of a known layout. One line (M2ORTError, exit 2) naming the first that is not;
    returns the output folder (None without one)."""
    from m2ort_fast.datasets import detect_format

    out = check_out_dir(out_dir) if out_dir else None
    if out is not None:
        existing = next(p for p in (out, *out.absolute().parents) if p.exists())
        if not existing.is_dir():
            raise OutputError(f"cannot make the output folder: {existing} is not a folder", out)
        if not os.access(existing, os.W_OK | os.X_OK):
            raise OutputError(f"cannot make or write the output folder: {existing} is not writable", out)
    if isinstance(sections, (str, os.PathLike)):
        raise M2ORTError(f"sections= takes a list of section folders, not one path ({os.fspath(sections)!r})")
    for folder in [*sections, *(baseline_sections or [])]:
        if not Path(folder).is_dir():
            raise M2ORTError("no such sample folder", folder)
        detect_format(Path(folder))
    return out


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, path)


def evaluate_sections(
    checkpoint,
    sections,
    *,
    out_dir=None,
    baseline_sections=None,
    cache_dir=None,
    level_source: str | None = None,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = True,
    plot_genes: int = PLOT_GENES,
    ridge: bool = True,
    probe: str | None = "auto",
    probe_weights=None,
) -> dict:
    """Evaluate a checkpoint on section folders; writes the reports when ``out_dir`` is given.
    ``ridge=False`` skips the ridge baseline (it reads the training sections' patches); ``probe``
    None skips the encoder probe, else names its encoder (see :func:`probe_baseline`)."""
    from m2ort_fast.checkpoint import load_checkpoint
    from m2ort_fast.datasets import read_sample
    from m2ort_fast.patch_cache import PatchCache

    if not isinstance(sections, (str, os.PathLike)):
        sections = list(sections)  # read twice: checked first, evaluated after
    out = check_inputs(sections, baseline_sections, out_dir)  # wrong inputs fail before any work
    torch_device = resolve_device(device)
    model, card = load_checkpoint(checkpoint, device=torch_device)
    level_source = level_source or card.level_source
    baseline, baseline_source = mean_baseline(card, baseline_sections)
    cache = PatchCache(cache_dir)
    if ridge:
        ridge_model, ridge_source, ridge_sections = ridge_baseline(
            card, cache, level_source, baseline_sections, progress
        )
    else:
        ridge_model, ridge_source, ridge_sections = None, "skipped", []
    probe_model, probe_source = (
        (None, "skipped")
        if probe is None
        else probe_baseline(card, model, cache, level_source, probe, probe_weights, baseline_sections, progress)
    )
    report: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "variant": card.variant,
        "model_id": card.model_id,
        "n_genes": len(card.genes),
        "model_mpp": card.mpp,
        "level_source": level_source,
        "scale": card.target_transform,
        "baseline": baseline_source,
        "ridge_baseline": {"source": ridge_source, **(ridge_model.describe() if ridge_model else {})},
        "probe_baseline": {"source": probe_source, **(probe_model[0].describe() if probe_model else {})},
        "sections": [],
    }
    results = []  # every section is evaluated before anything is written: a bad section leaves no report
    for folder in sections:
        sample = read_sample(folder)
        result = evaluate_sample(
            model,
            card,
            sample,
            cache,
            baseline=baseline,
            ridge=ridge_model,
            probe=probe_model,
            level_source=level_source,
            batch_size=batch_size,
            device=torch_device,
            progress=progress,
        )
        if ridge_model is not None:
            result["ridge_in_sample"] = sample.name in ridge_sections
        results.append((sample.name, result))
        report["sections"].append(
            {k: v for k, v in result.items() if k not in ("pred", "true", "ridge_pred", "centers_px", "table")}
        )
    report["mean_over_sections"] = _mean_over_sections([s["metrics"] for s in report["sections"]])
    report["measurement_mean_over_sections"] = _mean_over_sections([s["measurement"] for s in report["sections"]])
    if baseline is not None:
        report["baseline_mean_over_sections"] = _mean_over_sections([s["baseline_metrics"] for s in report["sections"]])
    if ridge_model is not None:
        report["ridge_baseline_mean_over_sections"] = _mean_over_sections(
            [s["ridge_baseline_metrics"] for s in report["sections"]]
        )
    if probe_model is not None:
        report["probe_baseline_mean_over_sections"] = _mean_over_sections(
            [s["probe_baseline_metrics"] for s in report["sections"]]
        )
    if out:
        _write_reports(out, report, results, card.genes, plot_genes)
    return report


def _write_reports(out: Path, report: dict, results: list, genes: list[str], plot_genes: int) -> None:
    """report.json, and per section its JSON, per-gene CSV and map PNG: written into a staging
    folder inside ``out`` and renamed into place, report.json last; the staging folder (and
    ``out``, if this made it and nothing was published) goes on any failure."""
    created = not out.exists()
    staging = None
    try:
        with output_errors(out):
            ensure_out_dir(out)
            staging = Path(tempfile.mkdtemp(prefix=".evaluate.partial-", dir=out))
            for (name, result), summary in zip(results, report["sections"], strict=True):
                _write_json(staging / f"{name}.json", summary)
                result["table"].to_csv(staging / f"{name}_genes.csv", index=False, float_format="%.5f")
                if plot_genes:
                    plot_best_genes(
                        staging / f"{name}_best_genes.png",
                        result["centers_px"],
                        result["pred"],
                        result["true"],
                        genes,
                        result["table"],
                        name,
                        plot_genes,
                    )
            _write_json(staging / "report.json", report)
            for path in sorted(staging.iterdir(), key=lambda p: p.name == "report.json"):
                os.replace(path, out / path.name)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _mean_over_sections(per_section: list[dict]) -> dict:
    """Unweighted mean of each metric over sections (NaN where undefined in every section)."""
    out = {}
    for key in per_section[0]:
        if key.startswith(("pcc", "rmse", "mae", "var_share")):
            values = np.asarray([m[key] for m in per_section], dtype=np.float64)
            finite = values[np.isfinite(values)]
            out[key] = float(finite.mean()) if finite.size else float("nan")
    return out


TABLE_COLUMNS = (  # (header, metrics key): the printed table, one row per model / baseline
    ("PCC/spot", "pcc_spot_mean"),
    ("RMSE/spot", "rmse_spot_mean"),
    ("MAE", "mae"),
    ("PCC/gene", "pcc_gene_mean"),
    (f"top{M.TOP_GENES}", f"pcc_gene_top{M.TOP_GENES}_mean"),
    ("PCC/gene>PC1", "pcc_gene_beyond_pc1_mean"),
    ("PC1 share", "var_share_pc1_pred"),
    (f"PC1-{M.TOP_PCS} share", f"var_share_pc1to{M.TOP_PCS}_pred"),
)
LABEL_WIDTH = 24


def _format_header() -> str:
    return f"{'':<{LABEL_WIDTH}}" + "".join(f" {header:>12}" for header, _ in TABLE_COLUMNS)


def _format_row(label: str, m: dict) -> str:
    """One table row; NaN (undefined, e.g. any correlation of a constant prediction) prints as '-'."""
    cells = []
    for _, key in TABLE_COLUMNS:
        value = m.get(key, float("nan"))
        cells.append(f" {value:12.4f}" if np.isfinite(value) else f" {'-':>12}")
    return f"{label:<{LABEL_WIDTH}}" + "".join(cells)


def run_evaluate(args) -> int:
    from m2ort_fast.predict import checkpoint_path

    report = evaluate_sections(
        checkpoint_path(args.checkpoint),
        args.sections,
        out_dir=args.out,
        baseline_sections=args.baseline_sections,
        cache_dir=args.cache_dir,
        level_source=args.level_source,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.quiet,
        ridge=not args.no_ridge,
        probe=None if args.no_probe else args.probe_encoder,
        probe_weights=args.probe_encoder_weights,
    )
    print(
        f"ridge baseline: {report['ridge_baseline']['source']}"
        + (f", alpha {report['ridge_baseline']['alpha']:g}" if "alpha" in report["ridge_baseline"] else "")
    )
    print(_format_header())
    for section in report["sections"]:
        name = section["section"]
        print(_format_row(f"{name} model", section["metrics"]))
        if "baseline_metrics" in section:
            print(_format_row(f"{name} mean baseline", section["baseline_metrics"]))
        if "ridge_baseline_metrics" in section:
            flag = " (in-sample)" if section.get("ridge_in_sample") else ""
            print(_format_row(f"{name} ridge baseline", section["ridge_baseline_metrics"]) + flag)
        if "probe_baseline_metrics" in section:
            print(_format_row(f"{name} encoder probe", section["probe_baseline_metrics"]))
        m = section["metrics"]
        print(
            f"  measured: PC1 share {m['var_share_pc1_true']:.4f}, "
            f"PC1-{M.TOP_PCS} share {m[f'var_share_pc1to{M.TOP_PCS}_true']:.4f}; its signal (counting noise "
            f"removed): PC1 share {section['measurement']['var_share_pc1_signal']:.4f}, "
            f"PCC/gene ceiling {section['measurement']['pcc_gene_ceiling_mean']:.4f}"
        )
        if section["n_panel_genes_missing"]:
            print(f"  {section['n_panel_genes_missing']} panel genes missing from the section's counts (counted as 0)")
    if args.out:
        print(f"report: {Path(args.out) / 'report.json'}")
    return 0


def add_subcommands(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="score a checkpoint on held-out sections (PCC, RMSE, MAE; per spot and per gene)"
    )
    p.add_argument("sections", nargs="+", help="section folders (HER2ST/ST-Net, Visium Space Ranger or HEST layout)")
    p.add_argument("--checkpoint", required=True, help="model checkpoint (.safetensors) or a shipped model's name")
    p.add_argument("--out", default=None, help="folder for report.json, per-section JSON, per-gene CSV and PNG maps")
    p.add_argument(
        "--baseline-sections",
        nargs="*",
        default=None,
        help="training sections for the mean and ridge baselines (default: the mean stored in the "
        "checkpoint; the ridge is fitted on the checkpoint's training sections where present)",
    )
    p.add_argument(
        "--no-ridge",
        action="store_true",
        help="skip the ridge image-feature baseline (it reads the training sections' patches)",
    )
    p.add_argument(
        "--no-probe", action="store_true", help="skip the encoder probe baseline (PCA + ridge on encoder features)"
    )
    p.add_argument(
        "--probe-encoder",
        default="auto",
        help="encoder of the probe: auto (the checkpoint's, else efficientnet-lite0), efficientnet-lite0[-s8] or "
        "timm:NAME",
    )
    p.add_argument("--probe-encoder-weights", default=None, help="weights file of a timm:NAME probe encoder")
    p.add_argument("--cache-dir", default=None, help="patch cache folder (default ~/.cache/m2ort-fast/patches)")
    p.add_argument(
        "--level-source",
        default=None,
        choices=["pyramid", "resize"],
        help="how levels 2 and 3 are made (default: as the checkpoint was trained)",
    )
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--device", type=device_name, default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_evaluate)
