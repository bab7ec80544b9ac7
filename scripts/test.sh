#!/usr/bin/env bash
# Install kdpipe with its test tools and the vision, openvino and docs extras into .venv and run the whole test suite,
# slow tests included (the documentation site is built with --strict by tests/test_docs.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev,vision,openvino,docs
# Two worker processes (pytest-xdist): the tests are independent, each in its own directory and MLflow store.
# The slowest tests are listed at the end, so a CI log shows where its time went.
.venv/bin/python -m pytest -q -n "${KDPIPE_TEST_WORKERS:-2}" --durations=25 "$@"
