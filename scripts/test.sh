#!/usr/bin/env bash
# Install kdpipe with its test tools and the vision extra into .venv and run the whole test suite, slow tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev,vision
.venv/bin/python -m pytest -q "$@"
