"""Make the package's embedded demo slide from the real HER2+ data in ../shared/data/her2st.

Writes into m2ort_fast/assets/:
* demo_slide.tiff: a crop of section C3's H&E image (the crop with the most spots), as an
  Aperio-SVS-like pyramidal TIFF with JPEG tiles and its mpp in the metadata;
* demo_spots.tsv: the section's legacy ST spot table restricted to the crop, pixel coordinates
  shifted into it (the format of the her2st `*_selection.tsv` files).

The embedded model (m2ort_her2st_tiny.safetensors) is not made here: it is trained by
`scripts/train_her2st.sh` (see the README's "The shipped model").

    python scripts/make_demo_assets.py [--data ../shared/data/her2st] [--crop-px 2304]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from m2ort_fast.convert import write_pyramid
from m2ort_fast.datasets import read_sample
from m2ort_fast.slide import open_slide

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "m2ort_fast" / "assets"
DEMO_SECTION = "C3"


def densest_crop(centers_px: np.ndarray, crop_px: int, width_px: int, height_px: int) -> tuple[int, int]:
    """Top-left (x, y) of the crop_px square holding the most spot centres."""
    best, best_xy = -1, (0, 0)
    for x0 in range(0, width_px - crop_px + 1, 64):
        for y0 in range(0, height_px - crop_px + 1, 64):
            inside = (
                (centers_px[:, 0] >= x0)
                & (centers_px[:, 0] < x0 + crop_px)
                & (centers_px[:, 1] >= y0)
                & (centers_px[:, 1] < y0 + crop_px)
            ).sum()
            if inside > best:
                best, best_xy = inside, (x0, y0)
    return best_xy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "her2st")
    parser.add_argument("--crop-px", type=int, default=2304)
    parser.add_argument("--quality", type=int, default=80)
    args = parser.parse_args()
    ASSETS.mkdir(parents=True, exist_ok=True)

    demo = read_sample(args.data / DEMO_SECTION)
    mpp = demo.mpp

    # The slide crop and its spot table.
    table_path = next((args.data / DEMO_SECTION).glob("*_selection.tsv"))
    table = pd.read_csv(table_path, sep="\t")
    table = table[table["selected"] == 1]
    with open_slide(demo.slide_path, mpp=mpp) as slide:
        width_px, height_px = slide.level_dimensions[0]
        centers = table[["pixel_x", "pixel_y"]].to_numpy(float)
        x0, y0 = densest_crop(centers, args.crop_px, width_px, height_px)
        crop = slide.read_region(x0, y0, 0, args.crop_px, args.crop_px)
    write_pyramid(crop, ASSETS / "demo_slide.tiff", mpp=mpp, layout="svs", quality=args.quality)
    inside = (
        (table["pixel_x"] >= x0)
        & (table["pixel_x"] < x0 + args.crop_px)
        & (table["pixel_y"] >= y0)
        & (table["pixel_y"] < y0 + args.crop_px)
    )
    crop_table = table[inside].copy()
    crop_table["pixel_x"] -= x0
    crop_table["pixel_y"] -= y0
    crop_table.to_csv(ASSETS / "demo_spots.tsv", sep="\t", index=False, float_format="%.2f")

    print(f"demo slide: {DEMO_SECTION} crop at ({x0}, {y0}), {args.crop_px} px, mpp {mpp:.4f}, {len(crop_table)} spots")
    for path in sorted(ASSETS.iterdir()):
        print(f"  {path.relative_to(REPO)}: {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
