"""How a run ends and starts again: SIGTERM, a run directory that cannot be written, `--until` then `--resume`,
a second process on the same run directory, a kill inside `register`, many runs creating one MLflow store, and the
inputs that would make a run train nothing."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from conftest import FAST, LENIENT, ONE_THREAD, PIPELINES, cli, read_report, read_until, run_process, sets, start_run

DIGITS = PIPELINES / "digits.yaml"
# INT8 and a second batch size are covered in test_deploy.py; here they would only cost time.
CHEAP = ["export.quantize=none", "export.deliver=fp32", "validate.batch_sizes=[1]"]


def client() -> MlflowClient:
    store = os.environ["MLFLOW_TRACKING_URI"]
    return MlflowClient(tracking_uri=store, registry_uri=store)


def only_run_dir(workdir: Path) -> Path:
    (run_dir,) = (workdir / "runs" / "digits").iterdir()
    return run_dir


def metric_steps(run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client().get_metric_history(run_id, key))


# --- A: every way a run ends is recorded truthfully -------------------------------------------------------------


def test_sigterm_mid_distill_ends_the_run_killed_with_a_report_and_resume_finishes_it(workdir):
    proc = start_run("run", DIGITS, *sets(*FAST, *LENIENT, *CHEAP))
    read_until(proc, "student epoch 2/")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    run_dir = only_run_dir(workdir)
    last = stderr.strip().splitlines()[-1]
    assert last == f"error: killed by SIGTERM during stage 'distill'; continue with: kdpipe run --resume {run_dir}", last
    assert "Traceback" not in stderr
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "killed" and report["failed_stage"] == "distill"
    run = client().get_run(report["mlflow"]["run_id"])
    assert run.info.status == "KILLED" and run.data.tags["kdpipe.status"] == "killed"
    assert "report.json" in {a.path for a in client().list_artifacts(run.info.run_id)}

    resumed = run_process("run", "--resume", run_dir, env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr
    assert read_report(resumed.stdout)["status"] == "passed"
    run = client().get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["kdpipe.status"] == "passed"
    assert metric_steps(run.info.run_id, "student/val_accuracy") == list(range(1, 7))


def without_root_override() -> dict:
    """Popen arguments under which file permissions bind the child even when this is root: the child's capability
    bounding set loses CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (it stays uid 0, the owner of the test's files)."""
    if os.geteuid() != 0:
        return {}

    def drop() -> None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")

    return {"preexec_fn": drop}


def test_a_run_directory_that_cannot_be_written_still_ends_failed_naming_the_stage(workdir):
    """The failure handler's own write fails too (report.json): the error still names the stage that failed,
    MLflow says FAILED (not FINISHED, as mlflow's exit hook would), and the report reaches MLflow instead."""
    first = cli("run", DIGITS, "--until", "teacher", *sets(*FAST, *LENIENT, *CHEAP, "distill.epochs=2"))
    assert first.exit_code == 0, first.output
    run_dir = only_run_dir(workdir)
    run_dir.chmod(0o555)
    try:
        proc = start_run("run", "--resume", run_dir, **without_root_override())
        _, stderr = proc.communicate(timeout=300)
    finally:
        run_dir.chmod(0o755)
    assert proc.returncode == 3, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: stage 'distill' failed: ") and "Permission denied" in last, last
    assert "report.json could not be written to the run directory" in stderr
    # The report on disk is still the one of the invocation that stopped after teacher.
    assert json.loads((run_dir / "report.json").read_text())["status"] == "stopped"
    run_id = json.loads((run_dir / "ledger.json").read_text())["mlflow_run_id"]
    run = client().get_run(run_id)
    assert run.info.status == "FAILED", run.info.status
    assert run.data.tags["kdpipe.status"] == "failed" and run.data.tags["kdpipe.failed_stage"] == "distill"
    logged = json.loads(Path(client().download_artifacts(run_id, "report.json")).read_text())
    assert logged["status"] == "failed" and logged["failed_stage"] == "distill" and "Permission denied" in logged["error"]


# --- B: one process per run directory; a resumed register reuses its version -----------------------------------


def test_a_second_resume_of_a_run_in_progress_exits_2(workdir):
    # Enough epochs that the first resume is still training while the second one starts.
    first = cli("run", DIGITS, "--until", "teacher", *sets(*FAST, *LENIENT, *CHEAP, "distill.epochs=500"))
    assert first.exit_code == 0, first.output
    run_dir = only_run_dir(workdir)
    working = start_run("run", "--resume", run_dir)
    try:
        read_until(working, "student epoch 1/")
        second = run_process("run", "--resume", run_dir, env=ONE_THREAD)
        assert working.poll() is None, "the first resume ended before the second one started"
    finally:
        working.send_signal(signal.SIGTERM)
        _, stderr = working.communicate(timeout=120)
    assert second.returncode == 2, second.stderr
    assert second.stderr.strip().splitlines() == [
        f"{run_dir}: --resume: {run_dir} is in use by another kdpipe process (pid {working.pid}); wait for it to end"]
    assert "[distill]" not in second.stderr
    assert working.returncode == 128 + signal.SIGTERM, stderr


def test_resume_after_a_kill_inside_register_reuses_the_version_it_made(workdir):
    """A SIGKILL after the registry made the version but before the ledger recorded the stage leaves exactly this
    run directory: the ledger without `register`, and a version whose source run is this run."""
    full = cli("run", DIGITS, *sets(*FAST, *LENIENT, *CHEAP))
    assert full.exit_code == 0, full.output
    run_dir = only_run_dir(workdir)
    ledger = json.loads((run_dir / "ledger.json").read_text())
    ledger["finished"].remove("register")
    (run_dir / "ledger.json").write_text(json.dumps(ledger))

    resumed = cli("run", "--resume", run_dir)
    assert resumed.exit_code == 0, resumed.output
    assert "version 1 was registered by this run before it was interrupted; reusing it" in resumed.stderr
    versions = client().search_model_versions("name = 'digits-student'")
    assert [str(v.version) for v in versions] == ["1"], [v.version for v in versions]
    report = read_report(resumed.stdout)
    assert report["mlflow"]["model_version"] == "1" and report["mlflow"]["alias"] == "champion"


# --- C: runs starting together on an empty store ------------------------------------------------------------------


def test_four_runs_started_together_on_a_fresh_store_all_succeed(workdir):
    procs = [start_run("run", DIGITS, "--until", "teacher", *sets(*FAST)) for _ in range(4)]
    outcomes = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for code, stderr in outcomes:
        assert code == 0, stderr
    runs = client().search_runs([client().get_experiment_by_name("kdpipe").experiment_id])
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}


