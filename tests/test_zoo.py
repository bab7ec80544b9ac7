"""The CIFAR benchmark zoo: parameter counts of the published definitions, stage-end taps, `kdpipe models`."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import cli
from kdpipe.models import ZOO
from kdpipe.models.cifar import CIFAR_ZOO
from kdpipe.taps import forward_with_taps

# Exact counts for 3×32×32 inputs and 100 classes. They round to the benchmark's published sizes (RepDistiller /
# CRD tables): resnet8 0.08M, resnet20 0.28M, resnet56 0.86M, resnet110 1.74M, resnet8x4 1.23M, resnet32x4 7.43M,
# wrn_16_2 0.70M, wrn_40_2 2.26M, vgg8 3.96M, vgg13 9.46M, mobilenetv2 0.81M, shufflev2 1.36M.
PARAMS = {
    "resnet8": 83_892, "resnet20": 278_324, "resnet56": 861_620, "resnet110": 1_736_564,
    "resnet8x4": 1_233_540, "resnet32x4": 7_433_860, "wrn_16_2": 703_284, "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028, "vgg13": 9_462_180, "mobilenetv2": 812_836, "shufflev2": 1_355_528,
}


def test_every_benchmark_architecture_is_in_the_zoo():
    assert set(CIFAR_ZOO) == set(PARAMS)
    assert set(CIFAR_ZOO) <= set(ZOO)


@pytest.mark.parametrize("arch", sorted(PARAMS))
def test_parameter_count_and_stage_taps(arch):
    model = CIFAR_ZOO[arch]((3, 32, 32), 100).eval()
    assert sum(p.numel() for p in model.parameters()) == PARAMS[arch]
    with torch.no_grad():
        out = forward_with_taps(model, torch.randn(2, 3, 32, 32), [*model.default_taps, model.embedding_tap])
    assert out.logits.shape == (2, 100)
    maps = [out.features[t] for t in model.default_taps]
    assert all(m.ndim == 4 for m in maps)
    # Stage ends go shallow → deep: the map never grows and shrinks at least once.
    sizes = [m.shape[-1] for m in maps]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[0]
    assert out.features[model.embedding_tap].shape == (2, model.fc.in_features)


@pytest.mark.parametrize("arch", sorted(PARAMS))
def test_small_grey_inputs_run(arch):
    """Digits-sized inputs (1×8×8) go through every architecture (pooling stops at one pixel)."""
    model = CIFAR_ZOO[arch]((1, 8, 8), 10).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_models_command_lists_counts_for_the_input():
    result = cli("models", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["arch"]: r["params"] for r in json.loads(result.stdout)}
    assert {a: rows[a] for a in PARAMS} == PARAMS
    grey = {r["arch"]: r["params"] for r in json.loads(cli("models", "--input", "1,8,8", "--classes", "10", "--json").stdout)}
    assert grey["resnet8"] == sum(p.numel() for p in CIFAR_ZOO["resnet8"]((1, 8, 8), 10).parameters()) < PARAMS["resnet8"]
    text = cli("models")
    assert "resnet32x4   7,433,860" in text.stdout


def test_models_command_rejects_a_bad_input_shape():
    result = cli("models", "--input", "3,x")
    assert result.exit_code == 2
    assert result.stderr.strip() == "--input: expected positive integers like 3,32,32, got '3,x'"
