"""Every way to name a model resolves here: zoo name, user entry point, and checkpoint loading."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from kdpipe.errors import InputError
from kdpipe.models.zoo import CNN, MLP, ResNet

ZOO: dict[str, type[nn.Module]] = {"mlp": MLP, "cnn": CNN, "resnet": ResNet}


def build_model(cfg, key: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build the model a `model:` section names and check that it maps inputs to `num_classes` logits.

    `key` is the section's dotted path ("teacher.model"), used in error messages.
    """
    try:
        if cfg.arch is not None:
            model = ZOO[cfg.arch](input_shape, num_classes, width=cfg.width, depth=cfg.depth, **cfg.kwargs)
        else:
            model = _from_entrypoint(cfg.entrypoint, key, input_shape, num_classes, cfg.kwargs)
    except InputError as exc:
        raise InputError(f"{key}.{exc.key.removeprefix('model.')}", exc.message) from None
    except TypeError as exc:
        raise InputError(f"{key}.kwargs", f"the model does not accept these arguments: {exc}") from None
    check_outputs(model, key, input_shape, num_classes)
    return model


def _from_entrypoint(spec: str, key: str, input_shape, num_classes: int, kwargs: dict) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"{key}.entrypoint", f"cannot import '{spec}': {exc}") from None
    model = factory(input_shape=tuple(input_shape), num_classes=num_classes, **kwargs)
    if not isinstance(model, nn.Module):
        raise InputError(f"{key}.entrypoint", f"'{spec}' returned {type(model).__name__}, expected a torch.nn.Module")
    return model


def check_outputs(model: nn.Module, key: str, input_shape, num_classes: int) -> None:
    """A dry forward pass: the model must accept the data's samples and give one logit per class."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape))
    except Exception as exc:
        raise InputError(key, f"the model cannot take samples of shape {tuple(input_shape)}: {exc}") from None
    finally:
        model.train(was_training)
    if out.ndim != 2 or out.shape[1] != num_classes:
        raise InputError(key, f"the model gives outputs of shape {tuple(out.shape[1:])} per sample, but the data's labels have {num_classes} classes")


def load_checkpoint(model: nn.Module, path: Path, key: str) -> None:
    """Load a state dict saved with torch.save, with weights_only=True (no pickled code runs)."""
    if not Path(path).is_file():
        raise InputError(key, f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(key, f"cannot load {path} as a weights-only state dict: {str(exc).splitlines()[0]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InputError(key, f"{path} holds a {type(state).__name__}, expected a state dict")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            k = mismatched[0]
            parts.append(f"{len(mismatched)} shape mismatch(es), e.g. {k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
        raise InputError(key, f"{path} does not fit the model: {'; '.join(parts)}")
    model.load_state_dict(state)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
