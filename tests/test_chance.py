"""Nothing at chance ships: the above_chance gate on the teacher (ending the run before distillation) and on the
delivered model, on by default and off only where the pipeline names it; a reset head that is never trained is an
input error. Also the size estimate of teacher views that bounds distill.teacher_views (its refusals, and the crop
padding's, are rows of test_faults.py)."""

from __future__ import annotations

import os
import re
from fractions import Fraction
from math import comb
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient
from torch import nn

from conftest import FAST, PIPELINES, read_report, run_process, sets, tracked_nothing, write_pipeline

DIGITS = PIPELINES / "digits.yaml"
# Every gate but above_chance off: what is left to fail a model at chance is that gate alone.
OTHER_GATES_OFF = ["validate.gates.accuracy_min=null", "validate.gates.max_accuracy_drop_vs_teacher=null",
                   "validate.gates.latency_p50_ms_max=null"]
CHEAP = ["export.quantize=none", "export.deliver=fp32", "validate.batch_sizes=[1]", "validate.runs=5",
         "validate.warmup=0"]


def test_the_p_value_is_the_exact_binomial_tail_against_the_most_common_class():
    from kdpipe.chance import ChanceLevel

    level = ChanceLevel(rate=0.1, size=50)
    exact = sum(comb(50, k) * Fraction(1, 10) ** k * Fraction(9, 10) ** (50 - k) for k in range(10, 51))
    assert level.p_value(10 / 50) == pytest.approx(float(exact), rel=1e-9)
    assert level.p_value(0.0) == 1.0
    # 90 of 100 test labels in one class: always answering it scores 0.9, which is chance here, not skill.
    skewed = ChanceLevel.of(torch.tensor([0] * 90 + [1] * 10))
    assert skewed.rate == 0.9 and skewed.p_value(0.9) > 0.5 and skewed.p_value(0.99) < 1e-3
    assert ChanceLevel.of(torch.arange(100) % 4).rate == 0.25  # balanced classes: 1/C
    assert ChanceLevel.of(torch.zeros(10, dtype=torch.long)).p_value(1.0) == 1.0  # one class: nothing to show


