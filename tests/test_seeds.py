"""Multi-seed runs (`kdpipe run --seeds 0,1,2`, the `seeds:` key): one parent MLflow run with a nested run per seed,
mean ± sample std over seeds in report.json and the parent's metrics, the gain over a baseline, the best seed
registered only when the mean passes the gates, contradictions refused, and --resume after SIGKILL."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import (FAST, LENIENT, ONE_THREAD, PIPELINES, cli, enter_workdir, read_report, read_until, run_process,
                      sets, start_run, tracked_nothing, write_pipeline)
from kdpipe.pipeline import load_pipeline
from kdpipe.seeds import at_least, best_seed, child_overrides, mean_gates, seed_runs, spread

DIGITS = PIPELINES / "digits.yaml"
# INT8 and a second batch size are covered in test_deploy.py; here they would only cost time.
CHEAP = ["export.quantize=none", "export.deliver=fp32", "validate.batch_sizes=[1]"]


def client() -> MlflowClient:
    store = os.environ["MLFLOW_TRACKING_URI"]
    return MlflowClient(tracking_uri=store, registry_uri=store)


def all_runs():
    c = client()
    return c.search_runs([e.experiment_id for e in c.search_experiments()])


def history(run_id: str, key: str) -> list:
    return sorted(client().get_metric_history(run_id, key), key=lambda m: m.step)


# --- the numbers, without runs --------------------------------------------------------------------------------------


def test_spread_is_the_sample_standard_deviation():
    values = [0.81, 0.88, 0.9, 0.79]
    found = spread(values)
    mean = sum(values) / len(values)
    by_hand = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5  # n − 1
    assert found["mean"] == pytest.approx(mean, rel=1e-12) and found["std"] == pytest.approx(by_hand, rel=1e-12)
    assert found["std"] == pytest.approx(statistics.stdev(values), rel=1e-12) and found["n"] == 4


def test_gates_are_decided_on_the_mean_in_each_gates_direction():
    def run(acc: float, latency: float, parity: float | None, parity_passed: bool = True) -> dict:
        return {"gates": {"accuracy_min": {"value": acc, "limit": 0.9, "passed": acc >= 0.9},
                          "latency_p50_ms_max:bs1": {"value": latency, "limit": 5.0, "passed": latency <= 5.0},
                          "parity_atol": {"value": parity, "limit": 1e-4, "passed": parity_passed}}}

    gates = mean_gates([run(0.95, 6.0, 1e-5), run(0.88, 3.0, None, True)])
    assert gates["accuracy_min"]["value"] == pytest.approx(0.915) and gates["accuracy_min"]["passed"]
    assert gates["latency_p50_ms_max:bs1"]["value"] == pytest.approx(4.5) and gates["latency_p50_ms_max:bs1"]["passed"]
    assert gates["parity_atol"] == {"value": None, "limit": 1e-4, "passed": True}  # no mean: every run passed it
    failing = mean_gates([run(0.89, 1.0, 1e-5), run(0.9, 1.0, None, False)])
    assert not failing["accuracy_min"]["passed"] and not failing["parity_atol"]["passed"]
    assert at_least("speedup_vs_teacher_min:bs64") and not at_least("max_accuracy_drop_vs_teacher")


def test_the_best_seed_is_the_most_accurate_of_those_passing_on_their_own():
    rows = [{"seed": 0, "gates_passed": True, "student_test_accuracy": 0.90},
            {"seed": 1, "gates_passed": False, "student_test_accuracy": 0.97},
            {"seed": 2, "gates_passed": True, "student_test_accuracy": 0.93},
            {"seed": 3, "gates_passed": True, "student_test_accuracy": 0.93}]
    seed, why = best_seed(rows)
    assert seed == 2 and "0.9300" in why and "3 seed(s)" in why  # seed 3 ties: the earlier seed wins
    assert best_seed([{**rows[1]}]) == (None, "no seed's run passed every gate on its own")


@pytest.mark.parametrize("scope, shared_seed", [("student", 5), ("run", 7)])
def test_each_seeds_run_varies_the_student_or_with_seed_scope_run_everything(scope, shared_seed):
    parent = load_pipeline(DIGITS, ["seed=5", "seeds=[7, 8]", f"seed_scope={scope}", "distill.baseline=true"])
    assert seed_runs(parent) == [("seed-7", 7), ("baseline-7", 7), ("seed-8", 8), ("baseline-8", 8)]
    distilled = load_pipeline(DIGITS, [*parent_overrides(parent), *child_overrides(parent, "seed-7", 7)])
    baseline = load_pipeline(DIGITS, [*parent_overrides(parent), *child_overrides(parent, "baseline-7", 7)])
    for child in (distilled, baseline):
        assert child.seeds is None and not child.distill.baseline
        assert child.seed == shared_seed and child.training_seed == 7  # seed: the data split's and the teacher's
    assert distilled.distill.method == "kd" and baseline.distill.method == "none"


def parent_overrides(pipeline) -> list[str]:
    return ["seed=5", "seeds=[7, 8]", f"seed_scope={pipeline.seed_scope}", "distill.baseline=true"]


# --- refused before anything is made ----------------------------------------------------------------------------


@pytest.mark.parametrize("args, key", [
    (["--seeds", "0,1,x"], "--seeds: expected comma-separated integers"),
    (["--seeds", "0,1,1"], "seeds: expected distinct seeds"),
    (["--seeds", "4"], "seeds: expected at least 2 seeds"),
    (["--seeds", "0,1", "--set", "seeds=[2,3]"], "--seeds: given twice"),
    (["--seeds", "0,1", "--set", "student_seed=3"], "student_seed: contradicts seeds"),
    (["--set", "seed_scope=run"], "seed_scope: acts only with seeds"),
    (["--set", "distill.baseline=true"], "distill.baseline: acts only with seeds"),
    (["--seeds", "0,1", "--set", "distill.baseline=true", "--set", "distill.method=none", "--set", "distill.params={}"],
     "distill.baseline: the method is none already"),
    (["--seeds", "0,1", "--until", "distill"], "--until: a multi-seed run"),
])
def test_contradictions_exit_2_in_one_line_leaving_nothing(workdir, args, key):
    result = cli("run", DIGITS, *args)
    assert result.exit_code == 2, result.output
    assert result.output.strip() == result.output.strip().splitlines()[0] and key in result.output, result.output
    assert not (workdir / "runs").exists() and tracked_nothing(workdir)


def test_the_flag_overrides_the_key_and_resume_keeps_the_seeds(workdir):
    file = write_pipeline(workdir / "p.yaml", seeds=[1, 2])
    assert cli("check", file).exit_code == 0  # seeds: in the file is a valid key
    result = cli("run", file, "--seeds", "7,7")  # the flag's seeds are the ones checked
    assert result.exit_code == 2 and "got 7 more than once" in result.output, result.output
    search = write_pipeline(workdir / "s.yaml", base=PIPELINES / "digits-search.yaml", seeds=[1, 2])
    assert "seeds: a multi-seed run has no search: section" in cli("check", search).output
    resumed = cli("run", "--resume", workdir, "--seeds", "0,1")
    assert resumed.exit_code == 2 and "--seeds: a resumed run keeps the seeds" in resumed.output
    assert tracked_nothing(workdir)


# --- real runs ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_seeds(tmp_path_factory, teacher_cache, mlflow_store_template):
    """`kdpipe run --seeds 0,1,2` on the default pipeline (fast settings, gates a fast student meets) with a
    baseline, run once for the tests that read it."""
    with pytest.MonkeyPatch.context() as patch:
        workdir = enter_workdir(patch, tmp_path_factory.mktemp("three-seeds"), teacher_cache, mlflow_store_template)
        result = cli("run", DIGITS, "--seeds", "0,1,2", *sets(*FAST, *LENIENT, *CHEAP, "distill.baseline=true"))
        yield workdir, result, dict(os.environ)


@pytest.fixture
def seeds_env(three_seeds, monkeypatch):
    workdir, result, env = three_seeds
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    assert result.exit_code == 0, result.output
    return read_report(result.stdout)


@pytest.mark.slow
def test_three_seeds_one_parent_three_nested_runs_mean_and_std(seeds_env):
    report = seeds_env
    parent_id = report["mlflow"]["run_id"]
    runs = {r.info.run_id: r for r in all_runs()}
    nested = [r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") == parent_id]
    seeds = {r.data.tags["kdpipe.seed"]: r for r in nested if r.data.tags["kdpipe.method"] == "kd"}
    assert len(runs) == 7 and len(nested) == 6 and sorted(seeds) == ["0", "1", "2"]  # 3 seeds, 3 baselines
    assert runs[parent_id].info.status == "FINISHED" and all(r.info.status == "FINISHED" for r in nested)
    assert report["status"] == "passed" and report["seeds"]["std"] == "sample standard deviation (n − 1)"
    summary = report["seeds"]["summary"]
    # Each number against the children's own MLflow records: best epoch = the highest validation accuracy of the
    # epochs, last epoch = the last step's, test = what validate logged; the teacher is shared (std 0).
    recorded = {"student_val_accuracy_best_epoch": lambda r: max(m.value for m in history(r, "student/val_accuracy")),
                "student_val_accuracy_last_epoch": lambda r: history(r, "student/val_accuracy")[-1].value,
                "student_test_accuracy": lambda r: history(r, "student/test_accuracy")[-1].value,
                "teacher_test_accuracy": lambda r: history(r, "teacher/test_accuracy")[-1].value}
    parent_metrics = runs[parent_id].data.metrics
    for key, read in recorded.items():
        values = [read(seeds[str(s)].info.run_id) for s in (0, 1, 2)]
        assert summary[key]["mean"] == pytest.approx(statistics.fmean(values), rel=1e-9), key
        assert summary[key]["std"] == pytest.approx(statistics.stdev(values), rel=1e-9, abs=1e-12), key
        assert parent_metrics[f"seeds/{key}/mean"] == pytest.approx(summary[key]["mean"], rel=1e-9)
        assert parent_metrics[f"seeds/{key}/std"] == pytest.approx(summary[key]["std"], rel=1e-9, abs=1e-12)
        assert [row[key] for row in report["seeds"]["runs"]] == pytest.approx(values, rel=1e-9)
    assert summary["student_val_accuracy_last_epoch"]["epoch_policy"] == "last epoch"
    assert summary["student_test_accuracy"]["epoch_policy"] == "best epoch on validation"
    assert summary["teacher_test_accuracy"]["std"] == 0.0
    assert summary["student_test_accuracy"]["std"] > 0  # the seeds did train different students
    for seed in (1, 2):  # the teacher was trained (or read) once: the other seeds read it from the cache
        child = json.loads((Path(report["run_dir"]) / f"seed-{seed}" / "report.json").read_text())
        assert child["teacher"]["source"].startswith("cache")


@pytest.mark.slow
def test_three_seeds_gain_over_the_baseline(seeds_env):
    report = seeds_env
    runs = {r.data.tags.get("kdpipe.run_dir"): r for r in all_runs()}
    root = Path(report["run_dir"])
    gain = report["seeds"]["baseline"]["gain"]["student_test_accuracy_torch"]
    differences = []
    for seed in (0, 1, 2):
        distilled, baseline = runs[str(root / f"seed-{seed}")], runs[str(root / f"baseline-{seed}")]
        assert baseline.data.tags["kdpipe.method"] == "none"
        assert baseline.data.tags["mlflow.parentRunId"] == report["mlflow"]["run_id"]
        differences.append(distilled.data.metrics["student/test_accuracy_torch"]
                           - baseline.data.metrics["student/test_accuracy_torch"])
    assert gain["mean"] == pytest.approx(statistics.fmean(differences), rel=1e-9)
    assert gain["std"] == pytest.approx(statistics.stdev(differences), rel=1e-9)
    parent = client().get_run(report["mlflow"]["run_id"]).data.metrics
    assert parent["seeds/gain/student_test_accuracy_torch/mean"] == pytest.approx(gain["mean"], rel=1e-9)


@pytest.mark.slow
def test_three_seeds_register_the_best_seed_only(seeds_env):
    report = seeds_env
    rows = report["seeds"]["runs"]
    best = max((r for r in rows if r["gates_passed"]), key=lambda r: r["student_test_accuracy"])
    assert report["seeds"]["registered"]["seed"] == best["seed"] and "highest" in report["seeds"]["registered"]["why"]
    versions = client().search_model_versions("name = 'digits-student'")
    assert len(versions) == 1 and versions[0].run_id == best["mlflow_run_id"]
    assert report["mlflow"]["model_version"] == str(versions[0].version)
    assert [r["registered"] for r in rows] == [r["seed"] == best["seed"] for r in rows]
    assert {r["status"] for r in rows if not r["registered"]} == {"stopped"}  # through validate, never registered


@pytest.mark.slow
def test_the_parent_has_a_page_with_every_seeds_run_side_by_side(seeds_env):
    from test_report_html import check_in_browser, self_contained

    report = seeds_env
    page = Path(report["run_dir"]) / "report.html"
    assert report["report_html"]["path"] == str(page) and report["report_html"]["seconds"] > 0
    html = page.read_text()
    self_contained(html)
    for seed in (0, 1, 2):  # each seed's own run, as kdpipe compare shows it (the baselines are not compared)
        child = json.loads((Path(report["run_dir"]) / f"seed-{seed}" / "report.json").read_text())
        assert child["run_id"] in html
    assert "baseline-0" not in html and html.count("training loss parts") == 3
    registered = report["seeds"]["registered"]["seed"]
    assert f"the mean over seeds 0, 1, 2. Registered: {registered} (" in html
    mean = report["gates"]["accuracy_min"]["value"]
    assert f"{mean:.6g}" in html  # the parent's gates, on the mean
    check_in_browser(page)
    artifacts = [a.path for a in client().list_artifacts(report["mlflow"]["run_id"])]
    assert "report.html" in artifacts


@pytest.mark.slow
def test_a_gate_failing_on_the_mean_registers_nothing(workdir):
    result = cli("run", DIGITS, "--seeds", "0,1", *sets(*FAST, *CHEAP, "validate.gates.accuracy_min=0.999",
                                                        "validate.gates.max_accuracy_drop_vs_teacher=0.5"))
    assert result.exit_code == 1 and "gate failed: accuracy_min" in result.output, result.output
    report = read_report(result.stdout)
    assert report["status"] == "failed" and not report["gates"]["accuracy_min"]["passed"]
    assert report["seeds"]["registered"] == {
        "seed": None, "why": "not registered: the mean over seeds failed gate(s): accuracy_min"}
    assert client().search_model_versions("name = 'digits-student'") == []
    assert client().get_run(report["mlflow"]["run_id"]).info.status == "FAILED"


@pytest.mark.slow
def test_sigkill_during_seed_1_then_resume_finishes_the_rest_once(workdir):
    overrides = sets(*FAST, *LENIENT, *CHEAP)
    proc = start_run("run", DIGITS, "--seeds", "0,1,2", *overrides)
    read_until(proc, "[seed-1] started")
    read_until(proc, "student epoch 3/")
    proc.kill()  # SIGKILL: no handler runs, the parent's and seed 1's MLflow runs stay RUNNING
    proc.wait()
    (parent_dir,) = (workdir / "runs" / "digits").iterdir()
    assert json.loads((parent_dir / "ledger.json").read_text())["finished"] == ["seed-0"]
    refused = cli("run", "--resume", parent_dir / "seed-1")  # a seed's run continues through its parent only
    assert refused.exit_code == 2 and f"continue that: kdpipe run --resume {parent_dir}" in refused.output

    resumed = run_process("run", "--resume", parent_dir, env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr
    assert "[seed-0]" not in resumed.stderr and "[seed-1] continued" in resumed.stderr
    assert "student epoch 1/" in resumed.stderr.split("[seed-2]")[1]  # seed 2 starts; seed 1 continues
    assert "student epoch 1/" not in resumed.stderr.split("[seed-2]")[0]
    report = read_report(resumed.stdout)
    assert report["status"] == "passed" and report["resumed"] == 1
    assert [r["seed"] for r in report["seeds"]["runs"]] == [0, 1, 2]
    parent_id = report["mlflow"]["run_id"]
    runs = all_runs()
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert len(children) == 3
    for child in children:  # every epoch once: no gap, no duplicate step
        assert [m.step for m in history(child.info.run_id, "student/val_accuracy")] == list(range(1, 7))
    assert len(history(parent_id, "seeds/student_test_accuracy/mean")) == 1  # the aggregate, computed once


def test_the_runner_alone_refuses_a_multi_seed_pipeline_leaving_nothing(workdir):
    """kdpipe.launch (what `kdpipe run` calls) runs a multi-seed pipeline once per seed; kdpipe.runner, which knows
    nothing of seeds so that the two never import each other, refuses one rather than run it as a single seed."""
    from kdpipe.errors import InputError
    from kdpipe.runner import run_pipeline

    file = write_pipeline(workdir / "p.yaml", seeds=[1, 2])
    with pytest.raises(InputError) as err:
        run_pipeline(file, [], workdir / "runs")
    assert err.value.key == "seeds" and "kdpipe.launch" in err.value.message
    assert not (workdir / "runs").exists() and tracked_nothing(workdir)
