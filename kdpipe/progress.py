"""Progress on stderr: a bar per stage and epoch on a terminal, plain lines otherwise (CI logs)."""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager

from kdpipe.report import number_or_na


class Progress:
    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self._bar = None
        self._task = None
        self._label = None

    def info(self, message: str) -> None:
        self._print(message)

    def _print(self, message: str) -> None:
        if self._bar is not None:
            self._bar.console.print(message, highlight=False, markup=False)
        else:
            print(message, file=self.stream, flush=True)

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        if self.live:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bars, TextColumn, TimeElapsedColumn

            self._bar = Bars(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[metrics]}"), TimeElapsedColumn(),
                             console=Console(file=self.stream), transient=True)
            self._bar.start()
        else:
            self._print(f"[{name}] started")
        try:
            yield
        finally:
            if self._bar is not None:
                self._bar.stop()
                self._bar = self._task = self._label = None
            self._print(f"[{name}] done in {time.perf_counter() - start:.1f}s")

    def epoch(self, label: str, epoch: int, epochs: int, metrics: dict[str, float]) -> None:
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        if self._bar is None:
            self._print(f"  {label} epoch {epoch}/{epochs}  {shown}")
            return
        if self._label != label:
            self._task = self._bar.add_task(label, total=epochs, metrics="")
            self._label = label
        self._bar.update(self._task, completed=epoch, metrics=shown)

    def gate_table(self, gates) -> None:
        if not gates:
            return
        width = max(len(g.name) for g in gates)
        self._print(f"{'gate':<{width}}  {'value':>12}  {'limit':>12}  result")
        for g in gates:
            self._print(f"{g.name:<{width}}  {number_or_na(g.value):>12}  {g.limit:>12.6g}  {'passed' if g.passed else 'FAILED'}")

    @contextmanager
    def http_retries(self, server: str):
        """Print a line each time MLflow's HTTP client retries a request: its retries are otherwise silent, and a
        server that is down looks like a hung run. urllib3 logs each retry as a warning."""
        handler = _RetryLine(self, server)
        logger = logging.getLogger("urllib3.connectionpool")
        logger.addHandler(handler)
        try:
            yield
        finally:
            logger.removeHandler(handler)


class _RetryLine(logging.Handler):
    def __init__(self, progress: Progress, server: str):
        super().__init__(logging.WARNING)
        self.progress = progress
        self.server = server

    def emit(self, record: logging.LogRecord) -> None:
        # urllib3: "Retrying (%r) after connection broken by '%r': %s" % (retry, error, url path)
        if not str(record.msg).startswith("Retrying") or len(record.args or ()) < 3:
            return
        retry, error, path = record.args[:3]
        left = getattr(retry, "total", None)
        self.progress.info(f"  MLflow server {self.server} did not answer {path} ({type(error).__name__}); "
                           f"retrying, {left} retries left")
