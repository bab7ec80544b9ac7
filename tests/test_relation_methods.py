"""`rkd` and `sp`: embedding taps, batches too small for a relation, bad inputs, end to end."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import FAST, LENIENT, PIPELINES, cli, read_report, sets
from kdpipe.config import OptimizerConfig, TapsConfig
from kdpipe.errors import InputError
from kdpipe.methods import get_method
from kdpipe.models.zoo import CNN, MLP
from kdpipe.taps import Outputs
from kdpipe.train import Batch, Trainer






def build(name, digits, taps=None, **params):
    cls = get_method(name)
    torch.manual_seed(0)
    teacher = CNN(digits.input_shape, 10, width=16, depth=3)
    student = CNN(digits.input_shape, 10, width=8, depth=2)
    return cls(cls.Params(**params), student=student, teacher=teacher, num_classes=10, input_shape=digits.input_shape,
               taps=taps)


@pytest.mark.parametrize("name, default", [("rkd", ("pool", "pool")), ("sp", ("blocks.1", "blocks.2"))])
def test_default_taps_and_distill_taps_overrides_them(digits, name, default):
    """rkd relates the penultimate embeddings; sp the last convolutional activation maps (the SP paper), not the
    pooled vectors."""
    assert build(name, digits).pairs == [default]
    taps = TapsConfig(student=["blocks.0"], teacher=["pool"])
    assert build(name, digits, taps=taps).pairs == [("blocks.0", "pool")]


def test_a_model_without_embedding_tap_needs_distill_taps(digits):
    cls = get_method("rkd")

    class Bare(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.flat = torch.nn.Flatten()
            self.fc = torch.nn.Linear(64, 10)

        def forward(self, x):
            return self.fc(self.flat(x))

    with pytest.raises(InputError) as err:
        cls(cls.Params(), student=Bare(), teacher=MLP(digits.input_shape, 10), num_classes=10, input_shape=(1, 8, 8))
    assert err.value.key == "distill.taps.student" and "flat" in err.value.message
    method = cls(cls.Params(), student=Bare(), teacher=MLP(digits.input_shape, 10), num_classes=10,
                 input_shape=(1, 8, 8), taps=TapsConfig(student=["flat"]))
    assert method.pairs == [("flat", "body.6")]


@pytest.mark.parametrize("name", ["rkd", "sp"])
def test_relation_term_is_zero_when_embeddings_match_and_skipped_below_three_samples(digits, name):
    method = build(name, digits, taps=TapsConfig(student=["pool"], teacher=["pool"]))
    emb = torch.randn(5, 16)
    y = torch.randint(0, 10, (5,))
    logits = torch.randn(5, 10)
    same = Outputs(logits, {"pool": emb})
    loss, parts = method.loss(Batch(torch.arange(5), torch.zeros(5), y), same, Outputs(logits, {"pool": 2 * emb}))
    assert parts["relation"].item() == pytest.approx(0.0, abs=1e-5)
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), abs=1e-5)
    # With a different teacher embedding the relation term is positive...
    _, parts = method.loss(Batch(torch.arange(5), torch.zeros(5), y), same, Outputs(logits, {"pool": torch.randn(5, 16)}))
    assert parts["relation"].item() > 0
    # ...and a 2-sample batch, where no relation exists, trains on CE alone instead of failing.
    two = Outputs(logits[:2], {"pool": emb[:2]})
    loss, parts = method.loss(Batch(torch.arange(2), torch.zeros(2), y[:2]), two, Outputs(logits[:2], {"pool": torch.randn(2, 16)}))
    assert parts["relation"].item() == 0.0
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits[:2], y[:2]).item(), abs=1e-6)


def test_an_epoch_ending_in_a_two_sample_batch_trains(digits):
    # 100 training samples in batches of 7: the last batch holds 2.
    small = dataclasses.replace(digits, x_train=digits.x_train[:100], y_train=digits.y_train[:100])
    method = build("rkd", small)
    trainer = Trainer(small, epochs=1, batch_size=7, optimizer=OptimizerConfig(), seed=0)
    assert [len(b.y) for b in trainer.batches(torch.Generator().manual_seed(0))][-1] == 2
    before = [p.detach().clone() for p in method.student.parameters()]
    method.fit(trainer)
    assert all(torch.isfinite(p).all() for p in method.student.parameters())
    assert any(not torch.equal(b, p) for b, p in zip(before, method.student.parameters()))


@pytest.mark.parametrize("name", ["rkd", "sp"])
@pytest.mark.parametrize("command", ["check", "run"])
def test_batch_size_below_three_exits_2_before_anything_runs(workdir, name, command):
    pipeline = PIPELINES / f"{name}.yaml"
    result = cli(command, pipeline, *sets("data.batch_size=2"))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{pipeline}: data.batch_size: ") and "at least 3" in lines[0], lines
    assert not (workdir / "runs").exists()


def test_unknown_tap_exits_2(workdir):
    pipeline = PIPELINES / "rkd.yaml"
    result = cli("check", pipeline, *sets("distill.taps.student=[nowhere]"))
    assert result.exit_code == 2, result.output
    assert "distill.taps.student" in result.stderr and "nowhere" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rkd", "sp"])
def test_end_to_end(workdir, name):
    result = cli("run", PIPELINES / f"{name}.yaml", *sets(*FAST, *LENIENT))
    assert result.exit_code == 0, result.output
    report = read_report(result.stdout)
    assert report["status"] == "passed"
    assert report["method"]["name"] == name
    assert report["student"]["accuracy"] > 0.5
