"""A search killed mid-trial and resumed: the orphaned trial is failed, the sampler continues its sequence instead of
drawing the earlier trials' points again, and no trial's MLflow run is left RUNNING."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import mlflow
import optuna
import pytest

from conftest import FAST, LENIENT, PIPELINES, read_report, run_process, sets, start_run

SEARCH = PIPELINES / "digits-search.yaml"
TRIALS = 4
# kd over its declared ranges, never pruned; 40 epochs make a trial about 2 s on digits (5 took 0.3 s, shorter than
# the poll-and-kill below), so the kill lands inside one.
CAMPAIGN = [*FAST, *LENIENT, "search.space=auto", f"search.trials={TRIALS}", "search.pruner=none",
            "distill.epochs=40", "export.quantize=none", "export.deliver=fp32", "validate.batch_sizes=[1]"]


def wait_for_running_trial(runs: Path, process: subprocess.Popen, finished: int) -> Path:
    """The run directory once `finished` trials are done and the next one is running.

    Reads the study's sqlite file directly: opening it with Optuna would create Optuna's tables, racing the run.
    """
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        for db in runs.glob("digits-search/*/search.db"):
            try:
                with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
                    states = [row[0] for row in conn.execute("SELECT state FROM trials ORDER BY number")]
            except sqlite3.OperationalError:
                continue  # the study is being created
            if sum(s in ("COMPLETE", "PRUNED", "FAIL") for s in states) >= finished and states[-1:] == ["RUNNING"]:
                return db.parent
        time.sleep(0.2)
    pytest.fail("the search never reached a running trial")


@pytest.mark.slow
def test_killed_search_resumes_without_repeating_trials_and_fails_the_orphan(workdir):
    process = start_run("run", SEARCH, *sets(*CAMPAIGN), cwd=workdir)
    try:
        run_dir = wait_for_running_trial(workdir / "runs", process, finished=1)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.communicate()
    before = optuna.load_study(study_name="digits-search", storage=f"sqlite:///{run_dir / 'search.db'}").trials
    orphan = next(t for t in before if t.state == optuna.trial.TrialState.RUNNING)

    resumed = run_process("run", "--resume", run_dir, cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"failed trial(s) [{orphan.number}] left running by the interrupted process" in resumed.stderr

    trials = optuna.load_study(study_name="digits-search", storage=f"sqlite:///{run_dir / 'search.db'}").trials
    assert len(trials) == TRIALS and trials[orphan.number].state == optuna.trial.TrialState.FAIL
    assert all(t.state.is_finished() for t in trials)
    drawn = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(drawn)) == len(drawn), drawn  # the resumed sampler drew none of the earlier points again

    report = read_report(resumed.stdout)
    assert report["resumed"] == 1 and report["search"]["n_failed"] == 1
    client = mlflow.MlflowClient(report["mlflow"]["tracking_uri"])
    parent = client.get_run(report["mlflow"]["run_id"])
    nested = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(nested) == TRIALS
    assert not [r for r in nested if r.info.status == "RUNNING"]
    killed = [r for r in nested if r.data.tags.get("optuna.trial") == str(orphan.number)]
    assert len(killed) == 1 and killed[0].info.status == "KILLED"
    assert killed[0].data.tags["kdpipe.trial_state"] == "killed"


def test_a_trial_killed_before_its_mlflow_run_existed_gets_a_killed_run(workdir):
    """A worker killed between Optuna starting a trial and MLflow creating its run leaves a RUNNING trial with no
    run: the resume fails the trial and records it as a KILLED nested run, so every trial keeps its run."""
    from kdpipe.search import TrialRuns, fail_orphans

    study = optuna.create_study(study_name="s", storage=f"sqlite:///{workdir / 'search.db'}")
    done = study.ask()
    done.suggest_float("kd.temperature", 1.0, 8.0)
    orphan = study.ask()
    orphan.suggest_float("kd.temperature", 1.0, 8.0)
    # A client of this test's store: the fluent API's global tracking URI and experiment would outlive the test.
    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    parent = client.create_run(client.create_experiment("search"))
    runs = TrialRuns(client, parent.info.run_id)
    run_id = runs.start("trial-0", done.params, {"optuna.trial": "0"})
    runs.end(run_id, "complete")
    study.tell(done, 0.9)

    assert fail_orphans(study, None) == [orphan.number]
    assert runs.close_running("resumed") == []
    assert runs.record_killed(study, [orphan.number], "resumed") == [orphan.number]
    assert runs.record_killed(study, [orphan.number], "resumed") == []  # once only
    client.set_terminated(parent.info.run_id)

    nested = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_trial = {r.data.tags["optuna.trial"]: r for r in nested}
    assert sorted(by_trial) == ["0", "1"]
    killed = by_trial["1"]
    assert killed.info.status == "KILLED" and killed.data.tags["kdpipe.error"] == "resumed"
    assert float(killed.data.params["kd.temperature"]) == orphan.params["kd.temperature"]
    assert study.trials[orphan.number].state == optuna.trial.TrialState.FAIL
