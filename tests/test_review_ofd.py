"""reviewkd and ofd (issue 20): their losses against the float64 reference, METHODS.md's fact 12, OFD's margins,
ReviewKD's fusion modules and warm-up, the models' pre-ReLU taps, and the refusals before a run."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reference_losses as ref
from conftest import PIPELINES, cli
from kdpipe.losses import hcl_loss, ofd_loss, ofd_margin
from kdpipe.methods import get_method
from kdpipe.methods.reviewkd import ABF
from kdpipe.models import ZOO
from kdpipe.models.cifar import channel_shuffle
from kdpipe.onnx_export import export_onnx
from kdpipe.runner import prepare
from kdpipe.taps import forward_with_taps
from kdpipe.train import Batch

def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- losses -----------------------------------------------------------------------------------


def test_hcl_loss_matches_the_reference_over_levels_of_every_size():
    shapes = [(4, 3, 8, 8), (4, 5, 4, 4), (4, 6, 2, 2), (4, 7, 1, 1)]  # pools (4, 2, 1), (2, 1), (1,), none
    student = [rand(*s, seed=i) for i, s in enumerate(shapes)]
    teacher = [rand(*s, seed=10 + i) for i, s in enumerate(shapes)]
    got = hcl_loss(student, teacher)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(ref.hcl_loss([s.numpy() for s in student], [t.numpy() for t in teacher]),
                                       rel=1e-5)
    custom = hcl_loss(student, teacher, levels=(2,))
    assert custom.item() == pytest.approx(ref.hcl_loss([s.numpy() for s in student], [t.numpy() for t in teacher],
                                                       levels=(2,)), rel=1e-5)


@pytest.mark.parametrize("teacher_size", [4, 8])  # equal H×W, and a teacher map pooled to the student's
def test_ofd_loss_matches_the_reference(teacher_size):
    student, teacher, margin = rand(3, 6, 4, 4, seed=1), rand(3, 6, teacher_size, teacher_size, seed=2), rand(6, seed=3)
    got = ofd_loss(student, teacher, margin)
    assert got.item() == pytest.approx(ref.ofd_loss(student.numpy(), teacher.numpy(), margin.numpy()), rel=1e-5)


def batch_norm(gamma, beta) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(len(gamma))
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(gamma)), bn.bias.copy_(torch.tensor(beta))
    return bn


def test_ofd_margin_is_the_formula_on_both_branches():
    # Φ(−m/s) > 1e-3: channels 0-3 (γ's sign ignored); ≤ 1e-3: channels 4 (Φ(−4) ≈ 3e-5) and 5 (Φ(−3.2) ≈ 7e-4).
    gamma, beta = [1.0, -0.5, 2.0, 0.3, 1.0, -0.5], [0.0, 0.4, -1.5, 0.5, 4.0, 1.6]
    tails = [ref.normal_cdf(-b / abs(g)) for g, b in zip(gamma, beta)]
    assert [t > 1e-3 for t in tails] == [True] * 4 + [False] * 2
    got = ofd_margin(batch_norm(gamma, beta))
    np.testing.assert_allclose(got.numpy(), ref.ofd_margin(gamma, beta), rtol=1e-5)
    assert got[4].item() == pytest.approx(-3.0) and got[5].item() == pytest.approx(-1.5)
    # The expected value of the negative part of N(m, s²) is below 0 and below m.
    assert (got[:4] < 0).all() and (got[:4] < torch.tensor(beta[:4])).all()


def test_fact_12_zero_for_equal_inputs_and_no_cost_for_what_the_teachers_relu_discards():
    maps = [rand(2, 3, 8, 8), rand(2, 4, 2, 2, seed=1)]
    assert hcl_loss(maps, [m.clone() for m in maps]).item() == 0.0
    teacher, margin = rand(2, 3, 4, 4, seed=2), torch.tensor([-0.5, -1.0, -0.2])
    assert ofd_loss(teacher.clone(), teacher, margin).item() == 0.0
    # Where t ≤ 0, a student value at most max(t, margin) adds nothing, whatever it is; elsewhere it counts.
    target = torch.maximum(teacher, margin.reshape(1, -1, 1, 1))
    student = torch.where(teacher > 0, teacher, target - rand(2, 3, 4, 4, seed=3).abs())
    assert ofd_loss(student, teacher, margin).item() == 0.0
    above = student.clone()
    above[teacher <= 0] = target[teacher <= 0] + 0.5
    assert ofd_loss(above, teacher, margin).item() == pytest.approx(0.25 * int((teacher <= 0).sum()) / 2, rel=1e-5)


# --- pre-ReLU taps ----------------------------------------------------------------------------

# sha256 (first 16 hex digits) of each model's state_dict keys before the pre-ReLU taps existed (commit 3ea4bff):
# weights saved then still load.
KEYS_BEFORE = {
    "cnn": "aeb7a253c60ce2da", "resnet": "8a4b8c3e46926b34", "resnet8": "d9bef42bbe128db4",
    "resnet8x4": "e35dc34a8a5000d0", "wrn_16_2": "ff3b51fcc3a5b53f", "vgg8": "ca0c7fc76aa31ed8",
    "mobilenetv2": "43b43717be79a9bc", "shufflev2": "94bbf9761bb1fcd4",
}


def build(name: str) -> nn.Module:
    sized = {"cnn": dict(width=8, depth=3), "resnet": dict(width=8, depth=14)}
    return ZOO[name]((3, 32, 32), 10, **sized.get(name, {}))


@pytest.mark.parametrize("name", list(KEYS_BEFORE))
def test_pre_relu_taps_hold_what_the_relu_zeroes_and_keep_the_state_dict_keys(name):
    model = build(name).train()
    assert hashlib.sha256("\n".join(model.state_dict()).encode()).hexdigest()[:16] == KEYS_BEFORE[name]
    relus = {path: module for path, module in model.named_modules() if isinstance(module, nn.ReLU)}
    x = rand(2, 3, 32, 32)
    bns = getattr(model, "preact_bns", [])  # none for ShuffleNetV2: half a unit's channels pass no BN
    assert len(model.preact_taps) == len(model.default_taps) and len(bns) in (0, len(model.preact_taps))
    out = forward_with_taps(model, x, list(dict.fromkeys(model.preact_taps + bns + list(relus))))
    for tap, bn in zip(model.preact_taps, bns or model.preact_taps):
        pre = out.features[tap]
        assert (pre < 0).any(), tap
        if bns:
            assert isinstance(dict(model.named_modules())[bn], nn.BatchNorm2d)
            assert pre.shape[1] == dict(model.named_modules())[bn].num_features
        # The ReLU reading the tap (where one does) was not applied in place over it: its output is relu(tap).
        post = [r for r in relus if torch.equal(out.features[r], F.relu(pre))]
        assert post or name == "mobilenetv2", tap  # MobileNetV2's stage ends are linear: no ReLU reads them
        assert all(not relus[r].inplace for r in post)
    sum(f.float().sum() for f in out.features.values()).backward()  # no in-place error through the taps


def test_shufflenet_unit_gives_the_same_output_with_its_relu_after_the_shuffle():
    unit = build("shufflev2").layer1[1].eval()
    x = F.relu(rand(2, 116, 8, 8))  # a unit's input is the previous unit's output, ≥ 0
    keep, change = x.chunk(2, dim=1)
    with torch.no_grad():
        assert torch.equal(unit(x), channel_shuffle(torch.cat([keep, unit.branch(change)], 1)))


def test_models_without_pre_relu_taps_are_refused_naming_the_key(workdir):
    result = cli("check", PIPELINES / "ofd.yaml", "--set", "teacher.model.arch=mlp", "--set", "distill.taps=null")
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "distill.taps.teacher: method 'ofd' taps the teacher's stage ends before their ReLU, but the teacher " \
           "model declares none (preact_taps)" in result.stderr


# --- ReviewKD -------------------------------------------------------------------------------


def test_abf_fuses_the_upsampled_residual_by_two_attention_maps():
    torch.manual_seed(0)
    abf = ABF(in_channels=8, mid_channels=16, out_channels=32, fuse=True).eval()
    x, residual = rand(2, 8, 8, 8), rand(2, 16, 4, 4, seed=1)
    out, passed = abf(x, residual, (4, 4))
    assert out.shape == (2, 32, 4, 4) and passed.shape == (2, 16, 4, 4)
    reduced = abf.reduce(x)
    up = residual.repeat_interleave(2, 2).repeat_interleave(2, 3)  # nearest, ×2
    attention = torch.sigmoid(abf.attention[0](torch.cat([reduced, up], 1)))
    fused = reduced * attention[:, :1] + up * attention[:, 1:]
    torch.testing.assert_close(passed, fused[:, :, ::2, ::2])  # nearest down to the teacher's 4×4
    torch.testing.assert_close(out, abf.output(passed))
    deepest = ABF(in_channels=8, mid_channels=16, out_channels=32, fuse=False)
    assert deepest.attention is None
    assert deepest(x, None, (8, 8))[0].shape == (2, 32, 8, 8)


def method_for(file: str, *overrides: str):
    prepared = prepare(PIPELINES / file, list(overrides))
    method = get_method(prepared.pipeline.distill.method)(
        prepared.pipeline.distill.params, student=prepared.student, teacher=prepared.teacher,
        num_classes=prepared.data.num_classes, input_shape=prepared.data.input_shape,
        taps=prepared.pipeline.distill.taps)
    return prepared, method


def test_reviewkd_levels_modules_and_warm_up(workdir, digits):
    prepared, method = method_for("reviewkd.yaml", "distill.taps=null", "distill.params.warmup_epochs=20")
    # Defaults: student stage ends + embedding, teacher pre-ReLU stage ends + embedding, aligned from the deepest.
    assert [(p.student, p.teacher) for p in method.pairs] == [("blocks.0", "blocks.1.1"), ("blocks.1", "blocks.2.1"),
                                                              ("pool", "pool")]
    assert [abf.attention is not None for abf in method.abfs] == [True, True, False]
    assert {abf.reduce[0].out_channels for abf in method.abfs} == {16}  # min(512, the student's deepest channels)
    x, y = digits.x_train[:8], digits.y_train[:8]
    student = forward_with_taps(prepared.student, x, method.student_taps())
    teacher = forward_with_taps(prepared.teacher.eval(), x, method.teacher_taps()).detach()
    reviewed = method.review(student.features)
    assert [tuple(r.shape[1:]) for r in reviewed] == [(64, 4, 4), (128, 2, 2), (128, 1, 1)]
    batch = Batch(torch.arange(8), x, y)
    for epoch, factor in [(1, 1 / 20), (10, 0.5), (20, 1.0), (35, 1.0)]:
        method.epoch = epoch
        assert method.warmup_factor() == pytest.approx(factor)
        total, parts = method.loss(batch, student, teacher)
        assert total.item() == pytest.approx((parts["ce"] + 5.0 * factor * parts["hcl"]).item(), rel=1e-6)
    targets = [teacher.features[t].reshape(8, -1, *([1, 1] if t == "pool" else teacher.features[t].shape[2:]))
               for t in ("blocks.1.1", "blocks.2.1", "pool")]
    assert parts["hcl"].item() == pytest.approx(hcl_loss(reviewed, targets).item(), rel=1e-5)
    method.params = method.params.model_copy(update={"warmup_epochs": 0})
    method.epoch = 1
    assert method.warmup_factor() == 1.0


# --- OFD --------------------------------------------------------------------------------------


def test_ofd_margins_connectors_and_layer_weights(workdir, digits):
    prepared, method = method_for("ofd.yaml")
    teacher_modules = dict(prepared.teacher.named_modules())
    assert [(p.student, p.teacher) for p in method.pairs] == [("blocks.0.1", "blocks.0.1"),
                                                              ("blocks.1.1", "blocks.1.1")]
    for margin, pair in zip(method.margins(), method.pairs):
        torch.testing.assert_close(margin, ofd_margin(teacher_modules[pair.teacher]))
    conv, bn = method.connectors[1]
    assert conv.bias is None and conv.in_channels == 16 and conv.out_channels == 64
    assert conv.weight.std().item() == pytest.approx((2 / 64) ** 0.5, rel=0.1)  # He normal over the fan-out
    assert torch.equal(bn.weight, torch.ones(64)) and torch.equal(bn.bias, torch.zeros(64))
    x, y = digits.x_train[:8], digits.y_train[:8]
    student = forward_with_taps(prepared.student, x, method.student_taps())
    teacher = forward_with_taps(prepared.teacher.eval(), x, method.teacher_taps()).detach()
    total, parts = method.loss(Batch(torch.arange(8), x, y), student, teacher)
    layers = [ofd_loss(c(student.features[p.student]), teacher.features[p.teacher], m)
              for c, p, m in zip(method.connectors, method.pairs, method.margins())]
    assert parts["ofd"].item() == pytest.approx((layers[0] / 2 + layers[1]).item(), rel=1e-5)
    assert method.params.weight == 1e-4  # as ofd.yaml sets it
    assert total.item() == pytest.approx((parts["ce"] + 1e-4 * parts["ofd"]).item(), rel=1e-6)


def test_ofd_refuses_a_teacher_layer_with_no_batch_norm_before_its_relu(workdir):
    result = cli("check", PIPELINES / "ofd.yaml", "--set", "distill.taps={teacher: [blocks.0.0, blocks.1.0]}")
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "distill.taps.teacher: ofd takes its margins from the BatchNorm before the teacher's tapped ReLU, but " \
           "'blocks.0.0' is neither" in result.stderr


def test_ofd_refuses_a_teacher_map_smaller_than_the_students(workdir):
    result = cli("check", PIPELINES / "ofd.yaml", "--set", "distill.taps=null")
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert ("distill.taps: ofd pools the teacher's map to the student's H×W, but the teacher's is smaller"
            in result.stderr)


# --- export -----------------------------------------------------------------------------------


@pytest.mark.slow  # an ONNX export
@pytest.mark.parametrize("file, extra", [("reviewkd.yaml", "abfs"), ("ofd.yaml", "connectors")])
def test_the_exported_graph_holds_the_student_alone(workdir, file, extra):
    prepared, method = method_for(file)
    student_numel = sum(t.numel() for t in prepared.student.state_dict().values())
    extra_numel = sum(p.numel() for p in getattr(method, extra).parameters())
    assert method.extra_modules() is getattr(method, extra)
    assert extra_numel > 0
    export_onnx(method.exported(), torch.zeros(1, *prepared.data.input_shape), workdir / "s.onnx", 18, True)
    graph = onnx.load(workdir / "s.onnx").graph
    onnx_numel = sum(int(np.prod(init.dims)) if init.dims else 1 for init in graph.initializer)
    assert 0 < onnx_numel <= student_numel
    names = " ".join([n.name for n in graph.node] + [i.name for i in graph.initializer])
    assert extra.rstrip("s") not in names and "reduce" not in names and "attention" not in names
