"""What holds a run together while it works: the run directory's lock, signals that end it as killed, and the
trackers through which ranks talk (or, other than rank 0, do not talk) to MLflow."""

from __future__ import annotations

import contextlib
import secrets
import signal
import threading
from datetime import datetime, timezone
from pathlib import Path

from kdpipe.errors import InputError, RunInterrupted
from kdpipe.locks import Busy, file_lock
from kdpipe.tracking import Tracker

RUN_LOCK = "run.lock"  # held by the process working in a run directory
STOPPED_AFTER_TAG = "kdpipe.stopped_after"


class SilentTracker:
    """The tracker of ranks other than 0 under torchrun: they train, rank 0 alone talks to MLflow."""

    run_id = None

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


class ResumedTracker:
    """A Tracker continuing an interrupted MLflow run: metric steps the run already holds are not logged again."""

    def __init__(self, tracker: Tracker, run_id: str):
        tracker.resume(run_id)
        client = tracker.client()
        self.tracker = tracker
        run = client.get_run(run_id)
        self.logged = {key: max(m.step for m in client.get_metric_history(run_id, key)) for key in run.data.metrics}
        if STOPPED_AFTER_TAG in run.data.tags:  # an earlier `--until` stopped it; this invocation goes on
            client.delete_tag(run_id, STOPPED_AFTER_TAG)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        fresh = {k: v for k, v in metrics.items() if (step or 0) > self.logged.get(k, -1)}
        if fresh:
            self.tracker.log_metrics(fresh, step=step)

    def __getattr__(self, name: str):
        return getattr(self.tracker, name)


@contextlib.contextmanager
def lock_run_dir(run_dir: Path):
    """Hold the run directory for this process: a second process resuming it at the same time would train and log
    the same stages twice. InputError (exit 2) when another process holds it."""
    try:
        with file_lock(Path(run_dir) / RUN_LOCK, wait=False):
            yield
    except Busy as busy:
        raise InputError("--resume", f"{run_dir} is in use by another kdpipe process (pid {busy.holder or 'unknown'}); "
                                     "wait for it to end") from None


@contextlib.contextmanager
def signals_interrupt_the_run():
    """SIGTERM and SIGINT raise RunInterrupted in the main thread, so the run's failure handler records the run as
    killed (report.json, MLflow status KILLED) instead of the process vanishing with its MLflow run RUNNING."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    watched = (signal.SIGTERM, signal.SIGINT)

    def interrupt(signum, frame):
        for number in watched:  # the handler's cleanup runs once, uninterrupted by a repeated signal
            signal.signal(number, signal.SIG_IGN)
        raise RunInterrupted(signum)

    previous = {number: signal.signal(number, interrupt) for number in watched}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def new_run_id() -> str:
    """A run directory's name: its UTC start time and 4 random hex digits (runs started in the same second differ)."""
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)
