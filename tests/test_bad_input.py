"""Every bad input: exit 2, one line naming the file, the key and what was expected; nothing written."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import PIPELINES, cli, run_process, tracked_nothing, write_pipeline
from kdpipe.models.zoo import CNN


def assert_input_error(result, file, key, *expected):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith(f"{file}: "), line
    assert key in line, line
    for fragment in expected:
        assert fragment in line, line
    assert "Traceback" not in result.output


def test_yaml_syntax_error_names_line_and_column(workdir):
    bad = workdir / "bad.yaml"
    bad.write_text("name: digits\nstudent:\n  model: {arch: cnn\n  width: 8\n")
    result = cli("check", bad)
    assert_input_error(result, bad, "YAML syntax error", "line 4", "column")


@pytest.mark.parametrize("key, value, fragments", [
    ("distill.temprature", 3, ["distill.temprature", "unknown key", "valid keys here"]),
    ("data.batch_sise", 3, ["data.batch_sise", "did you mean 'batch_size'"]),
])
def test_unknown_key_suggests_nearest(workdir, key, value, fragments):
    path = write_pipeline(workdir / "p.yaml", **{key: value})
    assert_input_error(cli("check", path), path, key, *fragments)


def test_unknown_method_param_suggests_nearest(workdir):
    path = write_pipeline(workdir / "p.yaml", **{"distill.params": {"temprature": 2.0}})
    assert_input_error(cli("check", path), path, "distill.params.temprature", "did you mean 'temperature'")


@pytest.mark.parametrize("key, value, fragments", [
    ("distill.epochs", "many", ["expected an integer", "'many'"]),
    ("data.batch_size", [64], ["expected an integer"]),
    ("export.dynamic_batch", "sometimes", ["expected true or false"]),
    ("distill.params.temperature", "hot", ["expected a number"]),
])
def test_wrong_type(workdir, key, value, fragments):
    path = write_pipeline(workdir / "p.yaml", **{key: value})
    assert_input_error(cli("check", path), path, key, *fragments)


@pytest.mark.parametrize("key, value, fragments", [
    ("distill.epochs", -1, ["≥ 0", "-1"]),
    ("teacher.train.epochs", -5, ["≥ 0"]),
    ("distill.params.temperature", 0, ["> 0"]),
    ("distill.params.temperature", -2.0, ["> 0"]),
    ("data.val_fraction", 1.5, ["< 1"]),
    ("data.test_fraction", 0, ["> 0"]),
    ("distill.params.alpha", 1.2, ["≤ 1"]),
])
def test_value_out_of_range(workdir, key, value, fragments):
    path = write_pipeline(workdir / "p.yaml", **{key: value})
    assert_input_error(cli("check", path), path, key, *fragments)


def test_set_override_is_validated_with_the_schema_type(workdir):
    result = cli("check", PIPELINES / "digits.yaml", "--set", "distill.params.temperature=-1")
    assert_input_error(result, PIPELINES / "digits.yaml", "distill.params.temperature", "> 0")
    ok = cli("check", PIPELINES / "digits.yaml", "--set", "distill.params.temperature=8", "--set", "validate.batch_sizes=[1, 8]")
    assert ok.exit_code == 0, ok.output


def test_unknown_method(workdir):
    path = write_pipeline(workdir / "p.yaml", **{"distill.method": "kdd"})
    assert_input_error(cli("check", path), path, "distill.method", "unknown method 'kdd'", "did you mean 'kd'", "expected one of")


def test_unknown_arch(workdir):
    path = write_pipeline(workdir / "p.yaml", **{"student.model.arch": "transformer"})
    assert_input_error(cli("check", path), path, "student.model.arch", "unknown arch 'transformer'", "cnn, mlp, mobilenetv2, resnet,", "timm:NAME")


def test_invalid_resnet_depth(workdir):
    path = write_pipeline(workdir / "p.yaml", **{"student.model": {"arch": "resnet", "width": 8, "depth": 10}})
    assert_input_error(cli("check", path), path, "student.model.depth", "6n + 2")


def test_missing_checkpoint(workdir):
    path = write_pipeline(workdir / "p.yaml", **{"teacher.checkpoint": "nowhere/teacher.pt"})
    assert_input_error(cli("check", path), path, "teacher.checkpoint", "checkpoint not found", "nowhere/teacher.pt")


def test_missing_data_file(workdir):
    path = write_pipeline(workdir / "p.yaml", **{"data.source": "npz", "data.path": "missing.npz"})
    assert_input_error(cli("check", path), path, "data.path", "data file not found", "missing.npz")


def test_npz_without_x_or_y(workdir):
    np.savez(workdir / "d.npz", images=np.zeros((20, 8, 8)), y=np.zeros(20))
    path = write_pipeline(workdir / "p.yaml", **{"data.source": "npz", "data.path": str(workdir / "d.npz")})
    assert_input_error(cli("check", path), path, "data.path", "no array 'x'", "found: images, y")


def test_labels_that_do_not_match_the_models_classes(workdir):
    # An entry-point model with a fixed 10-way head, on data with 3 classes.
    rng = np.random.default_rng(0)
    np.savez(workdir / "d.npz", x=rng.random((60, 8, 8)), y=np.arange(60) % 3)
    path = write_pipeline(workdir / "p.yaml", **{
        "data.source": "npz", "data.path": str(workdir / "d.npz"),
        "teacher.model": {"entrypoint": "fixture_models:ten_class_mlp"}})
    assert_input_error(cli("check", path), path, "teacher.model", "(10,)", "3 classes")


def test_declared_num_classes_below_the_labels(workdir):
    rng = np.random.default_rng(0)
    np.savez(workdir / "d.npz", x=rng.random((60, 8, 8)), y=np.arange(60) % 6)
    path = write_pipeline(workdir / "p.yaml", **{"data.source": "npz", "data.path": str(workdir / "d.npz"), "data.num_classes": 4})
    assert_input_error(cli("check", path), path, "data.num_classes", "labels go up to 5")


def test_non_integer_labels(workdir):
    np.savez(workdir / "d.npz", x=np.zeros((40, 8, 8)), y=np.linspace(0, 1, 40))
    path = write_pipeline(workdir / "p.yaml", **{"data.source": "npz", "data.path": str(workdir / "d.npz")})
    assert_input_error(cli("check", path), path, "data.path", "integer class labels")


def test_checkpoint_that_does_not_fit_the_model(workdir):
    torch.save(CNN((1, 8, 8), 10, width=16, depth=3).state_dict(), workdir / "teacher.pt")
    path = write_pipeline(workdir / "p.yaml", **{"teacher.checkpoint": str(workdir / "teacher.pt")})
    assert_input_error(cli("check", path), path, "teacher.checkpoint", "does not fit the model", "shape mismatch")


def test_checkpoint_with_pickled_code_is_refused(workdir):
    torch.save({"model": CNN((1, 8, 8), 10)}, workdir / "teacher.pt")  # a whole module, not a state dict
    path = write_pipeline(workdir / "p.yaml", **{"teacher.checkpoint": str(workdir / "teacher.pt")})
    assert_input_error(cli("check", path), path, "teacher.checkpoint", "weights-only")


def test_entrypoint_must_return_a_module(workdir):
    path = write_pipeline(workdir / "p.yaml", **{"student.model": {"entrypoint": "fixture_models:not_a_module"}})
    assert_input_error(cli("check", path), path, "student.model.entrypoint", "expected a torch.nn.Module")


def test_missing_pipeline_file(workdir):
    result = cli("check", workdir / "nope.yaml")
    assert result.exit_code == 2
    assert "pipeline file not found" in result.stderr


def test_bad_run_exits_2_without_traceback_or_run_dir(workdir):
    """A real process: exit 2, one line on stderr, and no run directory or MLflow store left behind."""
    path = write_pipeline(workdir / "p.yaml", **{"distill.epochs": -3})
    proc = run_process("run", path, "--runs-dir", workdir / "runs")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"{path}: distill.epochs: expected a value ≥ 0, got -3"]
    assert proc.stdout == ""
    assert not (workdir / "runs").exists()
    assert tracked_nothing(workdir)


def test_missing_onnxruntime_names_the_extra(workdir):
    """With onnxruntime unimportable, `kdpipe run` says in one line which extra to install."""
    shadow = workdir / "shadow"
    shadow.mkdir()
    (shadow / "onnxruntime.py").write_text("raise ImportError('No module named onnxruntime')\n")
    proc = run_process("run", PIPELINES / "digits.yaml", env={"PYTHONPATH": str(shadow)})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "onnxruntime is not installed: pip install 'kdpipe[cpu]' (or 'kdpipe[gpu]' on a CUDA machine)")
    assert not (workdir / "runs").exists()


def test_the_distill_section_is_validated_whole_against_its_method(workdir):
    """`distill` is a union discriminated by method: params are checked against the method's own schema in one
    pass, so the file's kd params under `--set distill.method=none` are unknown keys, named as a user writes them."""
    from kdpipe.pipeline import load_pipeline

    result = cli("check", PIPELINES / "digits.yaml", "--set", "distill.method=none")
    assert_input_error(result, PIPELINES / "digits.yaml", "distill.params.temperature", "no keys are valid here")
    assert load_pipeline(PIPELINES / "digits.yaml", ["distill.method=none", "distill.params={}"]).distill.method == "none"
    nst = load_pipeline(PIPELINES / "digits.yaml", ["distill.method=nst", "distill.params={}"]).distill.params
    assert nst.weight == 50.0 and nst.kernel == "polynomial"
    result = cli("check", PIPELINES / "digits.yaml", "--set", "distill.method=nst", "--set", "distill.params={kernal: linear}")
    assert_input_error(result, PIPELINES / "digits.yaml", "distill.params.kernal", "did you mean 'kernel'")
    result = cli("check", PIPELINES / "digits.yaml", "--set", "distill.method=kdd")
    assert_input_error(result, PIPELINES / "digits.yaml", "distill.method", "unknown method 'kdd' (did you mean 'kd'?)")
