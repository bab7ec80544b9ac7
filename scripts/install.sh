#!/usr/bin/env bash
# Create .venv and install kdpipe into it with a CPU build of torch.
# Usage: bash scripts/install.sh [extra,...]   e.g. dev, vision, postgres; the cpu extra (onnxruntime) is added
#        unless gpu (onnxruntime-gpu) is named.
# TORCH_SPEC overrides the torch requirement (default torch==2.13.0, which this project's machines hold as a CPU build).
# With the vision extra, torch and torchvision come from the package registry itself (bypassing this machine's pip
# configuration): torchvision 0.28.0 does not import with the local CPU build of torch ("torchvision::nms does not
# exist"), and the registry's torch 2.13.0 runs on CPU too (about 5 GB).
set -euo pipefail
cd "$(dirname "$0")/.."
case ",${1:-}," in *,gpu,*) extras="$1" ;; *) extras="cpu${1:+,$1}" ;; esac
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, so the resolver keeps it instead of pulling a multi-GB CUDA build.
case ",${1:-}," in
  *,vision,*)
    if ! .venv/bin/python -c "import torchvision" 2>/dev/null; then
      env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null .venv/bin/python -m pip install -q --force-reinstall \
        "${TORCH_SPEC:-torch==2.13.0}" torchvision==0.28.0
    fi ;;
  *) .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" ;;
esac
.venv/bin/python -m pip install -q -e ".[${extras}]"
.venv/bin/python -c "import kdpipe, torch, onnxruntime, mlflow, optuna"
case ",${1:-}," in *,vision,*) .venv/bin/python -c "import torchvision, timm, transformers" ;; esac
