"""Every method runs in the one training loop: searchable, resumable after SIGKILL, and under torchrun (issue 10).

The defects the one loop fixed each have a test here: FitNets' hint stage under search, Born-Again's
teacher outputs keyed by content, device placement of the checks a search stage runs, fp32 feature losses
under autocast. The method-specific facts (FitNets' middle layers, AT's β/2 and equal-resolution pairs,
SP's layer, the conditional discriminator, DML's Algorithm 1, BAN's log-mean ensemble) are in the tests of
each method family.

Under torchrun, all methods share one launch (tests/torchrun_methods.py: each rank runs them in turn, in its own
process); each method's exit codes, output, MLflow store and run directory are still checked by a test of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import FAST, ONE_THREAD, PIPELINES, run_process, sets, start_run
from kdpipe.locks import file_lock
from kdpipe.methods import get_method
from kdpipe.runner import prepare, run_pipeline

# (pipeline file, extra overrides): every method, FitNets in both forms.
METHODS = {
    "kd": ("digits.yaml", []),
    "fitnets-2": ("fitnets.yaml", ["distill.params.hint_epochs=1"]),
    "fitnets-1": ("fitnets.yaml", ["distill.params.stages=1"]),
    "at": ("at.yaml", []),
    "nst": ("nst.yaml", []),
    "rkd": ("rkd.yaml", []),
    "sp": ("sp.yaml", []),
    "adversarial": ("adversarial.yaml", []),
    "dml": ("dml.yaml", []),
    "ban": ("ban.yaml", ["distill.params.generations=2"]),
    "dkd": ("dkd.yaml", []),
    "dist": ("dist.yaml", []),
    "ctkd": ("ctkd.yaml", []),
    "mlkd": ("mlkd.yaml", []),
    "crd": ("crd.yaml", []),
    "pkt": ("pkt.yaml", []),
    "vid": ("vid.yaml", []),
    "reviewkd": ("reviewkd.yaml", []),
    "ofd": ("ofd.yaml", []),
}


def overrides(name: str, *more: str) -> list[str]:
    file, extra = METHODS[name]
    fast = [o for o in FAST if not (file == "dml.yaml" and o.startswith("teacher."))]  # dml.yaml: no teacher
    return [*fast, *extra, *more]


def mlflow_client(store: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=store, registry_uri=store)


def metric_steps(client, run_id: str) -> dict[str, list[int]]:
    return {key: sorted(m.step for m in client.get_metric_history(run_id, key))
            for key in client.get_run(run_id).data.metrics}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(METHODS))
def test_two_trial_one_epoch_search_completes(workdir, name):
    file, _ = METHODS[name]
    _, report = run_pipeline(PIPELINES / file, overrides(name, "distill.epochs=1", "search={trials: 2}"),
                             workdir / "runs", until="search")
    search = report["search"]
    assert search["n_complete"] == 2 and search["n_failed"] == 0, search


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dkd", "dist", "ctkd", "mlkd", "crd", "pkt", "vid", "reviewkd", "ofd"])
def test_each_new_methods_pipeline_passes_its_gates_as_written(workdir, name):
    """pipelines/<name>.yaml, unchanged (its 30 epochs and its gates), through every stage to the registry."""
    from conftest import cli, read_report

    result = cli("run", PIPELINES / METHODS[name][0])
    assert result.exit_code == 0, result.output
    report = read_report(result.stdout)
    assert report["status"] == "passed" and report["method"]["name"] == name
    assert report["student"]["accuracy"] >= 0.93 and report["mlflow"]["model_version"] is not None


def test_fitnets_two_stage_search_reports_only_evaluated_epochs(workdir):
    """Defect 1: every FitNets trial died with KeyError 'val_accuracy' (the hint stage has no validation)."""
    _, report = run_pipeline(PIPELINES / "fitnets.yaml", overrides("fitnets-2", "distill.epochs=1", "search={trials: 2}"),
                             workdir / "runs", until="search")
    assert report["search"]["n_complete"] == 2, report["search"]


def test_born_again_search_passes_each_generation_once(workdir, teacher_cache):
    """Defect 2: outputs keyed by id(teacher) let a trial learn from a dead network of another trial. Keyed by
    content: one pass of the teacher for every trial, plus one per later generation of each trial (a continuous
    label_weight makes every trial's generation 1 different; two identical trials would share their entry)."""
    import shutil

    cache = workdir / "cache"  # the session's trained teachers, but no teacher outputs on disk yet
    shutil.copytree(teacher_cache, cache, ignore=lambda folder, names: ["teacher-outputs"])
    trials = 3
    _, report = run_pipeline(PIPELINES / "ban.yaml", overrides("ban", "distill.epochs=1", f"search={{trials: {trials}, "
                             "space: {label_weight: {low: 0.1, high: 10.0, log: true}}}"), workdir / "runs",
                             cache_dir=cache, until="search")
    assert report["search"]["n_complete"] == trials
    assert report["search"]["teacher_forward_passes"] == 1 + trials * (2 - 1)


@pytest.mark.parametrize("name", ["kd", "fitnets-2", "at", "nst", "rkd", "sp", "adversarial", "dml", "ban"])
def test_model_checks_run_on_the_models_device(workdir, name):
    """Defect 10: a search on CUDA failed at once (a check built its dry-run input on the CPU). With the models on
    the `meta` device, any tensor a check creates elsewhere fails the forward pass."""
    file, _ = METHODS[name]
    prepared = prepare(PIPELINES / file, overrides(name), check_models=False)
    student = prepared.student.to("meta")
    teacher = prepared.teacher.to("meta") if prepared.teacher is not None else None
    method = get_method(prepared.pipeline.distill.method)
    method.check_models(prepared.pipeline, student=student, teacher=teacher, input_shape=prepared.data.input_shape)
    built = method(prepared.pipeline.distill.params, student=student, teacher=teacher,
                   num_classes=prepared.data.num_classes, input_shape=prepared.data.input_shape,
                   taps=prepared.pipeline.distill.taps)
    extra = built.extra_modules()
    assert extra is None or all(p.device.type == "meta" for p in extra.parameters())


@pytest.mark.parametrize("name, part", [("nst", "nst"), ("rkd", "relation"), ("sp", "relation"), ("at", "at")])
def test_feature_and_relation_losses_run_in_fp32_under_autocast(digits, name, part):
    """Defect 6: under bf16 autocast, Gram matrices and distances lost precision; these terms now run in fp32."""
    from kdpipe.taps import forward_with_taps
    from kdpipe.train import Batch

    file, _ = METHODS[name]
    prepared = prepare(PIPELINES / file, overrides(name))
    method_cls = get_method(name)
    method = method_cls(prepared.pipeline.distill.params, student=prepared.student, teacher=prepared.teacher,
                        num_classes=10, input_shape=digits.input_shape, taps=prepared.pipeline.distill.taps)
    x, y = digits.x_train[:32], digits.y_train[:32]
    student = forward_with_taps(prepared.student.eval(), x, method.student_taps())
    teacher = forward_with_taps(prepared.teacher.eval(), x, method.teacher_taps()).detach()
    to_bf16 = lambda out: type(out)(out.logits.bfloat16(), {k: v.bfloat16() for k, v in out.features.items()})  # noqa: E731
    batch = Batch(torch.arange(32), x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, mixed = method.loss(batch, to_bf16(student), to_bf16(teacher))
    as_fp32 = lambda out: type(out)(out.logits.bfloat16().float(), {k: v.bfloat16().float() for k, v in out.features.items()})  # noqa: E731
    _, exact = method.loss(batch, as_fp32(student), as_fp32(teacher))
    assert mixed[part].dtype == torch.float32
    torch.testing.assert_close(mixed[part], exact[part], rtol=1e-5, atol=1e-7)


def _wait_for_checkpoint(proc: subprocess.Popen, runs: os.PathLike, timeout: float = 240.0) -> bool:
    """Poll until the first distill checkpoint exists (the first epoch of the first phase is saved)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if any(p.suffix == ".pt" for p in __import__("pathlib").Path(runs).glob("*/*/checkpoints/distill/*.pt")):
            return True
        time.sleep(0.02)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("name", list(METHODS))
def test_sigkill_mid_distillation_then_resume_ends_with_every_epoch_once(workdir, name):
    file, _ = METHODS[name]
    epochs = 4
    proc = start_run("run", PIPELINES / file, "--until", "distill", *sets(*overrides(name, f"distill.epochs={epochs}")),
                     cwd=workdir)
    assert _wait_for_checkpoint(proc, workdir / "runs"), proc.stderr.read() if proc.poll() is not None else "timeout"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (run_dir,) = (workdir / "runs").glob("*/*")
    assert "distill" not in __import__("json").loads((run_dir / "ledger.json").read_text())["finished"]

    resumed = run_process("run", "--resume", run_dir, "--until", "distill", env=ONE_THREAD, cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    client = mlflow_client(os.environ["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    steps = metric_steps(client, run.info.run_id)
    for key, seen in steps.items():
        assert len(seen) == len(set(seen)), (key, seen)  # no duplicate metric steps
    evaluated = [k for k in steps if k.endswith("/val_accuracy") and not k.startswith("teacher/")]
    assert evaluated
    for key in evaluated:
        assert steps[key] == list(range(1, epochs + 1)), (key, steps[key])  # the same epochs as one run


TORCHRUN_TIMEOUT_S = 900  # the whole launch: a rank stuck in one method cannot hold the suite forever


@pytest.fixture(scope="module")
def gloo_runs(tmp_path_factory, teacher_cache, mlflow_store_template) -> dict:
    """Every method's `kdpipe run PIPELINE --until distill` under one `torchrun --nproc-per-node 2` launch
    (tests/torchrun_methods.py): the two ranks run the methods in turn, each in a working directory of its own
    as enter_workdir makes (its own MLflow store, the session's teachers). One launch instead of one per method:
    each launch paid its three processes' imports (torch, MLflow, ONNX), most of a method's time.
    Under pytest-xdist the first worker here launches and the others read its outcome, instead of each worker
    launching every method for its share of these tests."""
    launch = lambda: _launch_every_method(tmp_path_factory.mktemp("gloo-runs"), teacher_cache, mlflow_store_template)  # noqa: E731
    if "PYTEST_XDIST_WORKER" not in os.environ:
        found = launch()
    else:
        shared = tmp_path_factory.getbasetemp().parent / "gloo-runs.json"  # the folder this session's workers share
        with file_lock(shared.with_suffix(".lock")):
            if not shared.exists():
                shared.write_text(json.dumps(launch()))
            found = json.loads(shared.read_text())
    return {**found, "root": Path(found["root"])}


def _launch_every_method(root: Path, teacher_cache: Path, store_template: Path) -> dict:
    runs = []
    for name, (file, _) in METHODS.items():
        cwd = root / name
        cwd.mkdir()
        shutil.copyfile(store_template, cwd / "mlflow.db")
        runs.append({"name": name, "cwd": str(cwd),
                     "env": {"MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}", "KDPIPE_CACHE_DIR": str(teacher_cache)},
                     "argv": ["run", str(PIPELINES / file), "--until", "distill", *sets(*overrides(name, "distill.epochs=2"))]})
    spec = root / "spec.json"
    spec.write_text(json.dumps({"runs": runs, "pids": str(root), "rank_wait_s": TORCHRUN_TIMEOUT_S / 3}))
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(Path(__file__).with_name("torchrun_methods.py")), str(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        out, err = proc.communicate(timeout=TORCHRUN_TIMEOUT_S)
        ended = f"torchrun exited {proc.returncode}"
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun ends its ranks (each in a session of its own) on SIGTERM
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            for pid_file in root.glob("rank*.pid"):
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)
            proc.kill()
            out, err = proc.communicate()
        ended = f"torchrun timed out after {TORCHRUN_TIMEOUT_S} s"
    return {"root": str(root), "ended": ended, "output": (out + err)[-3000:]}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(METHODS))
def test_two_process_gloo_run_completes_with_rank_0_alone_writing_to_mlflow(gloo_runs, name):
    cwd = gloo_runs["root"] / name
    read = lambda file: file.read_text() if file.exists() else None  # noqa: E731 - None: the rank never got there
    codes = [read(cwd / f"rank{rank}.exit") for rank in (0, 1)]
    errors = "".join(f"rank {rank} exit {codes[rank]}:\n{(read(cwd / f'rank{rank}.err') or '')[-3000:]}\n" for rank in (0, 1))
    assert None not in codes, f"{errors}{gloo_runs['ended']}:\n{gloo_runs['output']}"
    assert codes == ["0", "0"], errors
    outs = [read(cwd / f"rank{rank}.out") for rank in (0, 1)]
    assert [out.count("report.json") for out in outs] == [1, 0], outs  # rank 0 prints the report's path, rank 1 nothing
    client = mlflow_client(f"sqlite:///{cwd / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    for key, seen in metric_steps(client, runs[0].info.run_id).items():
        assert len(seen) == len(set(seen)), (key, seen)  # each epoch logged once, not once per rank
    assert len(list((cwd / "runs").glob("*/*"))) == 1  # one run directory, rank 0's


def test_a_run_that_makes_no_optimizer_step_is_an_input_error(digits):
    """Every batch of one sample is skipped (BatchNorm cannot train on one): a model that never stepped must not
    ship as if trained."""
    from kdpipe.config import OptimizerConfig
    from kdpipe.errors import InputError
    from kdpipe.train import Trainer

    method = get_method("none")
    student = prepare(PIPELINES / "digits.yaml", []).student
    trainer = Trainer(digits, epochs=1, batch_size=1, optimizer=OptimizerConfig(), seed=0)
    with pytest.raises(InputError) as err:
        method(method.Params(), student=student, teacher=None, num_classes=10, input_shape=digits.input_shape).fit(trainer)
    assert err.value.key == "data.batch_size" and "no optimizer step" in err.value.message


def test_before_epoch_is_called_for_every_epoch_run_resumed_ones_included(digits, tmp_path):
    """A phase's before_epoch gets each epoch's number before it runs; after an interruption in epoch 3 the
    resumed phase calls it for epoch 3 only, so state scheduled by epoch (QAT's BatchNorm freeze) holds."""
    from kdpipe.config import OptimizerConfig
    from kdpipe.train import Phase, Trainer, TrainerSettings

    method = get_method("none")
    student = prepare(PIPELINES / "digits.yaml", []).student
    called = []

    def interrupted_at_3(epoch):
        called.append(epoch)
        if epoch == 3 and called.count(3) == 1:
            raise KeyboardInterrupt

    def phase(trainer):
        update = method(method.Params(), student=student, teacher=None, num_classes=10,
                        input_shape=digits.input_shape).student_update(trainer, "student")
        return Phase("student", [update], 3, evaluate={"student": student}, before_epoch=interrupted_at_3)

    options = dict(epochs=3, batch_size=64, optimizer=OptimizerConfig(), seed=0,
                   settings=TrainerSettings(checkpoint_dir=tmp_path))
    first = Trainer(digits, **options)
    with pytest.raises(KeyboardInterrupt):
        first.run([phase(first)])
    resumed = Trainer(digits, **options)
    resumed.run([phase(resumed)])
    assert called == [1, 2, 3, 3]


@pytest.mark.parametrize("nesterov", [True, False])
def test_sgd_nesterov_is_an_explicit_setting(nesterov):
    from kdpipe.config import OptimizerConfig
    from kdpipe.train import make_optimizer

    cfg = OptimizerConfig(nesterov=nesterov)
    optimizer, _ = make_optimizer(torch.nn.Linear(2, 2).parameters(), cfg, 1, 1)
    assert optimizer.param_groups[0]["nesterov"] is nesterov
    assert OptimizerConfig().nesterov is True  # the documented default
    assert "Nesterov" in OptimizerConfig.model_fields["nesterov"].description


def test_epoch_timings_are_logged_and_summarized(workdir):
    """Per epoch: epoch_seconds and samples_per_second (training) and the validation pass's own, in MLflow and
    the progress line; report.json holds the median epoch and validation seconds, the throughput, and the whole
    stage: its seconds, per epoch, and its one-time teacher pass."""
    from conftest import LENIENT, cli, read_report

    result = cli("run", PIPELINES / "digits.yaml", *sets(*FAST, *LENIENT))
    assert result.exit_code == 0, result.output
    report = read_report(result.stdout)
    timing = report["distill"]["timing"]
    assert timing["epochs"] == 6 and timing["median_epoch_seconds"] > 0 and timing["samples_per_second"] > 0
    assert timing["optimizer_steps"] == 6 * 19  # ceil(1169 / 64) batches per epoch
    assert "epoch_seconds" in result.stderr and "samples_per_second" in result.stderr and "val_seconds" in result.stderr
    # The whole stage beside the steady epoch: training and validation apart, one-time costs named (issue 25).
    assert 0 < timing["median_val_seconds"] < timing["stage_seconds_per_epoch"]
    assert timing["first_epoch_extra_seconds"] >= 0
    (cached,) = report["distill"]["teacher"]
    passed = 0.0 if cached["found_in_cache"] else cached["teacher_pass"]["seconds"]
    assert timing["teacher_pass_seconds"] == pytest.approx(passed)
    assert timing["stage_seconds"] == pytest.approx(timing["stage_seconds_per_epoch"] * 6)
    client = mlflow_client(os.environ["MLFLOW_TRACKING_URI"])
    run_id = report["mlflow"]["run_id"]
    seconds = {m.step: m.value for m in client.get_metric_history(run_id, "student/epoch_seconds")}
    rates = {m.step: m.value for m in client.get_metric_history(run_id, "student/samples_per_second")}
    assert sorted(seconds) == list(range(1, 7))
    for step in seconds:
        assert seconds[step] > 0 and abs(rates[step] * seconds[step] - report["data"]["train"]) <= 0.05 * report["data"]["train"]
    val_rates = client.get_metric_history(run_id, "student/val_samples_per_second")
    assert len(val_rates) == 6 and all(m.value > 0 for m in val_rates)
    val_seconds = [m.value for m in client.get_metric_history(run_id, "student/val_seconds")]
    assert sum(seconds.values()) + sum(val_seconds) + timing["teacher_pass_seconds"] < timing["stage_seconds"]
    params = client.get_run(run_id).data.params
    assert params["distill.optimizer.nesterov"] == "True"


def test_conditional_parameters_are_searched_only_where_they_act():
    """hint_weight acts only in FitNets' joint form, hint_epochs / temperature / alpha only in the two-stage form;
    NST's degree and c only with the polynomial kernel, sigma2 only with the Gaussian one."""
    import optuna

    from kdpipe.pipeline import load_pipeline
    from kdpipe.search import resolve_space

    for file, acts in [("fitnets.yaml", {"hint_weight": ("stages", {1}), "hint_epochs": ("stages", {2}),
                                         "temperature": ("stages", {2}), "alpha": ("stages", {2})}),
                       ("nst.yaml", {"degree": ("kernel", {"polynomial"}), "c": ("kernel", {"polynomial"}),
                                     "sigma2": ("kernel", {"gaussian"})})]:
        space = resolve_space(load_pipeline(PIPELINES / file, ["search={trials: 1}"]))
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        seen = set()
        for _ in range(30):
            trial = study.ask()
            space.suggest(trial)
            for param, (condition, values) in acts.items():
                assert (param in trial.params) == (trial.params[condition] in values), (file, trial.params)
            seen.add(trial.params[next(iter(acts.values()))[0]])
            study.tell(trial, 0.5)
        assert len(seen) > 1  # both settings of the condition were drawn


def test_mlflow_system_metrics_are_on_unless_switched_off(workdir):
    """MLflow's own system metrics (CPU, memory) sit beside the run's metrics; `system_metrics: false` in
    mlflow.yaml turns them off."""
    from conftest import LENIENT, cli, read_report

    # MLflow samples in a thread: sample every 0.1 s, log each sample, and train long enough (30 epochs, a few
    # seconds) that samples exist whatever the machine's speed.
    sampling = {"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.1", "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING": "1"}
    os.environ.update(sampling)
    try:
        runs = {}
        for switch in (True, False):
            (workdir / "mlflow.yaml").write_text(f"system_metrics: {str(switch).lower()}\n")
            result = cli("run", PIPELINES / "digits.yaml", "--until", "distill",
                         *sets(*FAST, *LENIENT, "distill.epochs=30"))
            assert result.exit_code == 0, result.output
            runs[switch] = read_report(result.stdout)["mlflow"]["run_id"]
    finally:
        for key in sampling:
            del os.environ[key]
    client = mlflow_client(os.environ["MLFLOW_TRACKING_URI"])
    on = client.get_run(runs[True]).data.metrics
    off = client.get_run(runs[False]).data.metrics
    assert any(k.startswith("system/cpu") for k in on) and any(k.startswith("system/system_memory") for k in on), sorted(on)
    assert not any(k.startswith("system/") for k in off)
