"""A tracking server that is down, silent or goes away mid-run: kdpipe says so within connect_timeout_s (mlflow.yaml)
instead of retrying for minutes, leaves a report, and `--resume` finishes the run once a server answers again."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import FAST, LENIENT, ONE_THREAD, PIPELINES, read_report, read_until, run_process, sets, start_run
from servers import MlflowServer, free_port

DIGITS = PIPELINES / "digits.yaml"
CHEAP = ["export.quantize=none", "export.deliver=fp32", "validate.batch_sizes=[1]"]


def the_run_dir(workdir: Path) -> Path:
    (run_dir,) = (workdir / "runs" / "digits").iterdir()
    return run_dir


def timed_run(*args, env: dict) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = run_process(*args, env={**ONE_THREAD, **env})
    return proc, time.monotonic() - start


def test_a_server_that_is_down_fails_the_run_at_once_with_a_report(workdir):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens: a stopped server
    proc, seconds = timed_run("run", DIGITS, *sets(*FAST), env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 3, proc.stderr
    assert seconds < 30, seconds
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: MLflow server {uri} did not answer within 5s (") and "refused" in lines[-1], lines
    assert lines[-1].endswith("; when it answers, run again"), lines[-1]
    assert "Traceback" not in proc.stderr and "[teacher]" not in proc.stderr  # no work before the check
    report = json.loads((the_run_dir(workdir) / "report.json").read_text())
    assert report["status"] == "failed" and report["failed_stage"] == "setup" and uri in report["error"]
    assert report["mlflow"]["run_id"] is None


def test_a_server_that_accepts_but_never_answers_fails_within_connect_timeout(workdir):
    """A hung server: the connection is accepted (by the kernel's backlog), no answer ever comes."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        (workdir / "mlflow.yaml").write_text("experiment: kdpipe\nconnect_timeout_s: 2\n")
        proc, seconds = timed_run("run", DIGITS, *sets(*FAST), env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 3, proc.stderr
    assert seconds < 30, seconds
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: MLflow server {uri} did not answer within 2s (") and "timed out" in last, last
    assert json.loads((the_run_dir(workdir) / "report.json").read_text())["failed_stage"] == "setup"


def test_connect_timeout_must_be_a_positive_number(workdir):
    (workdir / "mlflow.yaml").write_text("connect_timeout_s: 0\n")
    proc = run_process("run", DIGITS)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (f"{DIGITS}: connect_timeout_s: {workdir / 'mlflow.yaml'}: "
                                   "expected a number of seconds > 0, got 0")


@pytest.fixture
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.mark.slow
def test_server_killed_mid_run_then_back_resume_registers_with_the_full_history(workdir, mlflow_server):
    env = {**ONE_THREAD, "MLFLOW_TRACKING_URI": mlflow_server.uri}
    proc = start_run("run", DIGITS, *sets(*FAST, *LENIENT, *CHEAP), env=env)
    seen = read_until(proc, "student epoch 2/")
    mlflow_server.kill()
    start = time.monotonic()
    rest, = proc.communicate(timeout=120)[1:]
    seconds = time.monotonic() - start
    stderr = "".join(seen) + rest
    assert proc.returncode == 3, stderr
    assert seconds < 60, seconds  # MLflow's own retries alone would take about 4 minutes
    run_dir = the_run_dir(workdir)
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: stage 'distill' failed: TrackingUnreachable: MLflow server {mlflow_server.uri} "
                           "stopped answering ("), last
    assert last.endswith(f"; when it is back, continue with: kdpipe run --resume {run_dir}"), last
    assert f"MLflow server {mlflow_server.uri} did not answer" in stderr and "retrying" in stderr  # while it retried
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "failed" and report["failed_stage"] == "distill"

    # Still down: the resume fails at once, before any work, and says how to continue.
    down, seconds = timed_run("run", "--resume", run_dir, env=env)
    assert down.returncode == 3 and seconds < 30, (seconds, down.stderr)
    assert down.stderr.strip().splitlines()[-1].endswith(f"when it answers, continue with: kdpipe run --resume {run_dir}")
    assert "[distill]" not in down.stderr

    mlflow_server.start()
    resumed, _ = timed_run("run", "--resume", run_dir, env=env)
    assert resumed.returncode == 0, resumed.stderr
    report = read_report(resumed.stdout)
    assert report["status"] == "passed" and report["mlflow"]["model_version"] is not None
    client = MlflowClient(tracking_uri=mlflow_server.uri, registry_uri=mlflow_server.uri)
    run = client.get_run(report["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    for key in ("student/val_accuracy", "student/train_loss"):
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
        assert steps == list(range(1, 7)), (key, steps)  # the epochs logged before, during and after the outage
    version = client.get_model_version("digits-student", report["mlflow"]["model_version"])
    assert version.run_id == run.info.run_id
