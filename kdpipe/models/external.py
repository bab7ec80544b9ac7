"""Models named by library: `timm:NAME`, `torchvision:NAME` (the `vision` extra) and `hf:DIR` (a local
`save_pretrained` directory of a transformers image classifier). Nothing is downloaded: timm and torchvision
models are built with random weights (load yours with `weights:`), transformers reads only local files."""

from __future__ import annotations

import difflib
import importlib
from pathlib import Path

from torch import nn

from kdpipe.errors import InputError

PREFIXES = ("timm:", "torchvision:", "hf:")
TORCHVISION_HEADS = ("fc", "classifier", "heads", "head")


class Logits(nn.Module):
    """Makes a model whose forward returns an output object (transformers) return its `.logits` tensor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        return out["logits"] if isinstance(out, dict) else out.logits


def _library(name: str, key: str):
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        extra = "vision"
        raise InputError(key, f"{name} cannot be imported ({exc}): pip install 'kdpipe[{extra}]'") from None


def _unknown(kind: str, name: str, known: list[str], key: str) -> InputError:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    return InputError(key, f"{kind} has no model '{name}'{hint}")


def build_timm(name: str, key: str, input_shape, num_classes: int, kwargs: dict) -> tuple[nn.Module, list[str], list[str]]:
    """(model, classifier module paths, stage-end taps from feature_info)."""
    timm = _library("timm", f"{key}.arch")
    if not timm.is_model(name.split(".")[0]):
        raise _unknown("timm", name, timm.list_models(), f"{key}.arch")
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=input_shape[0], **kwargs)
    head = model.pretrained_cfg.get("classifier") or []
    heads = [head] if isinstance(head, str) else list(head)
    stages = [info["module"] for info in getattr(model, "feature_info", []) or []]
    return model, heads, stages


def build_torchvision(name: str, key: str, input_shape, num_classes: int, kwargs: dict) -> tuple[nn.Module, list[str], list[str]]:
    torchvision = _library("torchvision", f"{key}.arch")
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise _unknown("torchvision", name, known, f"{key}.arch")
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    heads = [h for h in TORCHVISION_HEADS if isinstance(getattr(model, h, None), nn.Module)][:1]
    # ResNet-family stages by name; every other family by the dry pass (kdpipe.models.taps_default).
    stages = [f"layer{i}" for i in range(1, 5) if hasattr(model, f"layer{i}")]
    return model, heads, stages


def build_hf(directory: str, key: str, num_classes: int, reset_head: bool, kwargs: dict) -> nn.Module:
    transformers = _library("transformers", f"{key}.arch")
    if not (Path(directory) / "config.json").is_file():
        raise InputError(f"{key}.arch", f"{directory} is not a save_pretrained directory: it has no config.json")
    try:
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    except Exception as exc:  # transformers raises several types for an unreadable config
        raise InputError(f"{key}.arch", f"cannot read {directory}/config.json: {str(exc).splitlines()[0]}") from None
    if config.num_labels != num_classes and not reset_head:
        raise InputError(f"{key}.reset_head", f"{directory} classifies {config.num_labels} classes but the data has "
                                              f"{num_classes}; set reset_head: true to replace its classifier")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its load report (a replaced head) would break one-line output
    try:
        model = transformers.AutoModelForImageClassification.from_pretrained(
            directory, local_files_only=True, num_labels=num_classes, ignore_mismatched_sizes=reset_head, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"{key}.arch", f"cannot load {directory} as a transformers image classifier: "
                                        f"{str(exc).splitlines()[0]}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    return Logits(model)