# --- D: inputs that would train nothing are refused before any work ----------------------------------------------


@pytest.mark.parametrize("overrides, key, fragment", [
    (["distill.epochs=0"], "distill.epochs", "expected ≥ 1"),
    (["teacher.train.epochs=0"], "teacher.train.epochs", "expected ≥ 1 when the teacher is trained"),
    (["data.batch_size=1"], "data.batch_size", "expected ≥ 2"),
])
def test_runs_that_would_train_nothing_are_input_errors(workdir, overrides, key, fragment):
    for command in ("check", "run"):
        result = cli(command, DIGITS, *sets(*overrides))
        assert result.exit_code == 2, result.output
        assert result.stderr.strip().splitlines() == [result.stderr.strip()]
        assert result.stderr.startswith(f"{DIGITS}: {key}: {fragment}"), result.stderr
    assert not (workdir / "runs").exists()


def test_single_class_data_is_an_input_error(workdir):
    rng = np.random.default_rng(0)
    np.savez(workdir / "one.npz", x=rng.random((60, 8, 8)), y=np.zeros(60, dtype=np.int64))
    result = cli("run", DIGITS, *sets("data.source=npz", f"data.path={workdir / 'one.npz'}"))
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert line.startswith(f"{DIGITS}: data.path: the training split has a single class") and "\n" not in line, line
    assert not (workdir / "runs").exists()


def test_a_checkpointed_teacher_needs_no_training_epochs(workdir):
    import torch

    from kdpipe.pipeline import load_pipeline
    from kdpipe.models import build_model

    cfg = load_pipeline(DIGITS).teacher.model
    torch.save(build_model(cfg, "teacher.model", (1, 8, 8), 10).state_dict(), workdir / "t.pt")
    result = cli("check", DIGITS, *sets("teacher.train.epochs=0", f"teacher.checkpoint={workdir / 't.pt'}"))
    assert result.exit_code == 0, result.output


# --- E: --until, then --resume ------------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_until_distill_then_resume_to_register_equals_one_full_run(workdir):
    settings = sets(*FAST, *LENIENT, *CHEAP)
    full = cli("run", DIGITS, *settings)
    assert full.exit_code == 0, full.output
    full_report = read_report(full.stdout)

    stopped = cli("run", DIGITS, "--until", "distill", *settings)
    assert stopped.exit_code == 0, stopped.output
    report = read_report(stopped.stdout)
    run_dir = Path(report["run_dir"])
    assert report["status"] == "stopped" and report["stopped_after"] == "distill"
    assert set(report["stage_seconds"]) == {"teacher", "distill"}
    assert f"stopped after distill; continue with: kdpipe run --resume {run_dir}" in stopped.stderr
    run = client().get_run(report["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["kdpipe.stopped_after"] == "distill"
    assert run.data.tags["kdpipe.status"] == "stopped"
    assert client().search_model_versions(f"run_id = '{run.info.run_id}'") == []

    resumed = cli("run", "--resume", run_dir, "--until", "register")
    assert resumed.exit_code == 0, resumed.output
    assert "[teacher]" not in resumed.stderr and "[distill]" not in resumed.stderr  # restored, not run again
    assert "[export] started" in resumed.stderr
    report = read_report(resumed.stdout)
    assert report["status"] == "passed" and "stopped_after" not in report and report["resumed"] == 1
    assert set(report["stage_seconds"]) == {"teacher", "distill", "export", "validate", "register"}
    assert json.loads((run_dir / "ledger.json").read_text())["finished"] == [
        "teacher", "distill", "export", "validate", "register"]
    run = client().get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and "kdpipe.stopped_after" not in run.data.tags
    assert metric_steps(run.info.run_id, "student/val_accuracy") == list(range(1, 7))
    for stage in ("teacher", "distill", "export"):
        assert len(client().get_metric_history(run.info.run_id, f"stage_seconds/{stage}")) == 1, stage

    # The same model as the run that never stopped.
    assert sha256(run_dir / "student.onnx") == sha256(Path(full_report["run_dir"]) / "student.onnx")
    assert report["student"]["accuracy"] == full_report["student"]["accuracy"]
    version = client().get_model_version("digits-student", report["mlflow"]["model_version"])
    assert version.run_id == run.info.run_id and report["mlflow"]["model_version"] != full_report["mlflow"]["model_version"]


def test_until_names_a_stage(workdir):
    result = cli("run", DIGITS, "--until", "deploy")
    assert result.exit_code == 2 and "--until: expected one of teacher, search, distill" in result.stderr
    result = cli("run", DIGITS, "--until", "search")
    assert result.exit_code == 2 and "no search: section" in result.stderr
