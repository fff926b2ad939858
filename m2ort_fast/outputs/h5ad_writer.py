"""The streamed engine's writer: predictions straight into the .h5ad, in row chunks."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from m2ort_fast.outputs.folders import output_errors
from m2ort_fast.outputs.h5ad import SlideOutputs, SlideView
from m2ort_fast.outputs.heatmaps import (
    check_heatmap_genes,
    genes_by_variance,
    heatmap_caption,
    write_heatmaps,
)
from m2ort_fast.outputs.staging import StagedOutput, h5ad_path
from m2ort_fast.outputs.tables import close_geojson, write_csv_rows, write_geojson

if TYPE_CHECKING:
    from m2ort_fast.slide import Slide

FORMATS = ("csv", "geojson", "spatialdata")  # written beside the .h5ad (always written, and published last)


class ChunkedH5adWriter:
    """Writes a slide's ``.h5ad`` in its staging folder while its predictions arrive, in bounded
    memory, and keeps what it has written across a killed run.

    The file is first written by anndata with everything but X (obs, obsm, uns: from
    ``build_anndata`` with an empty gene axis), then X (n_spots, n_genes) float32 is created in
    row chunks and filled as batches arrive (in any row order). After each batch the file is
    flushed and the mask of written rows saved (``written.npy``, replaced atomically), so a run
    killed outright leaves rows that the next run with the same settings keeps (``written``).
    ``finish`` writes the CSV and heatmaps from the file in row chunks and publishes everything,
    the ``.h5ad`` last. Both engines write through it: the naive one in a single batch.
    """

    ROWS_PER_CHUNK = 4096

    def __init__(self, staged: StagedOutput, skeleton, genes: Sequence[str]):
        self._attach(staged, genes)
        self.n_spots = skeleton.n_obs
        # the CSV and GeoJSON name spots as their table does (one file per slide: no clash)
        self.ids = [str(i) for i in (skeleton.obs["spot_id"] if "spot_id" in skeleton.obs else skeleton.obs_names)]
        with output_errors(staged.folder):
            if not (staged.resumed and self._reopen()):
                self._create(skeleton)

    @classmethod
    def from_published(cls, staged: StagedOutput, genes: Sequence[str], run_record: str) -> ChunkedH5adWriter:
        """A writer over a copy of the slide's published ``.h5ad``, every row written and its run
        record replaced by ``run_record``: ``finish`` adds formats without running the model."""
        import h5py
        from anndata.io import read_elem, write_elem

        writer = cls.__new__(cls)
        writer._attach(staged, genes)
        with output_errors(staged.folder):
            staged.clear()
            shutil.copyfile(staged.h5ad, writer.h5ad)
            writer.file = h5py.File(writer.h5ad, "r+")
            writer.X = writer.file["X"]
            writer.n_spots = writer.X.shape[0]
            obs = read_elem(writer.file["obs"])
            writer.ids = [str(i) for i in (obs["spot_id"] if "spot_id" in obs else obs.index)]
            del writer.file["uns/m2ort_fast/run_record"]
            write_elem(writer.file["uns/m2ort_fast"], "run_record", run_record)
            writer.written = np.ones(writer.n_spots, dtype=bool)
            writer._save_progress()
        return writer

    def _attach(self, staged: StagedOutput, genes: Sequence[str]) -> None:
        self.staged = staged
        self.stem = staged.stem
        self.genes = list(genes)
        self.h5ad = h5ad_path(staged.folder, self.stem)
        self.progress_path = staged.folder / "written.npy"
        self.file: Any = None  # the open h5py.File

    def _create(self, skeleton) -> None:
        import h5py
        from anndata.io import write_elem

        self.staged.clear()  # what a killed run left (its heatmaps, a cut file) goes
        skeleton.write_h5ad(self.h5ad)
        self.file = h5py.File(self.h5ad, "r+")
        del self.file["X"], self.file["var"]
        write_elem(self.file, "var", pd.DataFrame(index=pd.Index(self.genes, name="gene")))
        chunk_rows = max(1, min(self.n_spots, max(1, 2**20 // (4 * max(len(self.genes), 1)))))
        self.X = self.file.create_dataset(
            "X",
            (self.n_spots, len(self.genes)),
            dtype=np.float32,
            chunks=(chunk_rows, max(len(self.genes), 1)) if self.n_spots else None,
        )
        self.X.attrs["encoding-type"] = "array"
        self.X.attrs["encoding-version"] = "0.2.0"
        self.written = np.zeros(self.n_spots, dtype=bool)

    def _reopen(self) -> bool:
        """Continue a killed run's file; False (start afresh) when anything about it is off."""
        import h5py

        try:
            written = np.load(self.progress_path)
            self.file = h5py.File(self.h5ad, "r+")
            self.X = self.file["X"]
            if (
                self.X.shape != (self.n_spots, len(self.genes))
                or written.shape != (self.n_spots,)
                or written.dtype != bool
            ):
                raise ValueError("shape")
        except Exception:  # a file cut mid-write, a mask from another run...: redo the slide
            with contextlib.suppress(Exception):
                if self.file is not None:
                    self.file.close()
            self.file = None
            return False
        self.written = written
        return True

    def write(self, spots: np.ndarray, predictions: np.ndarray) -> None:
        order = np.argsort(spots, kind="stable")  # h5py writes rows in increasing order
        with output_errors(self.staged.folder):
            self.X[spots[order]] = predictions[order]
            self.written[spots] = True
            self.file.flush()
            self._save_progress()

    def _save_progress(self) -> None:
        tmp = self.progress_path.with_name("written.tmp.npy")
        np.save(tmp, self.written)
        os.replace(tmp, self.progress_path)

    def _row_chunks(self):
        for start in range(0, self.n_spots, self.ROWS_PER_CHUNK):
            yield start, self.X[start : start + self.ROWS_PER_CHUNK]

    def gene_variance(self) -> np.ndarray:
        """Per-gene variance of the written predictions, float64, two passes over row chunks."""
        n = max(self.n_spots, 1)
        mean = sum((rows.sum(axis=0, dtype=np.float64) for _, rows in self._row_chunks()), np.zeros(len(self.genes)))
        mean /= n
        squares = sum((((rows - mean) ** 2).sum(axis=0) for _, rows in self._row_chunks()), np.zeros(len(self.genes)))
        return squares / n

    def finish(
        self,
        *,
        formats: Sequence[str] = ("csv",),
        heatmap_genes: Sequence[str] | None,
        n_heatmaps: int,
        view: SlideView | None,
        slide: Slide | None = None,
    ) -> SlideOutputs:
        """Write the other formats (``FORMATS``) and heatmaps from the file in row chunks, then
        publish everything, the ``.h5ad`` last. ``slide``: the open slide, for the SpatialData
        store's image."""
        if not self.written.all():
            raise RuntimeError(f"{int((~self.written).sum())} spots have no prediction")
        with output_errors(self.staged.folder):
            if heatmap_genes:
                genes = check_heatmap_genes(self.genes, heatmap_genes)
            else:
                genes = genes_by_variance(self.gene_variance(), self.genes, n_heatmaps)
            columns = [self.genes.index(g) for g in genes]
            heat_values = np.empty((self.n_spots, len(columns)), dtype=np.float32)
            centers = self.file["obsm"]["spatial"][:]
            folder = self.staged.folder
            for stale in (folder / f"{self.stem}_heatmaps", folder / f"{self.stem}.zarr"):  # a killed finish's
                shutil.rmtree(stale, ignore_errors=True)
            geojson_window_px = view.window_px if "geojson" in formats and view is not None else None
            for start, rows in self._row_chunks():
                chunk = slice(start, start + len(rows))
                heat_values[chunk] = rows[:, columns]
                if "csv" in formats:
                    write_csv_rows(
                        folder / f"{self.stem}.csv", rows, self.ids[chunk], self.genes, centers[chunk], append=start > 0
                    )
                if geojson_window_px is not None:
                    write_geojson(
                        folder / f"{self.stem}.geojson",
                        self.ids[chunk],
                        centers[chunk],
                        geojson_window_px,
                        self.genes,
                        rows,
                        append=start > 0,
                    )
            if geojson_window_px is not None:
                close_geojson(folder / f"{self.stem}.geojson")
            self.file.close()  # written.npy stays until the folder is published: a kill from here on resumes here
            if "spatialdata" in formats and view is not None and slide is not None:
                from m2ort_fast.outputs.spatialdata import write_spatialdata

                write_spatialdata(folder / f"{self.stem}.zarr", self.h5ad, slide, view)
            if genes and view is not None:
                caption = heatmap_caption(genes, bool(heatmap_genes), len(self.genes), self.n_spots, view)
                write_heatmaps(folder / f"{self.stem}_heatmaps", genes, heat_values, centers, view, caption)
        return self.staged.publish(genes if view is not None else [])

    def abort(self) -> None:
        """Close the file and remove the staging folder (an interrupted slide leaves no output)."""
        with contextlib.suppress(Exception):
            if self.file is not None:
                self.file.close()
        self.staged.discard()
