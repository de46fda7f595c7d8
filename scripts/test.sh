#!/usr/bin/env bash
# Install with the test extras into ./.venv, lint, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --testing
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
