"""Many `kdpipe run` invocations in one torchrun launch: `python -m torch.distributed.run --standalone
--nproc-per-node N tests/torchrun_methods.py SPEC.json`.

Every rank runs the SPEC's invocations in its order, each as `python -m kdpipe ARGV` would (kdpipe.cli.main) but
in this process, so torch, MLflow and the rest are imported once per rank instead of once per invocation. Each
one's working directory and environment are its own (SPEC: name, cwd, env, argv), and so are this rank's stdout
and stderr: cwd/rank<R>.out and .err, file descriptors included; its exit code goes to cwd/rank<R>.exit. The
ranks wait for each other after each invocation (files, not a collective: after a failure the process group may
be gone), so one that fails on one rank does not pair the other's collectives with the next one's.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path


@contextlib.contextmanager
def redirected(out: Path, err: Path):
    """File descriptors 1 and 2 (Python's sys.stdout and sys.stderr with them) to `out` and `err`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(out, "w") as out_file, open(err, "w") as err_file:
        os.dup2(out_file.fileno(), 1)
        os.dup2(err_file.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)


def kdpipe_exit_code(argv: list[str]) -> int:
    """The exit code of `python -m kdpipe ARGV`, run in this process."""
    from kdpipe.cli import main

    sys.argv = ["kdpipe", *argv]
    try:
        main()
    except SystemExit as exc:
        code = exc.code
        return 0 if code is None else code if isinstance(code, int) else 1  # as the interpreter would exit
    except Exception:  # noqa: BLE001 - what the interpreter would print before exiting 1
        traceback.print_exc()
        return 1
    return 0


def wait_for_ranks(cwd: Path, world_size: int, timeout_s: float) -> None:
    """Until every rank wrote its exit code in `cwd`; exit 1 after `timeout_s` (torchrun then ends the other
    ranks: one is stuck in this invocation, and the ranks could no longer keep in step)."""
    deadline = time.monotonic() + timeout_s
    while not all((cwd / f"rank{r}.exit").exists() for r in range(world_size)):
        if time.monotonic() > deadline:
            print(f"{cwd.name}: not every rank finished within {timeout_s:.0f} s", file=sys.stderr, flush=True)
            sys.exit(1)
        time.sleep(0.05)


def main(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    Path(spec["pids"], f"rank{rank}.pid").write_text(str(os.getpid()))  # the launcher kills what a timeout leaves
    for entry in spec["runs"]:
        cwd = Path(entry["cwd"])
        os.chdir(cwd)
        os.environ.update(entry["env"])
        with redirected(cwd / f"rank{rank}.out", cwd / f"rank{rank}.err"):
            code = kdpipe_exit_code(entry["argv"])
        (cwd / f"rank{rank}.exit.tmp").write_text(str(code))
        os.replace(cwd / f"rank{rank}.exit.tmp", cwd / f"rank{rank}.exit")  # whole, for the ranks that wait on it
        if code in (128 + 2, 128 + 15):  # SIGINT, SIGTERM: torchrun is ending the launch
            sys.exit(code)
        wait_for_ranks(cwd, world_size, spec["rank_wait_s"])


if __name__ == "__main__":
    main(sys.argv[1])
