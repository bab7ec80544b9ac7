"""Relative paths in a pipeline file resolve against the file's folder, `--set` values against the working
directory; a not-found error names the folder a relative path was taken in."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT, cli, read_report, run_process, sets
from kdpipe.config_paths import resolve_path
from kdpipe.pipeline import load_pipeline
from kdpipe.models.zoo import CNN

USER_MODELS = """from kdpipe.models.zoo import CNN


def teacher(input_shape, num_classes):
    return CNN(input_shape, num_classes, width=8, depth=2)
"""


@pytest.fixture
def project(tmp_path):
    """project/pipelines/p.yaml naming ../data/digits.npz, ../weights/teacher.pt and user_models (beside the file)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    (tmp_path / "data").mkdir()
    np.savez(tmp_path / "data" / "digits.npz", x=digits.images[:600] / 16.0, y=digits.target[:600])
    (tmp_path / "weights").mkdir()
    torch.manual_seed(0)
    torch.save(CNN((1, 8, 8), 10, width=8, depth=2).state_dict(), tmp_path / "weights" / "teacher.pt")
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "user_models.py").write_text(USER_MODELS)
    pipeline = {
        "name": "relative", "seed": 0,
        "data": {"source": "npz", "path": "../data/digits.npz", "batch_size": 64},
        "teacher": {"model": {"entrypoint": "user_models:teacher"}, "checkpoint": "../weights/teacher.pt"},
        "student": {"model": {"arch": "cnn", "width": 4, "depth": 2}},
        "distill": {"method": "kd", "epochs": 2, "device": "cpu"},
        "export": {"quantize": "none"},
        # The teacher is an untrained stand-in (the test is about paths): the chance gate is named off.
        "validate": {"batch_sizes": [1], "providers": ["CPUExecutionProvider"], "runs": 50, "warmup": 2,
                     "gates": {"accuracy_min": 0.0, "above_chance": None}},
    }
    (tmp_path / "pipelines" / "p.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    return tmp_path


def test_resolve_path_keeps_absolute_paths(tmp_path):
    assert resolve_path("a/b.pt", tmp_path) == tmp_path / "a" / "b.pt"
    assert resolve_path("/x/y.pt", tmp_path) == resolve_path("/x/y.pt", tmp_path / "other")


def test_file_paths_resolve_against_the_files_folder_and_set_against_the_working_directory(project, monkeypatch):
    monkeypatch.chdir(project)
    pipeline = load_pipeline("pipelines/p.yaml")
    assert pipeline.data.path == project / "data" / "digits.npz"
    assert pipeline.teacher.checkpoint == project / "weights" / "teacher.pt"
    assert pipeline.teacher.model.entrypoint == f"{project / 'pipelines'}:user_models:teacher"
    from_set = load_pipeline("pipelines/p.yaml", ["teacher.checkpoint=weights/teacher.pt",
                                                  'teacher.model={"arch": "cnn", "weights": "weights/teacher.pt"}'])
    assert from_set.teacher.checkpoint == project / "weights" / "teacher.pt"
    assert from_set.teacher.model.weights == project / "weights" / "teacher.pt"


def test_set_replaces_placeholder_paths_before_any_path_is_checked(project, monkeypatch):
    """A file whose data.path and teacher.checkpoint are placeholders checks cleanly when --set gives real ones:
    the overrides apply before any file is looked for (issue 25, item 4)."""
    monkeypatch.chdir(project)
    raw = yaml.safe_load((project / "pipelines" / "p.yaml").read_text())
    raw["data"]["path"] = "/nonexistent/placeholder.npz"
    raw["teacher"]["checkpoint"] = "/nonexistent/teacher.pt"
    (project / "pipelines" / "placeholders.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    refused = cli("check", "pipelines/placeholders.yaml")
    assert refused.exit_code == 2 and "data.path: data file not found" in refused.stderr, refused.output
    result = cli("check", "pipelines/placeholders.yaml",
                 *sets("data.path=data/digits.npz", "teacher.checkpoint=weights/teacher.pt"))
    assert result.exit_code == 0, result.output
    untrained = cli("check", "pipelines/placeholders.yaml", *sets("data.path=data/digits.npz", "teacher.checkpoint=null"))
    assert untrained.exit_code == 0, untrained.output


@pytest.mark.parametrize("override, key, noun, folder", [
    (None, "data.path", "data file", "pipelines"),
    ("teacher.checkpoint=nowhere/t.pt", "teacher.checkpoint", "checkpoint", "."),
    ("student.model.weights=nowhere/s.safetensors", "student.model.weights", "weights file", "."),
])
def test_not_found_names_the_folder_it_looked_in(project, monkeypatch, override, key, noun, folder):
    monkeypatch.chdir(project)
    if override is None:
        (project / "data" / "digits.npz").unlink()
    result = cli("check", "pipelines/p.yaml", *(sets(override) if override else []))
    assert result.exit_code == 2, result.output
    where = (project / folder).resolve() if folder != "." else project
    origin = "the pipeline file's folder" if override is None else "the working directory (--set)"
    assert f"{key}: {noun} not found: " in result.stderr
    assert f"(resolved against {where}, {origin})" in result.stderr


@pytest.mark.slow
def test_a_run_is_the_same_from_any_working_directory(project, tmp_path_factory):
    """Real processes started in the repository root and in / give the same test accuracy."""
    store = tmp_path_factory.mktemp("store")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}", "KDPIPE_CACHE_DIR": str(store / "cache")}
    accuracies = []
    for cwd in (ROOT, "/"):
        proc = run_process("run", project / "pipelines" / "p.yaml", "--runs-dir", store / "runs", env=env, cwd=cwd)
        assert proc.returncode == 0, proc.stderr
        report = read_report(proc.stdout)
        accuracies.append((report["student"]["accuracy"], report["teacher"]["accuracy"]))
    assert accuracies[0] == accuracies[1]
