"""`python -m kdpipe ARGS` as real processes that skip the imports: forked from a server that made them once.

A kdpipe run in a fresh process spends about 10 s importing torch, torch._dynamo, MLflow, onnxscript and
onnxruntime before it reads its pipeline; the suite starts over a hundred of them (kills, resumes, exit codes).
Each test worker starts one server (`python tests/forkserver.py SOCKET`) that imports those once and then forks a
child per request. The child is a real process with its own pid, signals, file descriptors 0-2, working
directory and environment; it runs `kdpipe/__main__.py` as `python -m kdpipe` does and ends the way that
interpreter would (its exit code, or the signal that killed it). The server's child is the kdpipe process itself,
so `kill()` delivers a real SIGKILL to it.

What a fork cannot honour is a change to how Python imports: a request whose environment differs from the
server's in a PYTHON* variable (a plugin on PYTHONPATH, a sitecustomize shim) runs in a fresh interpreter instead.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

# What a kdpipe run imports that costs: imported by the server before it forks anything.
PRELOAD = ["torch", "torch._dynamo", "torch.export", "torch.onnx", "onnxscript", "onnx", "onnxruntime",
           "onnxruntime.quantization", "mlflow", "mlflow.onnx", "mlflow.store.tracking.sqlalchemy_store",
           "mlflow.store.model_registry.sqlalchemy_store", "optuna", "kornia", "safetensors.torch",
           "kdpipe.cli", "kdpipe.runner", "kdpipe.stages", "kdpipe.search", "kdpipe.train", "kdpipe.deploy",
           "kdpipe.quantize", "kdpipe.qat", "kdpipe.registry", "kdpipe.methods", "kdpipe.models", "kdpipe.data"]


# --- the server (its own process) ---------------------------------------------------------------------------------

def serve(path: str) -> dict:
    """Accept requests on the UNIX socket `path`; fork a child per request; report each child's pid, then its exit
    code, on the request's connection. Returns only in a forked child, with that child's request."""
    import importlib

    for module in PRELOAD:
        importlib.import_module(module)
    # The preloaded objects never become garbage: out of the collector's sight, a child's collections do not touch
    # (and so copy) every page the server filled.
    gc.collect()
    gc.freeze()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    print("ready", flush=True)
    children: dict[int, socket.socket] = {}
    while True:
        readable, _, _ = select.select([listener], [], [], 0.02)
        if readable:
            conn, _ = listener.accept()
            message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
            if not message:  # the owner closed the server's socket: stop
                return {}
            request = json.loads(message)
            pid = os.fork()
            if pid == 0:
                listener.close()
                for other in children.values():
                    other.close()
                conn.close()
                for fd, target in zip(fds, (0, 1, 2)):
                    os.dup2(fd, target)
                for fd in fds:
                    os.close(fd)
                return request
            for fd in fds:
                os.close(fd)
            conn.sendall(f"{pid}\n".encode())
            children[pid] = conn
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = children.pop(pid)
            try:
                conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
            except OSError:  # the test went away without waiting
                pass
            conn.close()


def become(request: dict) -> None:
    """Turn this forked child into `python -m kdpipe ARGS` in the request's directory and environment."""
    import runpy

    import torch

    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    # torch read OMP_NUM_THREADS when the server imported it (one thread); a fresh process would read the child's.
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
    sys.argv = [str(Path(__import__("kdpipe").__file__).with_name("__main__.py")), *request["args"]]
    sys.path[0] = os.getcwd()  # as `python -m` sets it
    try:
        runpy.run_module("kdpipe", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else _print_exit_message(exc.code)
    except KeyboardInterrupt:
        traceback.print_exc()
        code = -signal.SIGINT  # the interpreter ends itself with SIGINT
    except BaseException:  # noqa: BLE001 - what the interpreter prints before it exits 1
        traceback.print_exc()
        code = 1
    end(code)


def _print_exit_message(message) -> int:
    print(message, file=sys.stderr)
    return 1


def end(code: int) -> None:
    """Exit as the interpreter would (threads joined, atexit handlers run, streams flushed) but without tearing
    down every module the server loaded, which costs seconds and touches (copies) most of its memory."""
    threading._shutdown()  # noqa: SLF001 - the interpreter's own first step at exit: join non-daemon threads
    atexit._run_exitfuncs()  # noqa: SLF001
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code & 0xFF)


