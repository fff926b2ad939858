"""Fuzz target (atheris) for what reads users' files before any pixel is decoded: the spot-table
parsers and the TIFF sniffing (directory-chain check, level and metadata reading, tile check).

The contract it checks: any bytes either parse or raise the project's one-line M2ORTError;
any other exception (an IndexError from a short header, a struct.error, a pandas error) is a
bug and stops the fuzzer with the input that caused it.

    python tests/fuzz/fuzz_inputs.py CORPUS_DIR -max_total_time=60   # CI: .ci/run
    python tests/fuzz/fuzz_inputs.py CORPUS_DIR -runs=1000000         # longer, by hand

The first input byte chooses the parser; the rest is the file's content. CORPUS_DIR (created
if needed) is seeded from ``seeds/`` with those prefixes, and from ``crashes/`` (inputs it once
failed on, target byte first). The project's modules are imported
under atheris' coverage instrumentation. ``one_input`` is also replayed by
``tests/test_fuzz.py`` on the seeds and on fixed mutations of them, without atheris.
"""

from __future__ import annotations

import atexit
import logging
import shutil
import sys
import tempfile
from pathlib import Path

# (file name, spot format or None for the TIFF sniffing); the name matters: formats are detected by it
TARGETS = (
    ("spots.csv", "auto"),
    ("C1_selection.tsv", "auto"),
    ("tissue_positions.csv", "auto"),
    ("spots.csv", "csv"),
    ("spots.tsv", "st"),
    ("tissue_positions_list.csv", "visium"),
    ("slide.tiff", None),
    ("slide.tiff", None),
)
# Images larger than this are not tile-checked here (the fuzzer would spend its time decoding).
MAX_CHECKED_PIXELS = 1024 * 1024

_work_dir: Path | None = None


def _scratch(name: str) -> Path:
    """A file in this process's scratch folder, made on first use and removed at exit."""
    global _work_dir
    if _work_dir is None:
        _work_dir = Path(tempfile.mkdtemp(prefix="m2ort-fuzz-"))
        atexit.register(shutil.rmtree, _work_dir, True)
    return _work_dir / name


def one_input(data: bytes) -> None:
    """Parse ``data[1:]`` with the parser ``data[0]`` chooses; M2ORTError is the only way to fail."""
    from m2ort_fast.errors import M2ORTError
    from m2ort_fast.spots import load_spots

    if not data:
        return
    name, spot_format = TARGETS[data[0] % len(TARGETS)]
    path = _scratch(name)
    path.write_bytes(data[1:])
    try:
        if spot_format is not None:
            spots = load_spots(path, format=spot_format)
            assert len(spots.ids) == len(spots.centers_px) > 0
        else:
            _sniff_tiff(path)
    except M2ORTError as exc:
        assert "\n" not in str(exc)


def _sniff_tiff(path: Path) -> None:
    """What open_slide does to a TIFF before any reader decodes: the one parse, then the tile check."""
    from m2ort_fast.slide._tiff import TileVerifier, read_tiff_layout

    with read_tiff_layout(path) as layout:
        try:
            layout.metadata()
        except Exception:  # deferred to the reader's open, which says it in one line (slide._open._open_with)
            pass
        page = layout.tif.series[0].levels[0].keyframe
        width_px, height_px = page.imagewidth, page.imagelength
        verifier = TileVerifier.from_layout(layout, [(width_px, height_px)])
    try:
        if 0 < width_px * height_px <= MAX_CHECKED_PIXELS:
            verifier.verify_region(0, 0, 0, width_px, height_px)
    finally:
        verifier.close()


def seed_inputs(folder: Path = Path(__file__).parent / "seeds") -> list[bytes]:
    """Each seed file under every target it fits (spot tables as spot tables, TIFFs as TIFFs)."""
    inputs = []
    for seed in sorted(folder.iterdir()):
        content = seed.read_bytes()
        for index, (_, spot_format) in enumerate(TARGETS):
            if (spot_format is None) == (seed.suffix == ".tiff"):
                inputs.append(bytes([index]) + content)
    return inputs


def main() -> None:
    import atheris

    corpus = next((Path(arg) for arg in sys.argv[1:] if not arg.startswith("-")), None)
    if corpus is not None:
        corpus.mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(seed_inputs()):
            (corpus / f"seed-{i:03d}").write_bytes(data)
        for crash in (Path(__file__).parent / "crashes").iterdir():  # past finds, kept as regressions
            shutil.copyfile(crash, corpus / crash.name)
    logging.getLogger("tifffile").setLevel(logging.CRITICAL)  # its warnings on broken files would bury a crash
    with atheris.instrument_imports(include=["m2ort_fast"]):
        import m2ort_fast.slide  # noqa: F401
        import m2ort_fast.spots  # noqa: F401
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
