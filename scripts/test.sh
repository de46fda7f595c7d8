#!/usr/bin/env bash
# Install with the test extras into ./.venv, lint, and run the whole test suite: tests/ and
# the docstring examples of napari_crossd/ (pyproject's testpaths and --doctest-modules).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --testing
.venv/bin/ruff check .
# Every test-data package was just installed: a test that cannot find its data fails.
# napari's widget tests need a display: a virtual one (Xvfb) when there is none.
xvfb=()
if [[ -z "${DISPLAY:-}" ]] && command -v xvfb-run >/dev/null; then
    xvfb=(xvfb-run -a -s "-screen 0 1600x1000x24")
fi
CROSSD_REQUIRE_TEST_DATA=1 "${xvfb[@]}" .venv/bin/python -m pytest -q "$@"
