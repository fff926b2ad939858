"""Every ```bash and ```python block of README.md and docs/*.md runs as written.

Each block runs on its own (bash -e; python as a fresh process) in a fresh temporary folder that
holds what the examples name, made from the shipped demo assets:

- ``slide.tiff``, ``a.tiff``, ``b.tiff``: the demo slide (a pyramidal TIFF crop of her2st C3);
  ``spots.tsv``, ``a.tsv``, ``b.tsv``: its legacy ST spot table;
- ``section.jpg``: the demo slide's full resolution as a flat JPEG (no mpp: the spot table's pitch
  gives it); ``centres.csv``: the spot centres as a CSV (``x,y`` in level-0 px);
- ``outs/spatial/``: a Space Ranger ``spatial/`` folder (``tissue_positions.csv`` +
  ``scalefactors_json.json``) of Visium spots on the demo's tissue;
- ``model.safetensors``: the shipped checkpoint;
- ``configs``, ``scripts``, ``bench`` link to the repository's, and ``../shared`` to the
  repository's ``../shared`` where it exists, so commands written from the repository root work.

The README's first block (install + demo, tests) is not run here: CI runs those two commands
verbatim.

A comment right before a fence says more:
``<!-- snippet: skip (REASON) -->``: not run here (reported as skipped with REASON);
``<!-- snippet: slow -->``: run only where ``M2ORT_SLOW_SNIPPETS=1`` (CI may set it);
``<!-- snippet: requires MODULE ... -->``: skipped, naming the module, where it does not import.
A block that names ``../shared/`` skips where the real data is absent; a python block skips where
one of the modules it imports is not installed (the ``[spatial]`` extra).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "m2ort_fast" / "assets"
SHARED = Path(os.environ.get("M2ORT_SHARED_DATA", REPO.parent / "shared" / "data")).parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SLOW = os.environ.get("M2ORT_SLOW_SNIPPETS") == "1"
TIMEOUT_S = 900

FENCE = re.compile(r"^```(bash|python)\s*$")
DIRECTIVE = re.compile(r"^<!--\s*snippet:\s*(.*?)\s*-->\s*$")


@dataclass
class Snippet:
    doc: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    directive: str  # what the comment before the fence says ("" if none)

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"


def extract(path: Path) -> list[Snippet]:
    """The ```bash / ```python blocks of one markdown file, each with the directive before it."""
    lines = path.read_text().splitlines()
    snippets, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        previous = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        directive = DIRECTIVE.match(previous)
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"{path.name}:{i + 1}: a code block that is never closed"
        code = "\n".join(lines[i + 1 : end]) + "\n"
        snippets.append(Snippet(path, i + 1, match.group(1), code, directive.group(1) if directive else ""))
        i = end + 1
    return snippets


SNIPPETS = [s for doc in DOCS for s in extract(doc)]
README_COMMANDS = next((s for s in SNIPPETS if s.doc.name == "README.md"), None)


DIRECTIVE_PART = re.compile(r"\s*(\w+)\s*(\([^)]*\)|[^;]*?)\s*(?:;|$)")


def _parse_directive(text: str) -> dict[str, str]:
    """'skip (needs a GPU; and cuCIM)' -> {"skip": "needs a GPU; and cuCIM"};
    'slow; requires ray' -> {"slow": "", "requires": "ray"}."""
    out, position = {}, 0
    while position < len(text):
        part = DIRECTIVE_PART.match(text, position)
        if part is None or part.end() == position or part.group(1) not in ("skip", "slow", "requires"):
            raise AssertionError(f"unknown snippet directive {text[position:]!r}: skip (REASON), slow, requires M")
        out[part.group(1)] = part.group(2).strip().removeprefix("(").removesuffix(")")
        position = part.end()
    return out


def _imports(code: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def _missing(modules) -> list[str]:
    return sorted(m for m in modules if importlib.util.find_spec(m) is None)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """The inputs the snippets name (see the module docstring), made once."""
    import numpy as np
    import pandas as pd
    import tifffile
    from PIL import Image

    run = tmp_path_factory.mktemp("snippet_inputs")
    for name in ("slide.tiff", "a.tiff", "b.tiff"):
        shutil.copy(ASSETS / "demo_slide.tiff", run / name)
    for name in ("spots.tsv", "a.tsv", "b.tsv"):
        shutil.copy(ASSETS / "demo_spots.tsv", run / name)
    shutil.copy(ASSETS / "m2ort_her2st_tiny.safetensors", run / "model.safetensors")
    Image.fromarray(tifffile.imread(ASSETS / "demo_slide.tiff", level=0)).save(run / "section.jpg", quality=90)
    table = pd.read_csv(ASSETS / "demo_spots.tsv", sep="\t")
    table[["pixel_x", "pixel_y"]].set_axis(["x", "y"], axis=1).to_csv(run / "centres.csv", index=False)
    # Visium spots (100 um pitch, hexagonal) near the demo's ST spots, i.e. on its tissue.
    mpp, pitch_um = 0.6874, 100.0
    row_px = pitch_um * np.sqrt(3) / 2 / mpp
    half_col_px = pitch_um / 2 / mpp
    st = table[["pixel_x", "pixel_y"]].to_numpy()
    rows = []
    for r in range(int(2304 / row_px)):
        for c in range(r % 2, int(2304 / half_col_px), 2):
            x, y = (c + 1) * half_col_px, (r + 0.5) * row_px
            if np.hypot(*(st - (x, y)).T).min() < 100:
                rows.append((f"r{r}_c{c}-1", 1, r, c, round(y), round(x)))
    spatial = run / "outs" / "spatial"
    spatial.mkdir(parents=True)
    columns = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
    pd.DataFrame(rows, columns=columns).to_csv(spatial / "tissue_positions.csv", index=False)
    (spatial / "scalefactors_json.json").write_text(
        f'{{"spot_diameter_fullres": {65 / mpp:.3f}, "tissue_hires_scalef": 0.5, "tissue_lowres_scalef": 0.15}}'
    )
    for name in ("configs", "scripts", "bench"):
        (run / name).symlink_to(REPO / name)
    return run


@pytest.fixture
def workdir(inputs: Path, tmp_path: Path) -> Path:
    """A fresh copy of the inputs for one snippet, with ``../shared`` beside it where it exists."""
    run = tmp_path / "run"
    shutil.copytree(inputs, run, symlinks=True)
    if SHARED.is_dir():
        (tmp_path / "shared").symlink_to(SHARED)
    return run


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.id for s in SNIPPETS])
def test_snippet_runs(snippet: Snippet, request: pytest.FixtureRequest) -> None:
    directive = _parse_directive(snippet.directive)
    if snippet is README_COMMANDS:
        pytest.skip(f"{snippet.id}: the README's install and test commands (CI runs them verbatim)")
    if "skip" in directive:
        pytest.skip(f"{snippet.id}: {directive['skip'] or 'marked skip'}")
    if "slow" in directive and not SLOW:
        pytest.skip(f"{snippet.id}: slow (runs where M2ORT_SLOW_SNIPPETS=1)")
    needed = set(directive.get("requires", "").split())
    if snippet.lang == "python":
        needed |= _imports(snippet.code)
    missing = _missing(needed)
    if missing:
        pytest.skip(f"{snippet.id}: needs {', '.join(missing)} (not installed; the [spatial] extra has it)")
    if "../shared/" in snippet.code and not (SHARED / "data" / "her2st").is_dir():
        pytest.skip(f"{snippet.id}: needs ../shared/data (the real her2st sections), absent here")
    workdir = request.getfixturevalue("workdir")
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
    command = ["bash", "-euo", "pipefail", "-c", snippet.code]
    if snippet.lang == "python":
        command = [sys.executable, "-c", snippet.code]
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert done.returncode == 0, (
        f"{snippet.id} exited {done.returncode}:\n{snippet.code}\n--- stdout\n{done.stdout[-4000:]}"
        f"\n--- stderr\n{done.stderr[-4000:]}"
    )


def test_extraction_finds_the_readme_blocks() -> None:
    first = README_COMMANDS
    assert first is not None, "no ```bash / ```python block found in README.md"
    assert first.lang == "bash" and first.line == 3, "the README opens with its two commands"
    assert "pip install" in first.code and "pytest" in first.code
    assert len([s for s in SNIPPETS if s.doc.name == "README.md"]) > 1
    for snippet in SNIPPETS:
        _parse_directive(snippet.directive)  # an unknown directive fails here, not silently


# Written by other changes in flight; a link to them is fine before they land.
PENDING_DOCS = {"docs/encoder.md", "docs/backends.md", "docs/inputs.md"}
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_relative_links_resolve(doc: Path) -> None:
    broken = []
    for target, _ in LINK.findall(doc.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        path = (doc.parent / target).resolve()
        if not path.exists() and str(path.relative_to(REPO)) not in PENDING_DOCS:
            broken.append(target)
    assert not broken, f"{doc.name}: links to missing files: {', '.join(broken)}"
