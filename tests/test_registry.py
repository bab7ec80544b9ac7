"""Registry policy against a real `mlflow server` (sqlite backend): candidate on every passing run, champion only
for a better one, no move from a failing run, `kdpipe promote` with the same checks, and the champion's ONNX model
reproducing its reported accuracy."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path

import mlflow
import onnxruntime as ort
import pytest
from mlflow import MlflowClient

from conftest import FAST, PIPELINES, cli, read_report, run_process, sets, start_run
from servers import MlflowServer
from kdpipe.registry import alias_holder

DIGITS = PIPELINES / "digits.yaml"
MODEL = "digits-student"
# Short distillations give weak students; these gates let them pass so that the policy decides, not the gates.
LENIENT = ["validate.gates.accuracy_min=0.2", "validate.gates.max_accuracy_drop_vs_teacher=0.9"]
# INT8 and a second batch size are covered in test_deploy.py; here they would only cost time.
CHEAP = ["export.quantize=none", "export.deliver=fp32", "validate.batch_sizes=[1]"]
MIN_IMPROVEMENT = 0.005
# distill.epochs for a middling, a worse and a better student (same seed, same cached teacher).
MIDDLE, WORSE, BETTER = 3, 2, 6


# A server start and four pipeline runs: long for a developer loop, so it runs with the slow tests (CI runs them).
pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    try:
        yield server.uri
    finally:
        server.stop()


@pytest.fixture(scope="module")
def registry_dir(tmp_path_factory, mlflow_server, teacher_cache):
    workdir = tmp_path_factory.mktemp("registry")
    (workdir / "mlflow.yaml").write_text(
        "experiment: kdpipe-registry-test\n"
        f"registry: {{candidate_alias: candidate, primary_metric: test_accuracy, min_improvement: {MIN_IMPROVEMENT}}}\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        mp.setenv("KDPIPE_CACHE_DIR", str(teacher_cache))
        # An earlier test in this process may have set mlflow's global URIs, which win over the environment.
        # mlflow.set_registry_uri also writes MLFLOW_REGISTRY_URI: set it through the patch so it is undone.
        mp.setenv("MLFLOW_REGISTRY_URI", mlflow_server)
        mlflow.set_tracking_uri(mlflow_server)
        mlflow.set_registry_uri(mlflow_server)
        yield workdir
        mlflow.set_registry_uri(None)
        mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def runs(registry_dir):
    """Four runs in order: middling (champion), worse (candidate only), failing a gate, better (champion)."""
    client = MlflowClient()
    out = {}
    for label, overrides in [("first", [f"distill.epochs={MIDDLE}"]),
                             ("worse", [f"distill.epochs={WORSE}"]),
                             ("failing", [f"distill.epochs={WORSE}", "validate.gates.accuracy_min=0.9999"]),
                             ("better", [f"distill.epochs={BETTER}"])]:
        # LENIENT comes first so that the failing run's tight accuracy_min overrides it.
        result = cli("run", DIGITS, *sets(*FAST, *LENIENT, *CHEAP, *overrides))
        champion = alias_holder(client, MODEL, "champion")
        out[label] = {"result": result, "report": read_report(result.stdout),
                      "champion_after": champion.version if champion else None,
                      "versions_after": len(client.search_model_versions(f"name='{MODEL}'"))}
    return out


def test_first_passing_run_becomes_champion_and_candidate(runs):
    first = runs["first"]
    assert first["result"].exit_code == 0, first["result"].output
    mlflow_info = first["report"]["mlflow"]
    assert mlflow_info["model_version"] == "1" and mlflow_info["alias"] == "champion"
    assert mlflow_info["aliases"] == ["candidate", "champion"]
    assert first["champion_after"] == "1"


def test_worse_run_is_a_candidate_and_the_champion_stays(runs):
    first, worse = runs["first"]["report"], runs["worse"]
    assert worse["result"].exit_code == 0, worse["result"].output
    report = worse["report"]
    assert report["student"]["accuracy"] < first["student"]["accuracy"] - MIN_IMPROVEMENT
    assert report["mlflow"]["model_version"] == "2" and report["mlflow"]["alias"] is None
    assert report["mlflow"]["aliases"] == ["candidate"]
    assert "does not improve by min_improvement" in report["mlflow"]["registry"]
    assert worse["champion_after"] == "1"


def test_failing_gate_exits_1_registers_nothing_and_moves_no_alias(runs):
    failing = runs["failing"]
    assert failing["result"].exit_code == 1, failing["result"].output
    report = failing["report"]
    assert report["status"] == "failed"
    assert report["gates"]["accuracy_min"] == {"value": report["student"]["accuracy"], "limit": 0.9999, "passed": False}
    assert all(g["passed"] for name, g in report["gates"].items() if name != "accuracy_min")
    assert report["mlflow"]["model_version"] is None and report["mlflow"]["alias"] is None
    assert report["mlflow"]["registry"] == "not registered: gate failed: accuracy_min"
    assert "gate failed: accuracy_min" in failing["result"].stderr
    assert failing["champion_after"] == "1" and failing["versions_after"] == 2


def test_better_run_takes_champion_and_the_champion_loads_into_onnxruntime(runs):
    first, better = runs["first"]["report"], runs["better"]
    assert better["result"].exit_code == 0, better["result"].output
    report = better["report"]
    assert report["student"]["accuracy"] >= first["student"]["accuracy"] + MIN_IMPROVEMENT
    assert report["mlflow"]["model_version"] == "3" and report["mlflow"]["alias"] == "champion"
    assert better["champion_after"] == "3"

    # models:/<name>@champion, as a deployment would fetch it, reproduces the reported test accuracy.
    from kdpipe.pipeline import load_pipeline
    from kdpipe.data import load_data

    model = mlflow.onnx.load_model(f"models:/{MODEL}@champion")
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    pipeline = load_pipeline(DIGITS)
    data = load_data(pipeline.data, pipeline.seed)
    logits = sess.run(None, {"input": data.x_test.numpy()})[0]
    assert float((logits.argmax(1) == data.y_test.numpy()).mean()) == report["student"]["accuracy"]


def test_version_tags_record_gates_pipeline_hash_and_commit(runs):
    report = runs["better"]["report"]
    version = MlflowClient().get_model_version(MODEL, "3")
    tags = version.tags
    assert tags["kdpipe.gates_passed"] == "true"
    for name, gate in report["gates"].items():
        assert json.loads(tags[f"kdpipe.gate.{name}"]) == gate
    assert tags["kdpipe.pipeline"] == "digits"
    resolved = Path(report["run_dir"]) / "pipeline.yaml"
    assert tags["kdpipe.pipeline_sha256"] == hashlib.sha256(resolved.read_bytes()).hexdigest()
    head = subprocess.run(["git", "-C", str(PIPELINES), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert tags["kdpipe.git_commit"].split("+")[0] == (head.stdout.strip() if head.returncode == 0 else "none")
    assert float(tags["kdpipe.metric.test_accuracy"]) == report["student"]["accuracy"]
    assert tags["kdpipe.precision"] == report["onnx"]["precision"]
    assert version.current_stage in (None, "None")  # aliases only, no deprecated stages


def test_promote_applies_the_same_checks_and_force_is_recorded(runs):
    client = MlflowClient()
    refused = cli("promote", MODEL, "--version", "2", "--alias", "champion")
    assert refused.exit_code == 1, refused.output
    assert "refused: 'champion' stays on version 3" in refused.stderr
    assert client.get_model_version_by_alias(MODEL, "champion").version == "3"

    forced = cli("promote", MODEL, "--version", "2", "--alias", "champion", "--force")
    assert forced.exit_code == 0, forced.output
    assert client.get_model_version_by_alias(MODEL, "champion").version == "2"
    record = json.loads(client.get_model_version(MODEL, "2").tags["kdpipe.forced.champion"])
    assert record["replaced_version"] == "3" and "does not improve" in record["overridden_check"]

    back = cli("promote", MODEL, "--version", "3", "--alias", "champion")
    assert back.exit_code == 0, back.output
    assert "better by" in back.stdout
    assert client.get_model_version_by_alias(MODEL, "champion").version == "3"

    fresh_alias = cli("promote", MODEL, "--version", "1", "--alias", "staging")
    assert fresh_alias.exit_code == 0 and "no version holds 'staging' yet" in fresh_alias.stdout

    unknown = cli("promote", MODEL, "--version", "99")
    assert unknown.exit_code == 2 and f"--version: model '{MODEL}' has no version 99" in unknown.stderr


# --- concurrent promotion ---------------------------------------------------------------------------------------------

# test_accuracy of the champion before the race, of the worse and of the better contender.
OLD, WORSE_VALUE, BETTER_VALUE = 0.70, 0.805, 0.928


def registered_versions(uri: str, model: str, source_dir: Path) -> dict[str, str]:
    """Three versions of `model` that passed their gates; the first holds 'champion'. Returns label -> version."""
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("promote-race") or client.get_experiment(
        client.create_experiment("promote-race"))
    run_id = client.create_run(experiment.experiment_id).info.run_id
    (source_dir / "model").mkdir(parents=True, exist_ok=True)
    (source_dir / "model" / "weights.txt").write_text("stand-in")
    client.log_artifacts(run_id, str(source_dir / "model"), "model")
    client.create_registered_model(model)
    versions = {}
    for label, value in (("old", OLD), ("worse", WORSE_VALUE), ("better", BETTER_VALUE)):
        tags = {"kdpipe.gates_passed": "true", "kdpipe.metric.test_accuracy": repr(value)}
        versions[label] = str(client.create_model_version(model, f"runs:/{run_id}/model", run_id=run_id, tags=tags).version)
    client.set_registered_model_alias(model, "champion", versions["old"])
    return versions


def start_promote(uri: str, model: str, version: str, hold: Path, cwd: Path) -> subprocess.Popen:
    env = {"MLFLOW_TRACKING_URI": uri, "KDPIPE_TEST_PROMOTE_HOLD": str(hold), "MLFLOW_REGISTRY_URI": None}
    return start_run("promote", model, "--version", version, env=env, cwd=cwd)


def wait_for(path: Path, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"promote exited {process.returncode} before {path.name}: {process.stderr.read()}")
        assert time.monotonic() < deadline, f"no {path.name}"
        time.sleep(0.05)


def race(uri: str, model: str, first: str, second: str, tmp_path: Path, locked: bool) -> dict[str, tuple[int, str]]:
    """`kdpipe promote` of `first` and `second` in two processes, `first` writing the alias first.

    Locked store: `second` must wait on the lock until `first` is done. Otherwise (no lock) both read the old champion before
    either writes (the race), then `first` writes, then `second`. Returns version -> (exit code, output).
    """
    hold = tmp_path / f"hold-{model}"
    hold.mkdir()
    p_first = start_promote(uri, model, first, hold, tmp_path)
    wait_for(hold / f"read-{first}", p_first)
    p_second = start_promote(uri, model, second, hold, tmp_path)
    if locked:
        time.sleep(5)  # long enough for the second process to start and reach the lock
        assert not (hold / f"read-{second}").exists(), "the second promoter read while the first held the lock"
        assert p_second.poll() is None
    else:
        wait_for(hold / f"read-{second}", p_second)
    (hold / f"write-{first}").touch()
    out_first = p_first.communicate(timeout=120)
    (hold / f"write-{second}").touch()  # locked: it reads only now, and may be refused before the hook
    out_second = p_second.communicate(timeout=120)
    return {first: (p_first.returncode, "".join(out_first)), second: (p_second.returncode, "".join(out_second))}


@pytest.fixture
def sqlite_store(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.mark.parametrize("order", ["better_first", "worse_first"])
def test_concurrent_promotions_on_an_mlflow_server_leave_the_better_champion(mlflow_server, tmp_path, order):
    model = f"race-server-{order}"
    versions = registered_versions(mlflow_server, model, tmp_path)
    worse, better = versions["worse"], versions["better"]
    first, second = (better, worse) if order == "better_first" else (worse, better)
    results = race(mlflow_server, model, first, second, tmp_path, locked=False)

    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    assert str(client.get_model_version_by_alias(model, "champion").version) == better
    assert results[better][0] == 0, results[better][1]
    if order == "better_first":
        # The worse one judged against the old champion, wrote over the better one, then found it and moved back.
        assert results[worse][0] == 1, results[worse][1]
        assert f"refused: 'champion' stays on version {better}" in results[worse][1]
        assert f"version {better}, better, took 'champion' at the same time" in results[worse][1]


@pytest.mark.parametrize("order", ["better_first", "worse_first"])
def test_concurrent_promotions_on_a_sqlite_store_are_serial_and_leave_the_better_champion(sqlite_store, tmp_path, order):
    model = f"race-sqlite-{order}"
    versions = registered_versions(sqlite_store, model, tmp_path)
    worse, better, old = versions["worse"], versions["better"], versions["old"]
    first, second = (better, worse) if order == "better_first" else (worse, better)
    results = race(sqlite_store, model, first, second, tmp_path, locked=True)

    client = MlflowClient(tracking_uri=sqlite_store, registry_uri=sqlite_store)
    assert str(client.get_model_version_by_alias(model, "champion").version) == better
    assert results[better][0] == 0, results[better][1]
    if order == "better_first":  # serial: the worse one saw the better champion and was refused
        assert results[worse][0] == 1 and "does not improve" in results[worse][1], results[worse][1]

    # --force withdraws the other versions' claims, so a later promotion does not bring the better one back.
    env = {"MLFLOW_TRACKING_URI": sqlite_store, "MLFLOW_REGISTRY_URI": None}
    forced = run_process("promote", model, "--version", old, "--force", env=env, cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    again = run_process("promote", model, "--version", worse, env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert str(client.get_model_version_by_alias(model, "champion").version) == worse


def test_the_logged_model_names_its_requirements_without_mlflow_loading_it_in_a_child(workdir, monkeypatch):
    """MLflow infers a model's pip requirements by loading it in a child process (6 s of every register stage)
    unless told them: kdpipe names them, pinned as installed, and the model serves through mlflow.pyfunc."""
    from importlib.metadata import version

    import numpy as np

    inferred = []
    monkeypatch.setattr(mlflow.models, "infer_pip_requirements", lambda *a, **k: inferred.append(a) or [])
    result = cli("run", PIPELINES / "digits.yaml", *sets(*FAST, "validate.gates.accuracy_min=0.5",
                                                          "validate.gates.max_accuracy_drop_vs_teacher=0.5"))
    assert result.exit_code == 0, result.output
    assert inferred == []
    report = read_report(result.stdout)
    # This run's store named throughout: MLflow's process-wide URIs are whatever an earlier test left.
    store = report["mlflow"]["tracking_uri"]
    source = MlflowClient(tracking_uri=store, registry_uri=store).get_model_version_download_uri(
        report["mlflow"]["model_name"], report["mlflow"]["model_version"])
    model = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=store))
    requirements = (model / "requirements.txt").read_text().split()
    assert requirements == [f"{name}=={version(name)}" for name in ("mlflow", "numpy", "onnx", "onnxruntime")]
    x = np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32)
    assert mlflow.pyfunc.load_model(str(model)).predict(x)["logits"].shape == (4, 10)
