"""Feature taps: paths, default pairing by relative depth, dry-pass shape checks and `kdpipe taps`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import PIPELINES, cli
from kdpipe.config import TapsConfig
from kdpipe.errors import InputError
from kdpipe.models.zoo import CNN, MLP, ResNet
from kdpipe.taps import (by_relative_depth, forward_with_taps, output_shapes, pair_at_equal_resolution, pair_last,
                         pair_middle, pair_taps)

DIGITS = (1, 8, 8)
LAST = pair_last


def every(student, teacher) -> list[tuple[int, int]]:
    """Every student default tap with the teacher's at the same relative depth."""
    positions = list(range(len(student)))
    return list(zip(positions, by_relative_depth(positions, len(student), len(teacher))))


def test_at_and_nst_pair_stage_ends_at_equal_resolution_and_pool_only_where_none_exists():
    # CNN student: 8×8, 4×4; CNN teacher: 8×8, 4×4, 2×2 -> equal-resolution pairs, the teacher's 2×2 left out.
    pairs = pair_taps(CNN(DIGITS, 10, width=8, depth=2), CNN(DIGITS, 10, width=32, depth=3), None, DIGITS,
                      pair_at_equal_resolution)
    assert [(p.student, p.teacher) for p in pairs] == [("blocks.0", "blocks.0"), ("blocks.1", "blocks.1")]
    # A teacher without the student's 2×2 stage: that stage end pairs by relative depth (pooled by the loss).
    shaped_student = [("a", (8, 8, 8)), ("b", (16, 4, 4)), ("c", (32, 2, 2))]
    shaped_teacher = [("x", (8, 8, 8)), ("y", (16, 8, 8)), ("z", (32, 4, 4))]
    assert pair_at_equal_resolution(shaped_student, shaped_teacher) == [(0, 1), (1, 2), (2, 2)]


def test_fitnets_pairs_the_middle_stage_ends():
    assert pair_middle([("a", ()), ("b", ())], [("x", ()), ("y", ()), ("z", ())]) == [(0, 1)]
    assert pair_middle([("a", ())] * 4, [("x", ())] * 4) == [(1, 1)]


def test_relative_depth_maps_last_to_last_and_spreads_the_rest():
    assert by_relative_depth([0, 1], 2, 3) == [1, 2]
    assert by_relative_depth([0, 1, 2], 3, 3) == [0, 1, 2]
    assert by_relative_depth([0, 1, 2, 3], 4, 2) == [0, 0, 1, 1]
    assert by_relative_depth([2], 3, 6) == [5]


def test_default_pairs_for_zoo_models_with_shapes():
    student, teacher = CNN(DIGITS, 10, width=8, depth=2), CNN(DIGITS, 10, width=32, depth=3)
    pairs = pair_taps(student, teacher, None, DIGITS, every)
    assert [(p.student, p.teacher) for p in pairs] == [("blocks.0", "blocks.1"), ("blocks.1", "blocks.2")]
    assert [(p.student_shape, p.teacher_shape) for p in pairs] == [((8, 8, 8), (64, 4, 4)), ((16, 4, 4), (128, 2, 2))]

    pairs = pair_taps(ResNet(DIGITS, 10, width=4, depth=8), ResNet(DIGITS, 10, width=8, depth=14), None, DIGITS, LAST)
    assert [(p.student, p.teacher, p.student_shape, p.teacher_shape) for p in pairs] == [
        ("layer3", "layer3", (16, 2, 2), (32, 2, 2))]

    pairs = pair_taps(MLP(DIGITS, 10, width=16, depth=1), MLP(DIGITS, 10, width=64, depth=3), None, DIGITS, every)
    assert [(p.student, p.teacher, p.student_shape, p.teacher_shape) for p in pairs] == [("body.3", "body.9", (16,), (64,))]


def test_explicit_taps_pair_by_position_and_one_side_defaults_to_its_last_taps():
    student, teacher = CNN(DIGITS, 10, width=8, depth=2), CNN(DIGITS, 10, width=32, depth=3)
    pairs = pair_taps(student, teacher, TapsConfig(student=["blocks.0.0", "pool"], teacher=["blocks.0", "pool"]), DIGITS, every)
    assert [(p.student_shape, p.teacher_shape) for p in pairs] == [((8, 8, 8), (32, 8, 8)), ((16,), (128,))]
    pairs = pair_taps(student, teacher, TapsConfig(student=["blocks.0"]), DIGITS, every)
    assert [(p.student, p.teacher) for p in pairs] == [("blocks.0", "blocks.2")]
    with pytest.raises(InputError, match="student lists 1 taps and the teacher 2"):
        pair_taps(student, teacher, TapsConfig(student=["blocks.0"], teacher=["blocks.0", "blocks.1"]), DIGITS, every)