# --- the client (in the test process) -----------------------------------------------------------------------------

def _import_environment(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith("PYTHON")}


class ForkServer:
    """One server per test process, started on first use (about 10 s, once)."""

    def __init__(self, directory: Path):
        self.path = str(directory / "forkserver.sock")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # no native thread pools in the server: they do not survive fork
        self.env = env
        self.process = subprocess.Popen([sys.executable, __file__, self.path], stdout=subprocess.PIPE, text=True,
                                        env=env, cwd=directory)
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the fork server did not start (exit code {self.process.wait()})")

    def accepts(self, env: dict[str, str]) -> bool:
        return _import_environment(env) == _import_environment(self.env)

    def spawn(self, args: list[str], env: dict[str, str], cwd: Path | str, stdout, stderr) -> Forked:
        """`python -m kdpipe ARGS` forked, its stdout and stderr on the given file descriptors."""
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self.path)
        with open(os.devnull, "rb") as null:
            request = {"args": [str(a) for a in args], "env": env, "cwd": str(cwd)}
            socket.send_fds(conn, [json.dumps(request).encode()], [null.fileno(), stdout, stderr])
        return Forked(conn, args)

    def close(self) -> None:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.connect(self.path)
                socket.send_fds(conn, [b""], [])
            self.process.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()


class Forked:
    """The subprocess.Popen interface the tests use, for a forked child: pid, poll, wait, signals, communicate."""

    def __init__(self, conn: socket.socket, args: list[str]):
        self.args = args
        self._conn = conn
        self._lines = conn.makefile("r")
        self.pid = int(self._lines.readline())
        self.returncode: int | None = None
        self.stdout = self.stderr = None

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self._conn], [], [], 0)[0]:
            self._read_status()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if not select.select([self._conn], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self._read_status()
        return self.returncode

    def _read_status(self) -> None:
        self.returncode = int(self._lines.readline())
        self._lines.close()
        self._conn.close()

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str | None, str | None]:
        """Read stdout and stderr to their ends (each in a thread, as Popen does) and wait for the exit code."""
        deadline = None if timeout is None else time.monotonic() + timeout
        outputs: dict[str, str] = {}
        readers = [threading.Thread(target=lambda n=name, f=stream: outputs.__setitem__(n, f.read()), daemon=True)
                   for name, stream in (("stdout", self.stdout), ("stderr", self.stderr)) if stream is not None]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if reader.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return outputs.get("stdout"), outputs.get("stderr")


def start(server: ForkServer, args, env: dict[str, str], cwd=None) -> Forked:
    """A forked `python -m kdpipe ARGS` with text pipes for stdout and stderr, like Popen(stdout=PIPE, stderr=PIPE)."""
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    try:
        proc = server.spawn(args, env, cwd or os.getcwd(), out_write, err_write)
    finally:
        os.close(out_write)
        os.close(err_write)
    proc.stdout = open(out_read, encoding="utf-8")
    proc.stderr = open(err_read, encoding="utf-8")
    return proc


def run(server: ForkServer, args, env: dict[str, str], cwd=None) -> subprocess.CompletedProcess:
    """A forked `python -m kdpipe ARGS` to its end: subprocess.run(..., capture_output=True, text=True)."""
    import tempfile

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = server.spawn(args, env, cwd or os.getcwd(), out.fileno(), err.fileno())
        code = proc.wait()
        texts = []
        for stream in (out, err):
            stream.seek(0)
            texts.append(stream.read().decode("utf-8", errors="replace"))
    return subprocess.CompletedProcess([sys.executable, "-m", "kdpipe", *map(str, args)], code, *texts)


if __name__ == "__main__":
    request = serve(sys.argv[1])
    if request:
        become(request)