@pytest.fixture(scope="module")
def shuffled_digits(tmp_path_factory) -> Path:
    """scikit-learn's digits with their labels shuffled: images and labels no longer belong together."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    path = tmp_path_factory.mktemp("shuffled") / "digits.npz"
    labels = np.random.default_rng(0).permutation(digits.target)
    np.savez(path, x=(digits.images / 16.0).astype(np.float32)[:, None], y=labels)
    return path


def shuffled_pipeline(workdir: Path, data: Path) -> Path:
    return write_pipeline(workdir / "p.yaml", **{"data.source": "npz", "data.path": str(data),
                                                  "teacher.model.width": 8, "teacher.train.epochs": 2})


def test_a_teacher_at_chance_fails_the_run_before_any_distillation(workdir, shuffled_digits):
    path = shuffled_pipeline(workdir, shuffled_digits)
    proc = run_process("run", path, "--runs-dir", workdir / "runs", *sets("distill.epochs=1", *CHEAP))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert re.match(r"^gate failed: teacher_above_chance: teacher test accuracy 0\.\d{4} is not significantly above "
                    r"chance \(0\.\d{4}, the most common class's share of the 359 test samples\): p = [\d.e+-]+ > "
                    r"validate\.gates\.above_chance 0\.001; likely wrong: ", line), line
    assert all(cause in line for cause in ("decoding", "labels", "random classifier head"))
    (run_dir,) = (workdir / "runs" / "digits").iterdir()
    report = read_report(str(run_dir / "report.json"))
    assert report["status"] == "failed" and report["failed_stage"] == "teacher"
    gate = report["gates"]["teacher_above_chance"]
    assert gate["passed"] is False and gate["limit"] == 0.001 and gate["value"] > 0.001
    assert report["teacher"]["chance_rate"] >= 0.1 and "student" not in report
    assert not (run_dir / "student.pt").exists() and not (run_dir / "checkpoints" / "distill").exists()
    run = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(report["mlflow"]["run_id"])
    assert run.info.status == "FAILED"
    assert run.data.tags["kdpipe.status"] == "failed" and run.data.tags["kdpipe.failed_stage"] == "teacher"


def test_the_chance_gate_is_off_only_where_the_pipeline_names_it(workdir, shuffled_digits):
    path = shuffled_pipeline(workdir, shuffled_digits)
    proc = run_process("run", path, "--runs-dir", workdir / "runs", "--until", "teacher",
                       *sets("validate.gates.above_chance=null"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = read_report(proc.stdout)
    assert report["status"] == "stopped" and report["gates"] == {}
    assert report["teacher"]["accuracy"] < 0.2  # at chance, and let through because the pipeline says so
    # The run's record keeps the choice, so a resumed run keeps the gate off too.
    resolved = yaml.safe_load((Path(report["run_dir"]) / "pipeline.yaml").read_text())
    assert resolved["validate"]["gates"]["above_chance"] is None


class AlwaysThree(nn.Module):
    """A classifier of 8×8 digits that answers class 3 whatever the image: accuracy = the share of threes."""

    def __init__(self):
        super().__init__()
        self.register_buffer("logits", torch.eye(10)[3])

    def forward(self, x):
        return x.flatten(1)[:, :1] * 0 + self.logits


def test_a_delivered_model_at_chance_fails_the_gate_with_every_other_gate_off(workdir, tmp_path):
    from kdpipe.onnx_export import export_onnx

    model = tmp_path / "always-three.onnx"
    export_onnx(AlwaysThree(), torch.zeros(2, 1, 8, 8), model, 18, True)
    proc = run_process("validate", model, "--pipeline", DIGITS, *sets(*FAST, *OTHER_GATES_OFF, "validate.batch_sizes=[1]"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    report = read_report(proc.stdout)
    gates = report["gates"]
    assert report["status"] == "failed" and set(gates) == {"teacher_above_chance", "above_chance"}
    assert gates["teacher_above_chance"]["passed"] and gates["teacher_above_chance"]["value"] < 1e-6
    assert not gates["above_chance"]["passed"] and gates["above_chance"]["value"] > 0.1
    assert report["student"]["accuracy"] < 0.15 and report["student"]["chance_rate"] >= 0.1
    assert "  above_chance: student test accuracy" in proc.stderr and "likely wrong: " in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "gate failed: above_chance"


@pytest.mark.parametrize("given", ["weights", "hf"])
def test_a_reset_head_that_is_never_trained_is_an_input_error(workdir, given):
    from kdpipe.models import build_model
    from kdpipe.pipeline import load_pipeline

    if given == "weights":
        teacher = load_pipeline(DIGITS).teacher.model
        torch.save(build_model(teacher, "teacher.model", (1, 8, 8), 10).state_dict(), workdir / "teacher.pt")
        model = {**teacher.model_dump(mode="json", exclude_defaults=True), "weights": "teacher.pt", "reset_head": True}
    else:  # a transformers classifier of 3 classes: reset_head replaces its head for digits' 10
        pytest.importorskip("transformers")
        from test_models import save_hf_vit

        model = {"arch": f"hf:{save_hf_vit(workdir / 'vit', classes=3)}", "reset_head": True}
    path = write_pipeline(workdir / "p.yaml", **{"teacher.model": model, "teacher.train.epochs": 0})
    for command in ("check", "run"):
        proc = run_process(command, path)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert proc.stderr.strip().splitlines() == [
            f"{path}: teacher.train.epochs: expected ≥ 1 with teacher.model.reset_head true: a classifier it "
            "replaces starts random and 0 epochs never train it; set reset_head: false where the weights already "
            "classify the data's 10 classes"]
    assert not (workdir / "runs").exists() and tracked_nothing(workdir)
    trained = run_process("check", path, *sets("teacher.train.epochs=1"))
    assert trained.returncode == 0, trained.stderr[-3000:]


@pytest.mark.parametrize("augment", [[{"random_crop": {"padding": 2}}, "hflip"],
                                     [{"random_resized_crop": {}}, {"color_jitter": {"brightness": 0.2}}]],
                         ids=["crop-flip", "resized-crop-jitter"])
def test_the_views_estimate_that_bounds_teacher_views_is_their_size(augment):
    """distill.teacher_views is refused when views_nbytes exceeds the free memory: it must be the views' real size."""
    from kdpipe.config import ModelConfig
    from kdpipe.data.sources import data_config
    from kdpipe.data import load_data
    from kdpipe.models import build_model
    from kdpipe.teacher_cache import TeacherOutputCache
    from kdpipe.teacher_views import _nbytes, teacher_views, views_nbytes

    data = load_data(data_config(augment=augment), seed=0)
    teacher = build_model(ModelConfig(arch="cnn", width=4, depth=1), "teacher", data.input_shape, data.num_classes)
    made = teacher_views(TeacherOutputCache(), teacher, data, views=2, topk=3, seed=0)
    assert views_nbytes(data, 2, 3) == _nbytes(made.state())
