"""Extensions from other installed packages, through entry points: `kdpipe.methods` (a Method subclass),
`kdpipe.sources` (a kdpipe.data.sources.SourceKind), `kdpipe.augment` (a kdpipe.data.augment.AugmentKind).

The entry point's name is the name a pipeline file uses. Each registry loads its group once and merges it with
its built-ins; an entry that clashes with a built-in name, fails to import or is not what its group takes is
left out with one line on stderr, so one broken plugin cannot take kdpipe's own parts down with it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Collection
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

BUILT_IN = "kdpipe"
GROUPS = ("kdpipe.methods", "kdpipe.sources", "kdpipe.augment")
_LOADED: dict[str, dict[str, str]] = {}  # group -> name -> origin of each plugin loaded


@dataclass(frozen=True)
class Plugin:
    name: str
    value: Any
    origin: str  # the distribution that provides it, with its version


def _refuse(group: str, name: str, origin: str, why: str) -> None:
    print(f"kdpipe: warning: entry point '{name}' of {group} (from {origin}) is not loaded: {why}", file=sys.stderr)


def load_plugins(group: str, built_in: Collection[str], accepts: Callable[[str, Any], bool],
                 expected: str) -> list[Plugin]:
    """The entry points of `group`, loaded, that neither clash with `built_in` nor fail `accepts(name, value)`
    (which `expected` describes), in name order."""
    found = []
    for entry in sorted(entry_points(group=group), key=lambda e: e.name):
        origin = f"{entry.dist.name} {entry.dist.version}" if entry.dist is not None else entry.value
        if entry.name in built_in:
            _refuse(group, entry.name, origin, f"'{entry.name}' is one of kdpipe's own; the plugin must use another name")
            continue
        try:
            value = entry.load()
        except Exception as exc:  # noqa: BLE001 - any error of foreign code at import: reported, kdpipe goes on
            _refuse(group, entry.name, origin, f"{entry.value} fails to import: {type(exc).__name__}: {exc}")
            continue
        if not accepts(entry.name, value):
            _refuse(group, entry.name, origin, f"{entry.value} is not {expected}")
            continue
        found.append(Plugin(entry.name, value, origin))
        _LOADED.setdefault(group, {})[entry.name] = origin
    return found


def loaded(group: str) -> dict[str, str]:
    """The plugins of `group` loaded so far (each registry loads its group once), with where each comes from."""
    return dict(_LOADED.get(group, {}))
