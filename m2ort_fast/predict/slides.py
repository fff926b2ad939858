"""Many slides with one loaded model: :func:`predict_slides`."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from m2ort_fast.errors import M2ORTError
from m2ort_fast.options import DEFAULT_OUT_DIR
from m2ort_fast.outputs import check_out_dir
from m2ort_fast.predict.opening import OpenedSlide, close_when_opened
from m2ort_fast.predict.options import OpenOptions, OutputOptions, split_options
from m2ort_fast.predict.predictor import Predictor
from m2ort_fast.predict.record import decide_before_opening
from m2ort_fast.predict.result import SlideResult
from m2ort_fast.spots import SpotsLike, as_spots

log = logging.getLogger(__name__)


def predict_slides(
    slides: Iterable[str | os.PathLike] | str | os.PathLike,
    *,
    model: str | os.PathLike | Predictor | None = None,
    out_dir: str | os.PathLike = DEFAULT_OUT_DIR,
    spots: Sequence[SpotsLike | None] | None = None,
    stop_on_error: bool = False,
    overwrite: bool = False,
    **options: Any,
) -> list[SlideResult]:
    """Predict many slides with one loaded model.

    ``slides``: paths (one path alone is one slide). ``model``: a checkpoint path, a ready
    :class:`Predictor`, or None for the default model. ``spots``: one spot source per slide (None
    entries: grid over the tissue). ``options``: Predictor options (backend, device, precision,
    batch_size, streamed, max_memory_mb, ...) when ``model`` is not a Predictor, the open stage's
    (spot_format, spacing_um, mpp, reader) and the outputs' (formats, write_csv, heatmap_genes,
    n_heatmaps, stem). ``overwrite``: False (the default, as the CLI's) lets each slide's run
    record decide (:mod:`m2ort_fast.predict.record`): skipped when made the same way, formats
    added from stored predictions, refused (its error names the setting) when made otherwise;
    outputs are renamed into place only when complete, so an interrupted batch resumes.
    A slide that fails is reported in its result's ``error`` and the batch goes on. The next
    slide is opened (slide, spots, thumbnail, tissue) while the current one is predicted.
    """
    slide_paths = [Path(slides)] if isinstance(slides, (str, os.PathLike)) else [Path(s) for s in slides]
    sources: list[Any] = list(spots) if spots is not None else [None] * len(slide_paths)
    if len(sources) != len(slide_paths):
        raise M2ORTError(f"{len(sources)} spot sources given for {len(slide_paths)} slides")
    predictor_options, open_options, output = split_options({**options, "out_dir": out_dir, "overwrite": overwrite})
    check_out_dir(output.out_dir)  # before the model loads: one line, at once
    _check_stems(slide_paths, output)
    predictor = model if isinstance(model, Predictor) else Predictor(model, **predictor_options)
    results: dict[int, SlideResult] = {}
    todo = []
    for i, slide_path in enumerate(slide_paths):
        stem = output.stem or slide_path.stem
        try:  # decided without opening the slide: a resumed batch skips its done slides at once
            if sources[i] is not None:
                sources[i] = as_spots(sources[i], format=open_options.spot_format, check_scale=open_options.mpp is None)
            wanted = functools.partial(predictor.record_for, slide_path, sources[i], open_options, output)
            if decide_before_opening(wanted, output, stem, predictor.option_names) == "skip":
                results[i] = SlideResult(slide=slide_path, skipped=True)
                continue
        except M2ORTError as exc:
            if stop_on_error:
                raise
            results[i] = _failed(slide_path, exc)
            continue
        todo.append(i)
    with _removed_when_empty(output.out_dir):
        _run_with_lookahead(predictor, slide_paths, sources, todo, open_options, output, stop_on_error, results)
    return [results[i] for i in range(len(slide_paths))]


def _check_stems(slide_paths: list[Path], output: OutputOptions) -> None:
    stems = [output.stem or path.stem for path in slide_paths]
    repeated = sorted({stem for stem in stems if stems.count(stem) > 1})
    if repeated:
        raise M2ORTError(
            f"several slides would write {repeated[0]}.h5ad into {output.out_dir}: slides need distinct "
            f"file names (or run them into different --out folders)"
        )


def _failed(slide_path: Path, exc: M2ORTError) -> SlideResult:
    log.error("%s", exc)
    return SlideResult(slide=slide_path, error=str(exc))


def _run_with_lookahead(
    predictor: Predictor,
    slide_paths: list[Path],
    sources: list,
    todo: list[int],
    open_options: OpenOptions,
    output: OutputOptions,
    stop_on_error: bool,
    results: dict[int, SlideResult],
) -> None:
    """Run the slides of ``todo`` in order, each next one opened on a thread meanwhile."""

    def open_one(i: int) -> OpenedSlide:
        return predictor.open(slide_paths[i], sources[i], open_options)

    with ThreadPoolExecutor(1, thread_name_prefix="m2ort-open") as opener:
        pending: Future[OpenedSlide] | None = opener.submit(open_one, todo[0]) if todo else None
        for k, i in enumerate(todo):
            future = pending
            assert future is not None  # submitted for todo[0], then for each next slide
            pending = opener.submit(open_one, todo[k + 1]) if k + 1 < len(todo) else None
            try:
                results[i] = predictor.run(future.result(), output)
            except M2ORTError as exc:
                if not stop_on_error:
                    results[i] = _failed(slide_paths[i], exc)
                    continue
                if pending is not None:
                    close_when_opened(pending)
                raise
            except BaseException:
                if pending is not None:
                    close_when_opened(pending)
                raise


@contextlib.contextmanager
def _removed_when_empty(out_dir: Path) -> Iterator[None]:
    """A run that wrote nothing leaves no empty output folder behind."""
    created = not out_dir.exists()
    try:
        yield
    finally:
        if created:
            with contextlib.suppress(OSError):
                out_dir.rmdir()
