#!/usr/bin/env bash
# Install kdpipe with its test tools into .venv (CPU torch) and run the whole test suite, slow tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
.venv/bin/python -m pytest -q "$@"
