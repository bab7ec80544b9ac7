"""The versions a run used: kdpipe's own and those of the libraries that decide its results."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

# (report key, distributions that provide it, first one installed wins): onnxruntime-gpu provides `onnxruntime`.
# The table of supported versions (docs/reference/versions.md) names the same libraries; CI prints these for both of
# its environments.
LIBRARIES = [("torch", ["torch"]), ("onnxruntime", ["onnxruntime", "onnxruntime-gpu"]), ("mlflow", ["mlflow"]),
             ("onnx", ["onnx"]), ("onnxscript", ["onnxscript"]), ("numpy", ["numpy"]), ("optuna", ["optuna"]),
             ("pydantic", ["pydantic"]), ("Pillow", ["Pillow"]), ("kornia", ["kornia"]), ("datasets", ["datasets"]),
             ("openvino", ["openvino"])]


def _installed(distributions: list[str]) -> str | None:
    for name in distributions:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def versions() -> dict[str, str | None]:
    """kdpipe, python and each library in LIBRARIES as installed (None when absent); read from the installed
    distributions' metadata, so nothing heavy is imported."""
    return {"kdpipe": _installed(["kdpipe"]), "python": platform.python_version(),
            **{key: _installed(dists) for key, dists in LIBRARIES}}
