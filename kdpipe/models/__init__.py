"""Every way to name a model resolves here: zoo name, `timm:`/`torchvision:`/`hf:` name, user entry point, and
weights (`weights:`, `teacher.checkpoint`)."""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn

from kdpipe.errors import InputError
from kdpipe.models import external
from kdpipe.models.cifar import CIFAR_ZOO
from kdpipe.models.taps_default import discover
from kdpipe.models.weights import load_weights
from kdpipe.models.zoo import CNN, MLP, ResNet

SIZED = {"mlp": MLP, "cnn": CNN, "resnet": ResNet}  # take width and depth
ZOO = {**SIZED, **CIFAR_ZOO}


def build_model(cfg, key: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build the model a `model:` section names, load its `weights:`, and check that it maps inputs to
    `num_classes` logits. Sets `default_taps` and `embedding_tap` where the model does not declare them.

    `key` is the section's dotted path ("teacher.model"), the prefix of every error key.
    """
    arch, heads, stages = cfg.arch or "", [], None
    # Compared with the defaults, not with the keys given: a run directory's pipeline.yaml spells out every key.
    fixed = [n for n in ("depth", "width") if getattr(cfg, n) != type(cfg).model_fields[n].default]
    if fixed and arch not in SIZED:
        name = fixed[0]
        raise InputError(f"{key}.{name}", f"'{arch or cfg.entrypoint}' has a fixed size: width and depth apply to "
                                          f"{', '.join(SIZED)}")
    try:
        if cfg.entrypoint is not None:
            model = _from_entrypoint(cfg.entrypoint, key, input_shape, num_classes, cfg.kwargs)
        elif arch.startswith("timm:"):
            model, heads, stages = external.build_timm(arch[5:], key, input_shape, num_classes, cfg.kwargs)
        elif arch.startswith("torchvision:"):
            model, heads, stages = external.build_torchvision(arch[12:], key, input_shape, num_classes, cfg.kwargs)
        elif arch.startswith("hf:"):
            model, heads = external.build_hf(arch[3:], key, num_classes, cfg.reset_head, cfg.kwargs), ["model.classifier"]
        else:
            model, heads = _from_zoo(cfg, key, input_shape, num_classes), ["fc"]
    except TypeError as exc:
        raise InputError(f"{key}.kwargs", f"the model does not accept these arguments: {exc}") from None
    if cfg.weights is not None:
        load_weights(model, cfg.weights, f"{key}.weights", heads, cfg.reset_head)
    model = as_classifier(model, key, input_shape)
    check_outputs(model, key, input_shape, num_classes)
    discover(model, tuple(input_shape), stages)
    return model


def _from_zoo(cfg, key: str, input_shape, num_classes: int) -> nn.Module:
    try:
        if cfg.arch in SIZED:
            return SIZED[cfg.arch](input_shape, num_classes, width=cfg.width, depth=cfg.depth, **cfg.kwargs)
        return CIFAR_ZOO[cfg.arch](input_shape, num_classes, **cfg.kwargs)
    except InputError as exc:  # zoo models name their own keys relative to the section ("model.depth")
        raise InputError(f"{key}.{exc.key.removeprefix('model.')}", exc.message) from None


def _import_entrypoint(module_name: str, key: str):
    """`file.py` is imported from that file; `FOLDER:package.module` (what config loading makes of a dotted name:
    the pipeline file's folder) with FOLDER first on sys.path for the import only; a bare dotted name from sys.path."""
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ImportError(f"no file {path}")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        folder, _, dotted = module_name.rpartition(":")
        if not folder:
            return importlib.import_module(dotted)
        _forget_modules_from_elsewhere(dotted.partition(".")[0], Path(folder))
        sys.path.insert(0, folder)
        try:
            return importlib.import_module(dotted)
        finally:
            sys.path.remove(folder)
    except Exception as exc:  # the user's module may raise anything while it imports
        folder, _, dotted = module_name.rpartition(":")
        where = f" (looked in {folder} first, then on sys.path)" if folder else ""
        raise InputError(f"{key}.entrypoint", f"cannot import '{dotted}'{where}: {type(exc).__name__}: {exc}") from None


def _forget_modules_from_elsewhere(top: str, folder: Path) -> None:
    """Drop `top` (and its submodules) from the import cache when it was imported from another folder (an earlier
    pipeline in this process with a module of the same name), so that the pipeline's own folder is the one read."""
    found = importlib.machinery.PathFinder.find_spec(top, [str(folder)])
    cached = sys.modules.get(top)
    if found is None or cached is None or getattr(cached, "__spec__", None) is None \
            or cached.__spec__.origin == found.origin:
        return
    for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
        del sys.modules[name]


def _from_entrypoint(spec: str, key: str, input_shape, num_classes: int, kwargs: dict) -> nn.Module:
    module_name, _, attr = spec.rpartition(":")
    factory = getattr(_import_entrypoint(module_name, key), attr, None)
    if not callable(factory):
        raise InputError(f"{key}.entrypoint", f"'{module_name}' has no callable '{attr}'")
    # Factories differ in what they take: the input shape and class count, the class count, or nothing.
    attempts = [{"input_shape": tuple(input_shape), "num_classes": num_classes}, {"num_classes": num_classes}, {}]
    for i, extra in enumerate(attempts):
        try:
            model = factory(**extra, **kwargs)
            break
        except TypeError:
            if i == len(attempts) - 1:
                raise
    if not isinstance(model, nn.Module):
        raise InputError(f"{key}.entrypoint", f"'{spec}' returned {type(model).__name__}, expected a torch.nn.Module")
    return model


def as_classifier(model: nn.Module, key: str, input_shape) -> nn.Module:
    """The model itself when its forward returns a tensor; wrapped to return `.logits` when it returns an output
    object with logits (a transformers model from an entry point)."""
    out = _dry_forward(model, key, input_shape)
    if isinstance(out, torch.Tensor):
        return model
    logits = out.get("logits") if isinstance(out, dict) else getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return external.Logits(model)
    raise InputError(key, f"the model returns a {type(out).__name__}, expected a tensor of logits (or an object with .logits)")


def check_outputs(model: nn.Module, key: str, input_shape, num_classes: int) -> None:
    """A dry forward pass: the model must accept the data's samples and give one logit per class."""
    out = _dry_forward(model, key, input_shape)
    if not isinstance(out, torch.Tensor):
        raise InputError(key, f"the model returns a {type(out).__name__}, expected a tensor of logits")
    if out.ndim != 2 or out.shape[1] != num_classes:
        raise InputError(key, f"the model gives outputs of shape {tuple(out.shape[1:])} per sample, but the data's labels have {num_classes} classes")


def _dry_forward(model: nn.Module, key: str, input_shape):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(torch.zeros(2, *input_shape))
    except Exception as exc:
        raise InputError(key, f"the model cannot take samples of shape {tuple(input_shape)}: {exc}") from None
    finally:
        model.train(was_training)


def load_checkpoint(model: nn.Module, path: Path, key: str) -> None:
    """`teacher.checkpoint`: the same loader as `weights:` (weights-only, wrappers and `module.` accepted)."""
    load_weights(model, path, key)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
