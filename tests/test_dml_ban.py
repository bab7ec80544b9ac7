"""`dml` (Deep Mutual Learning) and `ban` (Born-Again Networks): peers and generations are separate networks,
gradients stay with their own network, the teacher never changes, bad inputs, the ensemble export, end to end."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from conftest import FAST, LENIENT, PIPELINES, cli, read_report, sets
from kdpipe.config import OptimizerConfig
from kdpipe.losses import cwtm_weights, dkpp_targets, dml_loss
from kdpipe.methods import get_method
from kdpipe.methods.ban import GenerationEnsemble
from kdpipe.models.zoo import CNN, MLP
from kdpipe.onnx_export import export_onnx
from kdpipe.inference import accuracy
from kdpipe.train import Trainer


def build(name, digits, teacher=True, **params):
    cls = get_method(name)
    torch.manual_seed(0)
    t = CNN(digits.input_shape, 10, width=16, depth=2).eval() if teacher else None
    student = CNN(digits.input_shape, 10, width=8, depth=2)
    return cls(cls.Params(**params), student=student, teacher=t, num_classes=10, input_shape=digits.input_shape)


def trainer(digits, epochs=1):
    return Trainer(digits, epochs=epochs, batch_size=128, optimizer=OptimizerConfig(), seed=0)


def snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def unchanged(module, before):
    return all(torch.equal(b, p) for b, p in zip(before, module.parameters()))


def shares_parameters(a, b):
    return bool({p.data_ptr() for p in a.parameters()} & {p.data_ptr() for p in b.parameters()})


def assert_one_line_exit_2(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# --- DML ------------------------------------------------------------------------------------------


def test_dml_peers_get_no_gradient_from_each_others_losses(digits):
    method = build("dml", digits, teacher=False, peers=[{"arch": "mlp", "width": 32}])
    peers = method.build_peers(seed=0)
    assert peers[0] is method.student and isinstance(peers[1], MLP)
    x, y = digits.x_train[:16], digits.y_train[:16]
    for k in range(2):
        for peer in peers:
            peer.zero_grad(set_to_none=True)
        z = [peer(x) for peer in peers]
        loss, _ = method.peer_loss(k, z[k], z[:k] + z[k + 1:], y)
        loss.backward()
        assert all(p.grad is not None for p in peers[k].parameters())
        assert all(p.grad is None for p in peers[1 - k].parameters())


def test_dml_loss_is_ce_plus_mimicry_of_every_other_peer_and_the_fixed_teacher(digits):
    method = build("dml", digits, peers=3, target="average")
    peers = method.build_peers(seed=0)
    x, y = digits.x_train[:16], digits.y_train[:16]
    teacher_logits = method.teacher(x).detach()
    z = [p(x) for p in peers]
    loss, parts = method.peer_loss(1, z[1], [z[0], z[2], teacher_logits], y)
    expected = F.cross_entropy(z[1], y) + dml_loss(z[1], [z[0], z[2], teacher_logits], target="average")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert parts["mimicry"].item() > 0


def _one_batch(digits):
    """The digits splits with one training batch of 256 samples (so an epoch is exactly one step)."""
    import dataclasses

    return dataclasses.replace(digits, x_train=digits.x_train[:256], y_train=digits.y_train[:256])


@pytest.mark.parametrize("update", ["sequential", "simultaneous"])
def test_dml_updates_follow_algorithm_1_or_the_simultaneous_form(digits, update):
    """Sequential (the paper's Algorithm 1): peer 0 steps against peer 1's prediction, then peer 1 steps against
    peer 0's prediction recomputed after its update. Simultaneous: both step from one forward pass."""
    import copy

    data = _one_batch(digits)
    method = build("dml", data, teacher=False, peers=2, update=update)
    optimizer = OptimizerConfig(scheduler="none", momentum=0.0, weight_decay=0.0)
    reference = [copy.deepcopy(p) for p in method.build_peers(seed=0)]
    Trainer(data, epochs=1, batch_size=256, optimizer=optimizer, seed=0).run(method.phases(
        Trainer(data, epochs=1, batch_size=256, optimizer=optimizer, seed=0)))
    order = torch.randperm(256, generator=torch.Generator().manual_seed(0))
    x, y = data.x_train[order], data.y_train[order]
    sgd = [torch.optim.SGD(p.parameters(), lr=optimizer.lr) for p in reference]
    for p in reference:
        p.train()
    with torch.no_grad():
        before = [p(x) for p in reference]
    for k in range(2):
        z_k = reference[k](x)
        if update == "sequential":
            with torch.no_grad():
                other = reference[1 - k](x)  # peer 0 already stepped when k = 1: its new prediction
        else:
            other = before[1 - k]
        loss = F.cross_entropy(z_k, y) + dml_loss(z_k, [other])
        sgd[k].zero_grad()
        loss.backward()
        sgd[k].step()
    for trained, expected in zip(method.peers, reference):
        for a, b in zip(trained.parameters(), expected.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_dml_copies_of_the_student_are_distinct_fresh_networks(digits):
    method = build("dml", digits, teacher=False, peers=3)
    peers = method.build_peers(seed=0)
    assert len(peers) == 3 and all(type(p) is CNN for p in peers)
    for i in range(3):
        for j in range(i + 1, 3):
            assert not shares_parameters(peers[i], peers[j])
            assert not torch.equal(peers[i].fc.weight, peers[j].fc.weight)


def test_dml_fit_trains_every_peer_exports_the_named_one_and_keeps_the_teacher_fixed(digits):
    method = build("dml", digits, peers=2, export_peer=1)
    teacher_before, student_before = snapshot(method.teacher), snapshot(method.student)
    exported = method.fit(trainer(digits))
    assert exported is method.peers[1] and exported is not method.student
    assert unchanged(method.teacher, teacher_before)
    assert not unchanged(method.student, student_before)
    assert list(method.extra_modules()) == [method.student]  # the peer not exported is checkpointed beside it


def test_dml_without_teacher_exports_the_best_peer_on_validation(digits):
    method = build("dml", digits, teacher=False, peers=[{"arch": "mlp", "width": 64}])
    exported = method.fit(trainer(digits, epochs=2))
    val = [accuracy(p, digits.x_val, digits.y_val) for p in method.peers]
    assert exported is method.peers[int(np.argmax(val))]


@pytest.mark.parametrize("peers", ["1", "[]"])
def test_dml_fewer_than_two_peers_exits_2(workdir, peers):
    pipeline = PIPELINES / "dml.yaml"
    result = cli("check", pipeline, *sets(f"distill.params.peers={peers}"))
    assert_one_line_exit_2(result, f"{pipeline}: distill.params.peers: ", "at least 2 peers")


def test_dml_export_peer_out_of_range_and_bad_peer_model_exit_2(workdir):
    pipeline = PIPELINES / "dml.yaml"
    result = cli("check", pipeline, *sets("distill.params.export_peer=5"))
    assert_one_line_exit_2(result, "distill.params.export_peer", "2 peers")
    result = cli("check", pipeline, *sets("distill.params.peers=[{arch: cnnn}]"))
    assert_one_line_exit_2(result, "distill.params.peers.0.arch", "unknown arch 'cnnn'")


@pytest.mark.slow
def test_dml_end_to_end_without_teacher(workdir):
    no_teacher = [o for o in FAST if not o.startswith("teacher.")]  # dml.yaml has `teacher: null`
    result = cli("run", PIPELINES / "dml.yaml", *sets(*no_teacher, "validate.gates.accuracy_min=0.5"))
    assert result.exit_code == 0, result.output
    report = read_report(result.stdout)
    assert report["status"] == "passed" and report["teacher"] is None
    assert report["student"]["accuracy"] > 0.5
    checkpoint = torch.load(f"{report['run_dir']}/student.pt", weights_only=True)
    # The other peer is checkpointed beside the exported student: the method's state holds every peer.
    assert {"peers.0.fc.weight", "peers.1.fc.weight"} <= set(checkpoint["state"])


# --- BAN ------------------------------------------------------------------------------------------


def test_ban_generations_are_distinct_modules_and_the_teacher_is_never_updated(digits):
    method = build("ban", digits, generations=3)
    teacher_before = snapshot(method.teacher)
    student_init = snapshot(method.student)
    exported = method.fit(trainer(digits))
    generations = method.generations
    assert len(generations) == 3 and exported is generations[-1] and generations[0] is method.student
    for i in range(3):
        for j in range(i + 1, 3):
            assert generations[i] is not generations[j]
            assert not shares_parameters(generations[i], generations[j])
    assert unchanged(method.teacher, teacher_before)
    assert all(not p.requires_grad for p in method.teacher.parameters())
    assert not unchanged(method.student, student_init)
    assert list(method.extra_modules()) == list(generations[:2])


def test_ban_generations_start_from_fresh_seeds(digits):
    from kdpipe.methods.ban import fresh_copy

    student = CNN(digits.input_shape, 10, width=8, depth=2)
    a, b = fresh_copy(student, 1), fresh_copy(student, 2)
    assert not torch.equal(a.fc.weight, student.fc.weight) and not torch.equal(a.fc.weight, b.fc.weight)
    assert torch.equal(fresh_copy(student, 1).fc.weight, a.fc.weight)  # reproducible from the seed
    assert not shares_parameters(a, student)


@pytest.mark.parametrize("variant", ["ban", "ban+l", "cwtm", "dkpp"])
def test_ban_generation_loss_per_variant(digits, variant):
    method = build("ban", digits, variant=variant, label_weight=0.5)
    logits, previous = torch.randn(6, 10), torch.randn(6, 10)
    y = torch.randint(0, 10, (6,))
    loss, _ = method.generation_loss(logits, y, previous, torch.Generator().manual_seed(3))
    log_p = F.log_softmax(logits, dim=1)
    soft = -(F.softmax(previous, dim=1) * log_p).sum(1).mean()
    expected = {
        "ban": soft,
        "ban+l": soft + 0.5 * F.cross_entropy(logits, y),
        "cwtm": (cwtm_weights(previous) * F.cross_entropy(logits, y, reduction="none")).sum(),
        "dkpp": -(dkpp_targets(previous, torch.Generator().manual_seed(3)) * log_p).sum(1).mean(),
    }[variant]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # Without a previous network (generation 1, no teacher): labels alone.
    loss, _ = method.generation_loss(logits, y, None, torch.Generator())
    assert loss.item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)


def test_ban_without_teacher_learns_from_labels(digits):
    method = build("ban", digits, teacher=False, generations=2)
    exported = method.fit(trainer(digits))
    assert exported is method.generations[1]


def test_ban_ensemble_onnx_gives_logits_whose_softmax_is_the_average_of_generation_softmaxes(digits, tmp_path):
    method = build("ban", digits, generations=2, export="ensemble")
    ensemble = method.fit(trainer(digits))
    assert isinstance(ensemble, GenerationEnsemble) and list(ensemble.generations) == list(method.generations)
    assert method.extra_modules() is None  # every generation is in the exported graph
    path = tmp_path / "ensemble.onnx"
    export_onnx(ensemble, digits.x_val[:2], path, opset=18, dynamic_batch=True)
    x = digits.x_val[:17]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_outputs()[0].name == "logits"
    got = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        expected = torch.stack([F.softmax(g.eval()(x), dim=1) for g in method.generations]).mean(0).numpy()
    np.testing.assert_allclose(got, np.log(expected), atol=1e-4)  # the log of the mean probability: valid logits
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(got), 1).numpy(), expected, atol=1e-5)


def test_ban_zero_generations_exits_2(workdir):
    pipeline = PIPELINES / "ban.yaml"
    result = cli("check", pipeline, *sets("distill.params.generations=0"))
    assert_one_line_exit_2(result, f"{pipeline}: distill.params.generations: ", "≥ 1")


@pytest.mark.slow
def test_ban_end_to_end_with_the_ensemble_export(workdir):
    result = cli("run", PIPELINES / "ban.yaml", *sets(*FAST, *LENIENT, "distill.params.generations=2",
                                                      "distill.params.export=ensemble"))
    assert result.exit_code == 0, result.output
    report = read_report(result.stdout)
    assert report["status"] == "passed" and report["student"]["accuracy"] > 0.5
    assert report["onnx"]["parity_max_abs_diff"] < 1e-4
    one_generation = sum(p.numel() for p in CNN((1, 8, 8), 10, width=8, depth=2).parameters())
    assert report["student"]["params"] == 2 * one_generation  # the exported graph holds both generations
