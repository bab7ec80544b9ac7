"""Search campaigns: the space from the pipeline file, trials as nested MLflow runs, the teacher's outputs computed
once per campaign, failing trials, the best parameters carried into the run, and workers sharing one study."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml

from conftest import FAST, PIPELINES, cli, read_report, start_run

SEARCH = PIPELINES / "digits-search.yaml"
LENIENT = ["validate.gates.accuracy_min=0.5", "validate.gates.max_accuracy_drop_vs_teacher=0.5"]
KD_ONLY = ["search.space=auto"]  # the pipeline's own method (kd) over its declared ranges


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def nested_runs(report: dict) -> list:
    client = mlflow.MlflowClient(report["mlflow"]["tracking_uri"])
    parent = client.get_run(report["mlflow"]["run_id"])
    return client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")


def start_workers(storage: str, study: str, trials: int, count: int, cwd: Path) -> list[subprocess.Popen]:
    """`count` `kdpipe search` processes started together on one study."""
    args = ["search", SEARCH, "--storage", storage, "--study", study, "--trials", str(trials),
            *sets(*FAST, *KD_ONLY, "distill.epochs=2")]
    return [start_run(*args, cwd=cwd, env={"MLFLOW_TRACKING_URI": f"sqlite:///{cwd / f'mlflow-{i}.db'}"})
            for i in range(count)]


def assert_workers_shared_study(workers: list[subprocess.Popen], storage, study: str, trials: int) -> None:
    for proc in workers:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    finished = optuna.load_study(study_name=study, storage=storage).trials
    numbers = [t.number for t in finished]
    assert sorted(numbers) == list(range(trials * len(workers)))  # the sum of their trials, no number twice
    assert all(t.state.is_finished() for t in finished)
    assert len({t.user_attrs["worker"] for t in finished}) == len(workers)


@pytest.mark.parametrize("space, key, message", [
    ({"temprature": {"low": 1, "high": 5}}, "search.space.temprature", "did you mean 'temperature'"),
    ({"alpha": {"low": 0.0, "high": 2.0}}, "search.space.alpha", "2.0 is not a valid alpha"),
    ({"temperature": {"low": 1}}, "search.space.temperature.high", "required key is missing"),
    ({"method": {"choices": ["kd", "nts"]}}, "search.space.method", "did you mean 'nst'"),
    ({"kd": {"alpah": "auto"}}, "search.space.kd.alpah", "did you mean 'alpha'"),
    ({"optimizer.lr": "auto"}, "search.space.optimizer.lr", "declares no search range"),
])
def test_bad_space_is_an_input_error(workdir, space, key, message):
    raw = yaml.safe_load(SEARCH.read_text())
    raw["search"]["space"] = space
    path = workdir / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = cli("check", path)
    assert result.exit_code == 2
    assert f"{path}: {key}: " in result.stderr and message in result.stderr
    assert not (workdir / "runs").exists()


def test_multi_objective_rejects_pruning(workdir):
    result = cli("check", SEARCH, *sets("search.objective=[val_accuracy, latency_p50]", "search.pruner=median"))
    assert result.exit_code == 2 and "cannot prune a multi-objective search" in result.stderr


def test_campaign_computes_teacher_outputs_once_and_nests_trials(workdir, teacher_cache, monkeypatch):
    # A cache directory of this test's own, so its teacher-output count is this campaign's; trained teachers are reused.
    cache = workdir / "cache"
    if (teacher_cache / "teachers").is_dir():
        shutil.copytree(teacher_cache / "teachers", cache / "teachers")
    monkeypatch.setenv("KDPIPE_CACHE_DIR", str(cache))
    result = cli("run", SEARCH, *sets(*FAST, *LENIENT, *KD_ONLY, "search.trials=4"))
    assert result.exit_code == 0, result.stderr
    report = read_report(result.stdout)
    found = report["search"]
    assert found["study"] == "digits-search" and found["storage"].endswith("search.db")
    assert found["n_trials"] == 4 and found["n_complete"] + found["n_pruned"] == 4 and found["n_failed"] == 0
    # kd's declared space: the logit_stand and weights switches, and the parameters their settings make act.
    assert {"logit_stand", "weights"} <= set(found["best_params"]) <= set(report["method"]["params"])
    assert 0.5 < found["best_value"] <= 1.0
    assert found["teacher_forward_passes"] == 1  # four trials, one teacher pass over the training set

    resolved = yaml.safe_load((Path(report["run_dir"]) / "pipeline.yaml").read_text())
    assert resolved["distill"]["params"] == report["method"]["params"]
    assert {k: resolved["distill"]["params"][k] for k in found["best_params"]} == found["best_params"]
    assert found["reused_checkpoint"] and report["student"]["val_accuracy"] == pytest.approx(found["best_value"])

    trials = nested_runs(report)
    assert len(trials) == 4
    states = {r.data.tags["kdpipe.trial_state"] for r in trials}
    assert states <= {"complete", "pruned"} and "complete" in states
    complete = next(r for r in trials if r.data.tags["kdpipe.trial_state"] == "complete")
    assert {"method", "logit_stand", "weights"} <= set(complete.data.params)
    client = mlflow.MlflowClient(report["mlflow"]["tracking_uri"])
    history = client.get_metric_history(complete.info.run_id, "student/val_accuracy")
    assert [m.step for m in history] == list(range(1, 7))  # every epoch, reported to the pruner too
    plots = {a.path for a in client.list_artifacts(report["mlflow"]["run_id"], "search")}
    assert {"search/optimization_history.png", "search/param_importances.png"} <= plots


def test_bad_trial_fails_and_the_campaign_goes_on(workdir):
    # The grid visits both learning rates; 1e30 makes the loss non-finite and the Trainer raise FloatingPointError.
    space = "search.space={optimizer.lr: {choices: [0.05, 1.0e+30]}}"
    result = cli("run", SEARCH, *sets(*FAST, *LENIENT, space, "search.sampler=grid", "search.trials=2"))
    assert result.exit_code == 0, result.stderr
    report = read_report(result.stdout)
    found = report["search"]
    assert (found["n_complete"], found["n_failed"]) == (1, 1)
    assert found["best_params"] == {"optimizer.lr": 0.05}
    failed = [r for r in nested_runs(report) if r.data.tags["kdpipe.trial_state"] == "failed"]
    assert len(failed) == 1 and failed[0].info.status == "FAILED"
    assert "FloatingPointError" in failed[0].data.tags["kdpipe.error"]


@pytest.mark.slow
def test_digits_search_pipeline_end_to_end(workdir):
    """The shipped campaign over kd, nst, rkd and at, shortened (few epochs: gates loose enough for any method)."""
    loose = ["validate.gates.accuracy_min=0.2", "validate.gates.max_accuracy_drop_vs_teacher=0.8"]
    result = cli("run", SEARCH, *sets(*FAST, *loose, "search.trials=5"))
    assert result.exit_code == 0, result.stderr
    report = read_report(result.stdout)
    found = report["search"]
    assert found["n_trials"] == 5 and found["n_complete"] >= 1
    assert found["best_params"]["method"] == report["method"]["name"]
    assert report["status"] == "passed" and report["mlflow"]["model_version"] is not None
    assert len(nested_runs(report)) == 5


@pytest.mark.slow
def test_two_workers_share_a_journal_file(workdir):
    journal = workdir / "study.journal"
    workers = start_workers(str(journal), "shared", trials=2, count=2, cwd=workdir)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    assert_workers_shared_study(workers, storage, "shared", trials=2)
