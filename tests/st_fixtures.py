"""A small synthetic section laid out like the HER2ST folders (JPEG + *_selection.tsv + counts
.tsv.gz), for tests that must run where the real data is absent."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

PITCH_PX = 290.0  # one 200 um array step, as in the real images (about 0.69 um/px)


def write_st_section(folder: Path, name: str = "S1", grid: int = 4, n_genes: int = 60, seed: int = 0) -> Path:
    """grid x grid spots; each spot's tissue colour drives the expression of the first genes, so
    a model has something to learn."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    size = int(PITCH_PX * (grid + 1))
    image = np.full((size, size, 3), 240, np.uint8)
    rows, counts_rows = ["x\ty\tnew_x\tnew_y\tpixel_x\tpixel_y\tselected"], []
    genes = [f"GENE{i:03d}" for i in range(n_genes)]
    for j in range(grid):
        for i in range(grid):
            x, y = i + 2, j + 2
            cx, cy = PITCH_PX * (i + 1), PITCH_PX * (j + 1)
            purple = rng.uniform(0, 1)
            r0, c0 = int(cy - 112), int(cx - 112)
            patch = np.stack([200 - 120 * purple, 120 + 40 * (1 - purple), 200 - 30 * purple], -1)
            image[r0 : r0 + 224, c0 : c0 + 224] = (
                (patch + rng.normal(0, 12, (224, 224, 3))).clip(0, 255).astype(np.uint8)
            )
            rows.append(f"{x}\t{y}\t{x:.3f}\t{y:.3f}\t{cx:.2f}\t{cy:.2f}\t1")
            lam = np.full(n_genes, 3.0)
            lam[:10] = 1 + 30 * purple
            counts_rows.append((f"{x}x{y}", rng.poisson(lam)))
    from PIL import Image

    Image.fromarray(image).save(folder / f"HE_{name}.jpg", quality=90)
    (folder / f"{name}_selection.tsv").write_text("\n".join(rows) + "\n")
    with gzip.open(folder / f"{name}.tsv.gz", "wt") as f:
        f.write("\t" + "\t".join(genes) + "\n")
        for key, values in counts_rows:
            f.write(key + "\t" + "\t".join(str(int(v)) for v in values) + "\n")
    return folder
