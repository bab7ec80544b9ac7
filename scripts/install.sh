#!/usr/bin/env bash
# Create .venv and install kdpipe into it with a CPU build of torch.
# Usage: bash scripts/install.sh [extra,...]   e.g. dev, vision, postgres, openvino; the cpu extra (onnxruntime) is added
#        unless gpu (onnxruntime-gpu) is named.
# TORCH_SPEC overrides the torch requirement (default torch==2.13.0, which this project's machines hold as a CPU build).
# TORCH_SPEC=keep installs no torch (nor torchvision): .venv sees the interpreter's own packages (a GPU image's CUDA
# build of torch) and keeps the torch it finds there or already in .venv, if kdpipe's bounds allow it.
# With the vision extra, unless .venv already imports torch with torchvision, both come from the package registry
# itself (bypassing this machine's pip configuration): torchvision 0.28.0 does not import with the local CPU build of
# torch ("torchvision::nms does not exist"), and the registry's torch 2.13.0 runs on CPU too (about 5 GB).
set -euo pipefail
cd "$(dirname "$0")/.."
case ",${1:-}," in *,gpu,*) extras="$1" ;; *) extras="cpu${1:+,$1}" ;; esac
if [ "${TORCH_SPEC:-}" = keep ]; then
  [ -x .venv/bin/python ] || python3 -m venv --system-site-packages .venv
  .venv/bin/python -c "import torch" || { echo "TORCH_SPEC=keep: no torch to keep in .venv or $(command -v python3)" >&2; exit 2; }
else
  [ -x .venv/bin/python ] || python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first, so the resolver keeps it instead of pulling a multi-GB CUDA build.
case ",${1:-},${TORCH_SPEC:-}" in
  *,keep) ;;
  *,vision,*)
    if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then  # a working pair stays
      env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null .venv/bin/python -m pip install -q --force-reinstall \
        "${TORCH_SPEC:-torch==2.13.0}" torchvision==0.28.0
    fi ;;
  *) .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" ;;
esac
before=$(.venv/bin/python -c "import torch; print(torch.__version__)")
.venv/bin/python -m pip install -q -e ".[${extras}]"
after=$(.venv/bin/python -c "import torch; print(torch.__version__)")
[ "$before" = "$after" ] || echo "note: installing kdpipe replaced torch $before with $after (kdpipe needs a newer one)" >&2
.venv/bin/python -c "import kdpipe, torch, onnxruntime, mlflow, optuna"
case ",${1:-}," in *,vision,*) .venv/bin/python -c "import torchvision, timm, transformers" ;; esac
case ",${1:-}," in *,openvino,*) .venv/bin/python -c "import openvino" ;; esac
