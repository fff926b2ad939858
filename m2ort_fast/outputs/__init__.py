"""Writing a slide's predictions: AnnData ``.h5ad``, CSV, GeoJSON, SpatialData, heatmap PNGs.

Everything is first written into the slide's staging folder beside the outputs
(``OUT/.<stem>.partial/``, :class:`StagedOutput`) and renamed into place at the end, the
``.h5ad`` last: a file named ``<stem>.h5ad`` is always complete. The staging folder is locked by
the run that writes it, so two runs cannot write one output; it is removed on every exit the
process sees (success, error, Ctrl-C, SIGTERM). A run killed outright (kill -9, out of memory)
leaves it unlocked: the next run takes it over, and the streamed writer
(:class:`ChunkedH5adWriter`) resumes from the rows it holds when the run settings match.

Modules: ``h5ad`` (the AnnData layout), ``h5ad_writer`` (predictions written in row chunks, then
the other formats), ``tables`` (CSV, GeoJSON), ``heatmaps``, ``spatialdata`` (the ``[spatial]``
extra), ``staging`` (the staging folder, its lock, publishing), ``folders`` (the output folder and
its errors).
"""

from m2ort_fast.outputs.folders import check_out_dir, ensure_out_dir, output_error, output_errors
from m2ort_fast.outputs.h5ad import HIRES_MAX_SIDE_PX, LOWRES_MAX_SIDE_PX, SlideOutputs, SlideView, build_anndata
from m2ort_fast.outputs.h5ad_writer import FORMATS, ChunkedH5adWriter
from m2ort_fast.outputs.heatmaps import (
    DEFAULT_HEATMAP_COUNT,
    OVERVIEW_PNG,
    check_heatmap_genes,
    genes_by_variance,
    heatmap_file_name,
)
from m2ort_fast.outputs.staging import (
    STAGING_SUFFIX,
    StagedOutput,
    StagingLocked,
    check_targets,
    exclusive_lock,
    h5ad_path,
    remove_stale_staging,
    run_key,
)

__all__ = [
    "DEFAULT_HEATMAP_COUNT",
    "FORMATS",
    "HIRES_MAX_SIDE_PX",
    "LOWRES_MAX_SIDE_PX",
    "OVERVIEW_PNG",
    "STAGING_SUFFIX",
    "ChunkedH5adWriter",
    "SlideOutputs",
    "SlideView",
    "StagedOutput",
    "StagingLocked",
    "build_anndata",
    "check_heatmap_genes",
    "check_out_dir",
    "check_targets",
    "remove_stale_staging",
    "run_key",
    "ensure_out_dir",
    "exclusive_lock",
    "genes_by_variance",
    "h5ad_path",
    "heatmap_file_name",
    "output_error",
    "output_errors",
]
