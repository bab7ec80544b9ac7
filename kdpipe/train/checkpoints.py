"""Checkpoints: a phase's state after each epoch (`checkpoints/<stage>/<n>-<phase>.pt`, for resume) and a trained
method (`student.pt`, a search trial's student), each layout written here alone.

A method checkpoint holds the method's whole module tree (`state`: student, regressors, discriminator, peers,
generations) and, for readers that want only the model, the exported module's weights (`student`). The previous
release wrote `{"student", "extra"}`: it is read when it covers the method's tree, else refused in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdpipe.atomic import save_torch
from kdpipe.errors import InputError

METHOD_FORMAT = 2


def save_method(method: nn.Module, path: Path) -> None:
    save_torch({"format": METHOD_FORMAT, "method": method.name, "student": method.exported().state_dict(),
                "state": method.state_dict()}, path)


def load_method(method: nn.Module, path: Path, device: torch.device) -> None:
    """Load a method checkpoint into `method` (built as the one that wrote it); InputError naming `--resume` for an
    earlier layout that does not hold every module the method trains."""
    saved = torch.load(path, map_location=device, weights_only=True)
    if saved.get("format") == METHOD_FORMAT:
        method.load_state_dict(saved["state"])
        return
    state = {f"student.{k}": v for k, v in saved["student"].items()}
    extra = method.extra_modules()
    names = {id(child): name for name, child in method.named_children()}
    if extra is not None and "extra" in saved and id(extra) in names:
        state.update({f"{names[id(extra)]}.{k}": v for k, v in saved["extra"].items()})
    try:
        method.load_state_dict(state)
    except RuntimeError:
        raise InputError("--resume", f"{path} cannot be restored: an earlier kdpipe wrote it in a layout that does "
                         f"not hold every module method '{method.name}' trains") from None


class PhaseCheckpoint:
    """A phase's modules, optimizers, schedules, scalers, EMA, data order and random state after an epoch."""

    def __init__(self, path: Path, device: torch.device):
        self.path, self.device = path, device

    def exists(self) -> bool:
        return self.path.is_file()

    def save(self, state: dict[str, Any], modules: list[nn.Module], updates, generator, emas) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        save_torch({
            **state,
            "modules": [m.state_dict() for m in modules],
            "optimizers": [u.optimizer.state_dict() for u in updates],
            "schedules": [u.schedule.state_dict() if u.schedule is not None else None for u in updates],
            "scalers": [u.scaler.state_dict() if u.scaler is not None else None for u in updates],
            "ema": [e.state_dict() for e in emas],
            "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
        }, self.path)

    def restore(self, modules: list[nn.Module], updates, generator, emas) -> dict[str, Any]:
        """Load everything back; returns the loop's state (epoch, best, metrics, finished). A checkpoint of the
        previous release has no EMA: the EMA then starts from the restored weights."""
        saved = torch.load(self.path, map_location=self.device, weights_only=True)
        for module, module_state in zip(modules, saved["modules"]):
            module.load_state_dict(module_state)
        for u, opt_state, schedule_state, scaler_state in zip(updates, saved["optimizers"], saved["schedules"],
                                                              saved["scalers"]):
            u.optimizer.load_state_dict(opt_state)
            if u.schedule is not None and schedule_state is not None:
                u.schedule.load_state_dict(schedule_state)
            if u.scaler is not None and scaler_state is not None:
                u.scaler.load_state_dict(scaler_state)
        for ema, ema_state in zip(emas, saved.get("ema") or []):
            ema.load_state_dict(ema_state)
        for ema in emas[len(saved.get("ema") or []):]:
            ema.reset()
        generator.set_state(saved["generator"].cpu())
        torch.set_rng_state(saved["torch_rng"].cpu())
        if saved["cuda_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all([s.cpu() for s in saved["cuda_rng"]])
        return {k: saved[k] for k in ("epoch", "best", "metrics", "finished")}
