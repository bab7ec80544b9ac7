"""The Tracker writes to its run by id through a client bound to its store: never MLflow's process-global active run,
experiment or URIs, so trackers on different stores in one process, and the caller's own MLflow use, keep apart."""

from __future__ import annotations

import os
import shutil

import mlflow
from mlflow import MlflowClient


def test_two_trackers_on_different_stores_in_one_process_keep_apart(tmp_path, monkeypatch, mlflow_store_template):
    from kdpipe.tracking import Tracker, TrackingConfig

    stores = {}
    for name in ("a", "b", "caller"):
        shutil.copyfile(mlflow_store_template, tmp_path / f"{name}.db")
        stores[name] = f"sqlite:///{tmp_path / name}.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stores["caller"])
    mlflow.set_tracking_uri(stores["caller"])
    try:
        # The caller's own experiment, set the fluent way: the trackers must leave it active.
        caller_experiment = mlflow.set_experiment("caller's own").experiment_id
        trackers = {name: Tracker(TrackingConfig(tracking_uri=stores[name], experiment=f"exp-{name}",
                                                 system_metrics=False)) for name in ("a", "b")}
        run_ids = {name: t.start(f"run-{name}", {"kdpipe.which": name}) for name, t in trackers.items()}
        for step in range(3):  # interleaved, as two pipelines in one process would be
            for name, tracker in trackers.items():
                tracker.log_metrics({"loss": step + (10 if name == "b" else 0)}, step=step)
        for name, tracker in trackers.items():
            tracker.log_params({"which": name, "nested": {"none": None}})
            tracker.set_tags({"kdpipe.status": name})
        (tmp_path / "note.txt").write_text("a")
        trackers["a"].log_artifact(tmp_path / "note.txt")
        trackers["a"].end("FINISHED")
        trackers["b"].end("FAILED")
        trackers["b"].end("KILLED")  # once only

        for name, status in (("a", "FINISHED"), ("b", "FAILED")):
            client = MlflowClient(stores[name])
            run = client.get_run(run_ids[name])
            assert run.info.status == status
            assert client.get_experiment(run.info.experiment_id).name == f"exp-{name}"
            assert run.data.tags["kdpipe.which"] == name and run.data.tags["kdpipe.status"] == name
            assert run.data.params == {"which": name, "nested.none": "null"}
            offset = 10 if name == "b" else 0
            assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [offset, offset + 1,
                                                                                          offset + 2]
            assert len(client.search_runs([run.info.experiment_id])) == 1
        assert [f.path for f in MlflowClient(stores["a"]).list_artifacts(run_ids["a"])] == ["note.txt"]
        # The caller's own fluent MLflow use lands where it would have without kdpipe.
        assert mlflow.active_run() is None
        assert os.environ["MLFLOW_TRACKING_URI"] == stores["caller"]
        with mlflow.start_run() as run:
            assert run.info.experiment_id == caller_experiment
        assert MlflowClient(stores["caller"]).get_run(run.info.run_id).info.experiment_id == caller_experiment
    finally:
        mlflow.set_experiment(experiment_id="0")  # MLflow's Default, which every store has, for later tests here
        mlflow.set_tracking_uri(None)
