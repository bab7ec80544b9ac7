#!/usr/bin/env bash
# Create .venv and install kdpipe into it with a CPU build of torch.
# Usage: bash scripts/install.sh [extra,...]   e.g. dev, vision, postgres; the cpu extra (onnxruntime) is added
#        unless gpu (onnxruntime-gpu) is named.
# TORCH_SPEC overrides the torch requirement (default torch==2.13.0, which this project's machines hold as a CPU build).
set -euo pipefail
cd "$(dirname "$0")/.."
case ",${1:-}," in *,gpu,*) extras="$1" ;; *) extras="cpu${1:+,$1}" ;; esac
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, so the resolver keeps it instead of pulling a multi-GB CUDA build.
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e ".[${extras}]"
.venv/bin/python -c "import kdpipe, torch, onnxruntime, mlflow, optuna"
