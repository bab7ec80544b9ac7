"""A run killed with SIGKILL in the middle of distillation, resumed with `kdpipe run --resume RUN_DIR`."""

from __future__ import annotations

import json

import pytest

from conftest import FAST, ONE_THREAD, PIPELINES, cli, read_report, read_until, run_process, start_run

EPOCHS = 8


def mlflow_runs(workdir):
    import mlflow

    store = f"sqlite:///{workdir / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    return client.search_runs([e.experiment_id for e in client.search_experiments()]), client


@pytest.mark.slow
def test_sigkill_during_distill_then_resume(workdir):
    overrides = [a for o in [*FAST, f"distill.epochs={EPOCHS}"] for a in ("--set", o)]
    proc = start_run("run", PIPELINES / "digits.yaml", *overrides)
    seen = read_until(proc, "student epoch 3/")
    proc.kill()  # SIGKILL: no handler runs, the MLflow run stays RUNNING
    proc.wait()
    assert proc.returncode == -9, "".join(seen)
    (run_dir,) = (workdir / "runs" / "digits").iterdir()
    assert json.loads((run_dir / "ledger.json").read_text())["finished"] == ["teacher"]
    assert not (run_dir / "report.json").exists()

    resumed = run_process("run", "--resume", run_dir, env=ONE_THREAD)
    assert resumed.returncode in (0, 1), resumed.stderr  # 1: FAST settings may miss a gate
    report = read_report(resumed.stdout)
    assert report["status"] in ("passed", "failed") and report["resumed"] == 1
    assert 0 < report["student"]["accuracy"] <= 1 and report["gates"] and report["onnx"]["parity_max_abs_diff"] < 1e-3
    assert "student epoch 1/" not in resumed.stderr  # continued from the checkpoint, not restarted
    assert f"student epoch {EPOCHS}/{EPOCHS}" in resumed.stderr
    assert "[teacher]" not in resumed.stderr  # a finished stage is restored, not run again

    runs, client = mlflow_runs(workdir)
    assert len(runs) == 1 and runs[0].info.status in ("FINISHED", "FAILED")
    curves = report["distill"]["history"]["student"]  # report.html's: the epochs before the kill come from MLflow
    assert curves["epoch"] == list(range(1, EPOCHS + 1)), curves["epoch"]
    for key in ("student/val_accuracy", "student/train_loss"):
        logged = sorted((m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, key))
        assert [step for step, _ in logged] == list(range(1, EPOCHS + 1)), (key, logged)  # every epoch once
        assert curves[key.split("/")[1]] == pytest.approx([value for _, value in logged]), key
    assert len(client.get_metric_history(runs[0].info.run_id, "stage_seconds/teacher")) == 1


def test_resume_needs_a_run_directory(workdir):
    result = cli("run", "--resume", workdir)
    assert result.exit_code == 2 and "--resume" in result.output and "ledger.json" in result.output
    both = cli("run", PIPELINES / "digits.yaml", "--resume", workdir)
    assert both.exit_code == 2 and "--resume RUN_DIR" in both.output
