"""Loading weights into a built model: safetensors or a torch state dict read weights-only (no pickled code
runs), inside a {"state_dict": ...} or {"model": ...} wrapper or not, with or without DataParallel's `module.`."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kdpipe.errors import InputError

WRAPPERS = ("state_dict", "model")


def read_state_dict(path: Path, key: str) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise InputError(key, f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error type for a damaged file
            raise InputError(key, f"cannot read {path} as safetensors: {str(exc).splitlines()[0]}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(key, f"cannot load {path} as a weights-only state dict: {str(exc).splitlines()[0]}") from None
    while isinstance(state, dict) and any(isinstance(state.get(w), dict) for w in WRAPPERS):
        state = next(state[w] for w in WRAPPERS if isinstance(state.get(w), dict))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(key, f"{path} holds a {type(state).__name__}, expected a state dict of tensors")
    return state


def _align(state: dict[str, torch.Tensor], own: dict) -> dict[str, torch.Tensor]:
    """Strip `module.` (DataParallel/DDP) and add or drop the `model.` of kdpipe's output wrapper, whichever
    makes the keys match the model's."""
    stripped = {k.removeprefix("module."): v for k, v in state.items()}
    candidates = [stripped, {f"model.{k}": v for k, v in stripped.items()},
                  {k.removeprefix("model."): v for k, v in stripped.items()}]
    return max(candidates, key=lambda c: len(own.keys() & c.keys()))


def load_weights(model: nn.Module, path: Path, key: str, heads: list[str] = (), reset_head: bool = False) -> None:
    """Load `path` into `model`; every key must fit. `heads`: the classifier's module paths; with `reset_head`
    their weights stay freshly initialized where the shapes differ (the class count changed)."""
    own = model.state_dict()
    state = _align(read_state_dict(path, key), own)
    in_head = lambda k: any(k == h or k.startswith(h + ".") for h in heads)  # noqa: E731
    if reset_head:
        state = {k: v for k, v in state.items() if not (in_head(k) and k in own and tuple(v.shape) != tuple(own[k].shape))}
        state.update({k: v for k, v in own.items() if in_head(k) and k not in state})
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            k = mismatched[0]
            parts.append(f"{len(mismatched)} shape mismatch(es), first {k}: file {tuple(state[k].shape)} vs model "
                         f"{tuple(own[k].shape)}")
        if missing:
            parts.append(f"{len(missing)} missing key(s), first {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), first {unexpected[0]}")
        head_only = mismatched and all(in_head(k) for k in mismatched) and not reset_head
        hint = "; only the classifier differs: set reset_head: true to replace it" if head_only else ""
        raise InputError(key, f"{path} does not fit the model: {'; '.join(parts)}{hint}")
    model.load_state_dict(state)

