"""Search workers on a real PostgreSQL server: race-free schema creation and one study shared by two workers.

The fixture starts a throwaway server from Debian's `postgresql` package in a
temporary data directory on a free loopback port (as the `postgres` user when
running as root, since PostgreSQL refuses to run as root) and stops it afterwards.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import run_process, start_run
from servers import free_port
from test_search import assert_workers_shared_study, start_workers

HOW_TO = "PostgreSQL is not installed: `apt-get install -y postgresql` (CI's .ci/run does), then rerun these tests"


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path else None


@pytest.fixture
def postgres_url():
    bin_dir = _bin_dir()
    if bin_dir is None:
        pytest.skip(HOW_TO)
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    base = Path(tempfile.mkdtemp(prefix="kdpipe-pg-"))
    if as_postgres:
        shutil.chown(base, "postgres")
    data, port = base / "data", free_port()
    run = lambda *args: subprocess.run([*as_postgres, *map(str, args)], check=True, capture_output=True, text=True)  # noqa: E731
    run(bin_dir / "initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync")
    run(bin_dir / "pg_ctl", "-D", data, "-l", base / "server.log", "-w", "-t", "60",
        "-o", f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    try:
        run(bin_dir / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "postgres", "kdpipe_search")
        yield f"postgresql://postgres@127.0.0.1:{port}/kdpipe_search"  # an empty database: no Optuna schema yet
    finally:
        run(bin_dir / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


def test_workers_creating_the_schema_at_once_do_not_collide(postgres_url):
    """Four processes open the same study on the empty database at the same instant (the duplicate-enum race)."""
    code = ("import sys; from kdpipe.search import open_study; "
            "open_study(sys.argv[1], 'race', ['maximize']); print('ok')")
    procs = [subprocess.Popen([sys.executable, "-c", code, postgres_url], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.strip() == "ok", err[-3000:]


@pytest.mark.slow
def test_two_workers_share_a_postgres_study(postgres_url, workdir):
    from optuna.storages import RDBStorage

    from kdpipe.search import sqlalchemy_url

    storage = RDBStorage(sqlalchemy_url(postgres_url))  # Optuna's schema made before the workers start, not racing them
    workers = start_workers(postgres_url, "shared", trials=2, count=2, cwd=workdir)
    assert_workers_shared_study(workers, storage, "shared", trials=2)


@pytest.mark.slow
def test_killed_worker_resumes_on_its_real_storage_and_its_password_is_recorded_nowhere(postgres_url, workdir):
    """A `kdpipe search` worker whose --storage carries a password, killed mid-trial and resumed: the resumed run
    connects with the real password (kept in the run's ledger), fails the trial it left running, and neither
    MLflow, the report nor the pipeline copy holds the password."""
    import optuna
    from optuna.storages import RDBStorage

    from kdpipe.search import sqlalchemy_url
    from test_search_resume import CAMPAIGN, SEARCH

    password = "S3cret-kdpipe-pw"  # the fixture's server trusts loopback clients, so any password connects
    url = postgres_url.replace("postgres@", f"postgres:{password}@")
    args = ["search", SEARCH, "--storage", url, "--study", "resumed", *[a for item in CAMPAIGN for a in ("--set", item)]]
    storage = RDBStorage(sqlalchemy_url(postgres_url))  # creates Optuna's schema before the worker starts, not racing it
    worker = start_run(*args, cwd=workdir)
    try:
        deadline = time.monotonic() + 600
        while True:
            assert worker.poll() is None, worker.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the worker never reached a running trial"
            try:
                trials = optuna.load_study(study_name="resumed", storage=storage).trials
            except KeyError:  # not created yet
                trials = []
            last = trials[-1] if trials else None
            if any(t.state.is_finished() for t in trials) and last.state == optuna.trial.TrialState.RUNNING \
                    and "run_dir" in last.user_attrs:  # the trial is under way
                break
            time.sleep(0.2)
        time.sleep(0.5)
        os.kill(worker.pid, signal.SIGKILL)
    finally:
        worker.kill()
        worker.communicate()
    orphan = trials[-1].number
    (run_dir,) = (workdir / "runs" / "digits-search").iterdir()
    assert "postgres:****@" in (run_dir / "pipeline.yaml").read_text()
    assert password in (run_dir / "ledger.json").read_text()  # where the resumed run finds its storage
    assert (run_dir / "ledger.json").stat().st_mode & 0o777 == 0o600  # so no other user reads it

    resumed = run_process("run", "--resume", run_dir, cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"failed trial(s) [{orphan}] left running by the interrupted process" in resumed.stderr
    trials = optuna.load_study(study_name="resumed", storage=storage).trials
    assert trials[orphan].state == optuna.trial.TrialState.FAIL and all(t.state.is_finished() for t in trials)
    assert password not in resumed.stdout + resumed.stderr

    # Every file the two processes wrote (MLflow's sqlite store and artifacts, report, pipeline copy), but the ledger.
    for path in workdir.rglob("*"):
        if path.is_file() and path.name != "ledger.json":
            assert password.encode() not in path.read_bytes(), path
