"""The CIFAR benchmark zoo: parameter counts of the published definitions, stage-end taps, `kdpipe models`."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import cli
from kdpipe.models import ZOO
from kdpipe.models.cifar import CIFAR_ZOO
from kdpipe.taps import forward_with_taps

# Exact counts for 3×32×32 inputs and 100 classes: those of the benchmark's own definitions (RepDistiller's
# models/resnet.py, wrn.py, vgg.py with batch norm, mobilenetv2.py at T=6 width 0.5, ShuffleNetv2.py at 1×), which
# kdpipe/models/cifar.py was compared with layer by layer (same convolutions, widths, strides, biases, shortcuts and
# classifier). Neither the CRD paper nor the RepDistiller README publishes parameter counts; the sizes quoted
# around the benchmark (resnet8x4 1.23M, resnet32x4 7.43M, wrn_40_2 2.26M, vgg13 9.46M …) are these rounded.
PARAMS = {
    "resnet8": 83_892, "resnet20": 278_324, "resnet56": 861_620, "resnet110": 1_736_564,
    "resnet8x4": 1_233_540, "resnet32x4": 7_433_860, "wrn_16_2": 703_284, "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028, "vgg13": 9_462_180, "mobilenetv2": 812_836, "shufflev2": 1_355_528,
}

# He et al. 2016, Table 6 (CIFAR-10, 10 classes; quoted with its table in pytorch_resnet_cifar10's resnet.py).
HE_ET_AL = {"resnet20": "0.27M", "resnet56": "0.85M", "resnet110": "1.7M"}


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


@pytest.mark.parametrize("arch", sorted(HE_ET_AL))
def test_cifar_resnets_have_the_sizes_he_et_al_publish(arch):
    """The paper's ResNets have parameter-free (zero-padding) shortcuts where the benchmark's have 1×1 conv
    projections: without those two projections, the 10-class counts round to the paper's figures."""
    model = CIFAR_ZOO[arch]((3, 32, 32), 10)
    projections = [m for name, m in model.named_modules() if name.endswith("shortcut") and len(list(m.parameters()))]
    assert len(projections) == 2
    without = sum(p.numel() for p in model.parameters()) - sum(p.numel() for m in projections for p in m.parameters())
    published = HE_ET_AL[arch]
    decimals = len(published.split(".")[1]) - 1
    assert f"{without / 1e6:.{decimals}f}M" == published


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
