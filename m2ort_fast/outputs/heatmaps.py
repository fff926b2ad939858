"""Heatmap PNGs: one per gene and an overview, over the slide cropped to its tissue."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from m2ort_fast.errors import M2ORTError
from m2ort_fast.outputs.h5ad import SlideView

DEFAULT_HEATMAP_COUNT = 4


OVERVIEW_PNG = "overview.png"  # in <stem>_heatmaps/: every heatmap gene in one figure


SCALE_BAR_UM = (10, 20, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10000, 20000)


def check_heatmap_genes(genes: Sequence[str], requested: Sequence[str]) -> list[str]:
    """The genes asked for heatmaps; a name not in the model's panel is an error."""
    unknown = [g for g in requested if g not in genes]
    if unknown:
        raise M2ORTError(f"genes not in the model's panel: {', '.join(unknown[:5])}")
    return list(requested)


def genes_by_variance(variance: np.ndarray, genes: Sequence[str], count: int) -> list[str]:
    """The ``count`` genes whose predictions vary most (float64 variances, ties in panel order)."""
    order = np.argsort(-np.asarray(variance, dtype=np.float64), kind="stable")
    return [genes[i] for i in order[:count]]


def heatmap_file_name(gene: str) -> str:
    """The PNG a gene's heatmap is written to in ``<stem>_heatmaps/`` (characters a file system
    may refuse replaced by ``_``)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in gene) + ".png"


def _tissue_frame(view: SlideView, centers_px: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) in thumbnail px: the tissue and the spots, with a margin of one model window."""
    h, w = view.thumbnail.shape[:2]
    xy = centers_px / view.thumbnail_downsample
    rows, cols = np.nonzero(view.tissue_mask)
    xs = np.concatenate([cols, xy[:, 0]]) if len(cols) else xy[:, 0]
    ys = np.concatenate([rows, xy[:, 1]]) if len(rows) else xy[:, 1]
    margin = view.window_px / view.thumbnail_downsample
    x0, x1 = max(0, int(xs.min() - margin)), min(w, int(np.ceil(xs.max() + margin)) + 1)
    y0, y1 = max(0, int(ys.min() - margin)), min(h, int(np.ceil(ys.max() + margin)) + 1)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else (0, 0, w, h)


def _draw_spots(fig, ax, values: np.ndarray, centers_px: np.ndarray, view: SlideView, frame, value_label: str):
    """The frame of the thumbnail, the spots as discs of their diameter coloured by ``values``, a
    colour bar and a scale bar in um."""
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    x0, y0, x1, y1 = frame
    ax.imshow(view.thumbnail[y0:y1, x0:x1])
    xy = centers_px / view.thumbnail_downsample - (x0, y0)
    fig.canvas.draw()  # the axes' final size, to convert the spot diameter from px to points
    axes_width_pt = ax.get_window_extent().width * 72.0 / fig.dpi
    diameter_pt = max(view.spot_diameter_px / view.thumbnail_downsample * axes_width_pt / max(x1 - x0, 1), 2.0)
    scatter = ax.scatter(xy[:, 0], xy[:, 1], c=values, s=diameter_pt**2, cmap="viridis", alpha=0.85, edgecolors="none")
    fig.colorbar(scatter, ax=ax, fraction=0.035, pad=0.02, label=value_label)
    um_per_px = view.mpp * view.thumbnail_downsample
    bar_um = max([b for b in SCALE_BAR_UM if b <= (x1 - x0) * um_per_px / 4] or [SCALE_BAR_UM[0]])
    label = f"{bar_um // 1000} mm" if bar_um >= 1000 else f"{bar_um} um"
    ax.add_artist(
        AnchoredSizeBar(
            ax.transData,
            bar_um / um_per_px,
            label,
            "lower right",
            pad=0.4,
            frameon=True,
            size_vertical=max(1.0, (y1 - y0) / 150),
        )
    )
    ax.set_axis_off()


def write_heatmap(
    path: Path,
    gene: str,
    values: np.ndarray,
    centers_px: np.ndarray,
    view: SlideView,
    caption: str,
    value_label: str = "predicted log1p CPM",
) -> None:
    """One PNG: the predicted value of ``gene`` at every spot, over the slide cropped to its tissue."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = _tissue_frame(view, centers_px)
    width, height = frame[2] - frame[0], frame[3] - frame[1]
    fig, ax = plt.subplots(figsize=(8, 8 * height / max(width, 1) + 1.0), dpi=100)
    _draw_spots(fig, ax, values, centers_px, view, frame, value_label)
    ax.set_title(view.title(gene), fontsize=10)
    fig.text(0.01, 0.005, caption, fontsize=7, wrap=True, va="bottom")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)


def write_overview(
    path: Path, genes: list[str], values: np.ndarray, centers_px: np.ndarray, view: SlideView, caption: str
) -> None:
    """One PNG with a panel per gene (``values`` (N, len(genes))), for a first look at a slide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = _tissue_frame(view, centers_px)
    width, height = frame[2] - frame[0], frame[3] - frame[1]
    cols = min(4, len(genes))
    rows = -(-len(genes) // cols)
    panel = 4.0
    fig, axes = plt.subplots(
        rows, cols, figsize=(panel * cols, panel * rows * height / max(width, 1) + 1.2), dpi=100, squeeze=False
    )
    for k, ax in enumerate(axes.flat):
        if k >= len(genes):
            ax.set_axis_off()
            continue
        _draw_spots(fig, ax, values[:, k], centers_px, view, frame, "log1p CPM")
        ax.set_title(genes[k], fontsize=10)
    fig.suptitle(view.title(f"{len(genes)} genes"), fontsize=10)
    fig.text(0.01, 0.005, caption, fontsize=7, wrap=True, va="bottom")
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    fig.savefig(path, bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)


def write_heatmaps(
    folder: Path, genes: list[str], values: np.ndarray, centers_px: np.ndarray, view: SlideView, caption: str
) -> None:
    """One PNG per gene and ``overview.png`` into ``folder`` (created); ``values`` (N, len(genes))."""
    folder.mkdir()
    for k, gene in enumerate(genes):
        write_heatmap(folder / heatmap_file_name(gene), gene, values[:, k], centers_px, view, caption)
    write_overview(folder / OVERVIEW_PNG, genes, values, centers_px, view, caption)


def heatmap_caption(genes: Sequence[str], requested: bool, n_panel: int, n_spots: int, view: SlideView) -> str:
    """Why these genes, and how to read the picture."""
    why = (
        "the genes asked for"
        if requested
        else f"the {len(genes)} of the model's {n_panel} genes whose predictions vary most across this slide's spots"
    )
    return (
        f"Genes: {why}. {n_spots} spots, drawn as discs of the spot's diameter "
        f"({view.spot_diameter_px * view.mpp:.0f} um); the model sees a {view.window_um:.0f} um square around each. "
        f"Values: predicted log1p CPM."
    )
