"""Cache entries are keyed by what they were computed from, and verified when read: a trained teacher by the
content of the weights it starts from, teacher outputs by their sha256 like every other entry."""

from __future__ import annotations

import pytest
import torch

from conftest import FAST, LENIENT, PIPELINES, cli, read_report, sets

DIGITS = PIPELINES / "digits.yaml"
SMALL_TEACHER = ["teacher.model.width=8", "teacher.model.depth=2", "teacher.train.epochs=1", "validate.gates.above_chance=null"]


def write_weights(path, seed: int) -> None:
    from kdpipe.config import ModelConfig
    from kdpipe.models import build_model

    torch.manual_seed(seed)
    model = build_model(ModelConfig(arch="cnn", width=8, depth=2), "teacher.model", (1, 8, 8), 10)
    torch.save(model.state_dict(), path)


def teacher_source(workdir, weights) -> str:
    result = cli("run", DIGITS, "--until", "teacher",
                 *sets(*FAST, *LENIENT, *SMALL_TEACHER, f"teacher.model.weights={weights}"))
    assert result.exit_code == 0, result.output
    return read_report(result.stdout)["teacher"]["source"]


def test_a_weights_file_replaced_at_the_same_path_trains_the_teacher_again(workdir, tmp_path, monkeypatch):
    """The trained-teacher key hashes the weights file's bytes, not its path: a teacher fine-tuned from the old file
    is never reused for the new one."""
    monkeypatch.setenv("KDPIPE_CACHE_DIR", str(tmp_path / "cache"))
    weights = tmp_path / "teacher-init.pt"
    write_weights(weights, 1)
    assert teacher_source(workdir, weights) == "trained"
    assert teacher_source(workdir, weights).startswith("cache ")  # same bytes: reused
    write_weights(weights, 2)
    assert teacher_source(workdir, weights) == "trained"


@pytest.fixture
def spilled_cache(tmp_path, digits):
    """A teacher-output cache on disk with one entry for a small teacher over the digits."""
    from kdpipe.models.zoo import CNN
    from kdpipe.teacher_cache import TeacherOutputCache

    torch.manual_seed(0)
    teacher = CNN(digits.input_shape, digits.num_classes, width=4, depth=1)
    cache = TeacherOutputCache(tmp_path / "teacher-outputs")
    expected = cache.get(teacher, digits, [])
    return cache, teacher, expected


def test_teacher_outputs_are_stored_with_their_sha256(spilled_cache):
    cache, _, _ = spilled_cache
    (entry,) = cache.directory.glob("*.pt")
    assert entry.with_name(entry.name + ".sha256").is_file()


@pytest.mark.parametrize("budget_mb", [None, 0.001])  # held in memory, or memory-mapped from disk
def test_a_corrupt_teacher_output_entry_is_detected_and_recomputed(spilled_cache, digits, budget_mb, capsys):
    from kdpipe.teacher_cache import SpilledOutputs, TeacherOutputCache

    cache, teacher, expected = spilled_cache
    (entry,) = cache.directory.glob("*.pt")
    data = bytearray(entry.read_bytes())
    data[data.find(expected.logits.numpy().tobytes()[:64]) + 3] ^= 0xFF  # in a stored logit: the file still loads
    entry.write_bytes(bytes(data))
    fresh = TeacherOutputCache(cache.directory, budget_mb)
    outputs = fresh.get(teacher, digits, [])
    assert fresh.forward_passes == 1  # recomputed, not read from the corrupt entry
    assert "corrupt" in capsys.readouterr().err
    assert torch.equal(outputs.logits, expected.logits)
    again = TeacherOutputCache(cache.directory, budget_mb)
    reread = again.get(teacher, digits, [])
    assert torch.equal(reread.logits, expected.logits) and again.forward_passes == 0
    assert isinstance(reread, SpilledOutputs) == (budget_mb is not None)  # beyond the budget: left memory-mapped


def test_an_entry_point_module_beside_the_pipeline_is_keyed_by_its_source(tmp_path):
    """'module:factory' resolves to FOLDER:module:factory; editing FOLDER/module.py makes another teacher."""
    from kdpipe.config import ModelConfig
    from kdpipe.stages.teacher import origin

    (tmp_path / "keyed_models.py").write_text("WIDTH = 8\n")
    model = ModelConfig(entrypoint=f"{tmp_path}:keyed_models:net")
    before = origin(model)
    (tmp_path / "keyed_models.py").write_text("WIDTH = 16\n")
    assert origin(model) != before
    assert origin(ModelConfig(entrypoint="kdpipe.models.zoo:CNN"))["entrypoint"]["source"] is not None
