"""kdpipe: knowledge distillation from a trained classifier to a small, validated ONNX student."""

__version__ = "0.1.0"
