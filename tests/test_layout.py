"""The house rules the layout relies on, checked on the source: modules meet at public names.

No module imports another package's ``_private`` name or private module (``from
m2ort_fast.predict.x import _helper``, ``from m2ort_fast.slide._tiff import ...`` from outside
``slide``): within its own package a module may share private names (tiffslide's pattern: a
private module per format behind one public face). ``m2ort_fast._core``, the C++ extension, is the
package's own and public to it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The folders whose Python is the installed package (setuptools maps kernels/ and export/ into it).
SOURCES = {
    "m2ort_fast": ROOT / "m2ort_fast",
    "m2ort_fast.kernels": ROOT / "kernels",
    "m2ort_fast.export": ROOT / "export",
}
ALLOWED_PRIVATE_MODULES = {"m2ort_fast._core"}


def modules() -> list[tuple[str, Path]]:
    found = []
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found.append((".".join((package, *parts)), path))
    return found


def package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def private_imports(module: str, path: Path) -> list[str]:
    """``from X import _name`` from another package, and imports of a private module (``_x`` in
    the dotted path) from outside the package that holds it."""
    own = package_of(module, path)
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    bad = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("m2ort_fast"):
            continue
        source = node.module or ""
        parts = source.split(".")
        for i, part in enumerate(parts):
            holder = ".".join(parts[:i])
            if part.startswith("_") and ".".join(parts[: i + 1]) not in ALLOWED_PRIVATE_MODULES:
                if own != holder and not own.startswith(holder + "."):
                    bad.append(f"{where}:{node.lineno}: imports the private module {source}")
        for alias in node.names:
            private = alias.name.startswith("_") and not alias.name.startswith("__")  # __version__ is public
            if private and f"{source}.{alias.name}" not in ALLOWED_PRIVATE_MODULES:
                if source != own:
                    bad.append(f"{where}:{node.lineno}: imports {alias.name} from {source}")
    return bad


def test_no_module_imports_another_modules_private_name():
    bad = [line for module, path in modules() for line in private_imports(module, path)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    "code, expected",
    [
        ("from m2ort_fast.predict.opening import _mpp_from_spots\n", 1),
        ("from m2ort_fast.slide._tiff import TiffReader\n", 1),
        ("from m2ort_fast import _core\n", 0),
        ("from m2ort_fast.predict import Predictor\n", 0),
    ],
)
def test_the_check_finds_what_it_forbids(tmp_path, code, expected):
    path = tmp_path / "cohort_probe.py"
    path.write_text(code)
    assert len(private_imports("m2ort_fast.cohort.probe", path)) == expected