def test_missing_path_lists_the_available_paths():
    student, teacher = CNN(DIGITS, 10, width=8, depth=2), CNN(DIGITS, 10, width=32, depth=3)
    with pytest.raises(InputError) as err:
        pair_taps(student, teacher, TapsConfig(student=["blocks.9"], teacher=["blocks.2"]), DIGITS, every)
    assert err.value.key == "distill.taps.student"
    assert "no module 'blocks.9'" in err.value.message
    assert "available: blocks, blocks.0, blocks.0.0, blocks.0.1, blocks.0.2, blocks.1," in err.value.message


def test_model_without_default_taps_needs_explicit_taps():
    plain = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    teacher = CNN(DIGITS, 10, width=32, depth=3)
    with pytest.raises(InputError) as err:
        pair_taps(plain, teacher, None, DIGITS, every)
    assert err.value.key == "distill.taps.student"
    assert "declares no default_taps" in err.value.message and "available: 0, 1, 2, 3" in err.value.message
    pairs = pair_taps(plain, teacher, TapsConfig(student=["2"], teacher=["pool"]), DIGITS, every)
    assert (pairs[0].student_shape, pairs[0].teacher_shape) == ((32,), (128,))


def test_a_tap_must_output_one_tensor():
    class TwoOutputs(nn.Module):
        def forward(self, x):
            return x, x

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.split = TwoOutputs()
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            return self.fc(self.split(x.flatten(1))[0])

    with pytest.raises(InputError, match="module 'split' gives a tuple"):
        forward_with_taps(Model(), torch.zeros(2, *DIGITS), ["split"])
    assert output_shapes(Model(), DIGITS) == {"split": "tuple", "fc": (10,)}


def test_tapped_features_are_the_module_outputs():
    model = CNN(DIGITS, 10, width=8, depth=2).eval()
    x = torch.randn(3, *DIGITS)
    out = forward_with_taps(model, x, ["blocks.1", "pool"])
    with torch.no_grad():
        assert torch.equal(out.features["pool"], model.pool(model.blocks(x)))
        assert torch.equal(out.logits, model.fc(out.features["pool"]))
    assert out.features["blocks.1"].shape == (3, 16, 4, 4)


def test_cli_taps_lists_paths_shapes_and_pairs(workdir):
    result = cli("taps", PIPELINES / "fitnets.yaml")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    teacher_at, student_at = lines.index("teacher:"), lines.index("student:")
    teacher_lines, student_lines = lines[teacher_at + 1:student_at], lines[student_at + 1:]
    assert any(line.split() == ["blocks.2", "*", "128×2×2"] for line in teacher_lines)
    assert any(line.split() == ["pool", "e", "128"] for line in teacher_lines)
    assert any(line.split() == ["blocks.0.0", "8×8×8"] for line in student_lines)
    assert lines[-1] == "fitnets compares student 'blocks.0' 8×8×8 and teacher 'blocks.1' 64×4×4"


def test_cli_taps_still_lists_when_the_configured_taps_are_wrong(workdir):
    result = cli("taps", PIPELINES / "at.yaml", "--set", "distill.taps={student: [nope], teacher: [blocks.2]}")
    assert result.exit_code == 2
    assert "student:" in result.stdout and "blocks.1" in result.stdout
    assert "distill.taps.student: no module 'nope' in the model; available: blocks, " in result.stderr


def test_bad_taps_exit_2_before_a_run_starts(workdir):
    result = cli("run", PIPELINES / "at.yaml", "--set", "distill.taps={student: [blocks.9], teacher: [blocks.2]}")
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "distill.taps.student: no module 'blocks.9' in the model; available: blocks, blocks.0," in result.stderr
    assert not (workdir / "runs").exists()


@pytest.mark.parametrize("method, taps, message", [
    ("at", "{student: [pool], teacher: [blocks.2]}",
     "at compares feature maps K×H×W, but got student 'pool' 16 and teacher 'blocks.2' 128×2×2"),
    ("nst", "{student: [blocks.1], teacher: [pool.1]}",
     "nst compares feature maps K×H×W, but got student 'blocks.1' 16×4×4 and teacher 'pool.1' 128"),
    ("fitnets", "{student: [blocks.0], teacher: [blocks.2]}",
     "fitnets cannot regress student 'blocks.0' 8×8×8 and teacher 'blocks.2' 128×2×2"),
])
def test_unpairable_shapes_exit_2_naming_both_layers(workdir, method, taps, message):
    result = cli("check", PIPELINES / "digits.yaml", "--set", f"distill.method={method}", "--set", "distill.params={}",
                 "--set", f"distill.taps={taps}")
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert "digits.yaml: distill.taps: " in result.stderr and message in result.stderr
