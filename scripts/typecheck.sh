#!/usr/bin/env bash
# mypy over m2ort_fast, m2ort_fast.kernels and m2ort_fast.export (pyproject.toml [tool.mypy]).
# mypy cannot follow setuptools' package-dir mapping (nor an editable install's import hook), so
# two links under build/ (ignored by git) show kernels/ and export/ where their import names say
# they are: build/mypy/m2ort_fast/{kernels,export}. Used by CI (.ci/run) and pre-commit.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p build/mypy/m2ort_fast
ln -sfn ../../../kernels ../../../export build/mypy/m2ort_fast/
exec mypy "$@"
