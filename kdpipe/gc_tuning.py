"""Python's cyclic garbage collector, kept from scanning again and again what a run imports.

A run imports torch, torch._dynamo, MLflow and the ONNX exporter: millions of objects that live as long as the
process, which each full collection scans again (10 collections, 2.2 s of the default pipeline's run on 2 cores)
and which the interpreter's teardown collects once more before the process exits (2.4 s). `gc.freeze()` moves
every object alive to a permanent generation that no collection scans; garbage made after it is collected as
before. benchmarks/startup.py measures a run with and without it; KDPIPE_GC_FREEZE=0 leaves the collector alone.
"""

from __future__ import annotations

import contextlib
import gc
import os

SWITCH = "KDPIPE_GC_FREEZE"


def enabled() -> bool:
    return os.environ.get(SWITCH, "1") != "0"


def freeze() -> None:
    """Leave what is alive now out of every later collection (and out of the teardown's)."""
    if enabled():
        gc.freeze()


@contextlib.contextmanager
def imports_uncollected():
    """No collection while a burst of imports runs (it makes long-lived objects, not garbage); what it made is
    frozen after. A collector the caller had disabled stays disabled."""
    if not enabled():
        yield
        return
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
        gc.freeze()


@contextlib.contextmanager
def frozen_while_running():
    """What is alive on entering is frozen; on leaving, everything frozen returns to the collector, so a process
    that goes on (a test session, a notebook running several pipelines, a multi-seed parent between its seeds)
    collects a finished run's objects once they are garbage. (gc has one permanent generation: what a process froze
    itself is unfrozen too; KDPIPE_GC_FREEZE=0 keeps kdpipe's hands off it.)"""
    freeze()
    try:
        yield
    finally:
        if enabled():
            gc.unfreeze()
