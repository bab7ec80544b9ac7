"""`crd` (issue 20): the NCE loss against the hand-written reference, the memories (state, checkpoints, the update
formula, bf16 and queue), the negatives, bad settings, and memories that survive SIGKILL + `--resume` bit for bit."""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time

import pytest
import torch
import torch.nn.functional as F

import reference_losses as ref
from conftest import ONE_THREAD, PIPELINES, cli, run_process, sets, start_run
from kdpipe.config import OptimizerConfig, TapsConfig
from kdpipe.errors import InputError
from kdpipe.losses import crd_nce_loss
from kdpipe.methods import get_method
from kdpipe.methods.crd import draw_negatives, memory_dots
from kdpipe.models.zoo import CNN
from kdpipe.runner import run_pipeline
from kdpipe.taps import Outputs
from kdpipe.train import Batch, Trainer, load_method, save_method

RTOL = 1e-5
FEAT = 128


def build(digits, taps=None, **params):
    cls = get_method("crd")
    torch.manual_seed(0)
    teacher = CNN(digits.input_shape, 10, width=16, depth=3)
    student = CNN(digits.input_shape, 10, width=8, depth=2)
    return cls(cls.Params(**params), student=student, teacher=teacher, num_classes=10, input_shape=digits.input_shape,
               taps=taps)


def trainer(data, epochs=1, **settings):
    return Trainer(data, epochs=epochs, batch_size=32, optimizer=OptimizerConfig(), seed=0, **settings)


def allocated(method, data):
    """The method with its memory allocated, as its phases do before training."""
    next(method.phases(trainer(data)))
    return method


def subset(digits, n=200):
    return dataclasses.replace(digits, x_train=digits.x_train[:n], y_train=digits.y_train[:n])


@pytest.mark.parametrize("n, k, n_data", [(1, 1, 10), (4, 16, 100), (7, 40, 30)])
def test_crd_nce_loss_matches_reference_in_fp32(n, k, n_data):
    probs = torch.rand(n, k + 1, generator=torch.Generator().manual_seed(n + k)) * 3.0
    assert crd_nce_loss(probs, n_data).item() == pytest.approx(ref.crd_nce_loss(probs.numpy(), n_data), rel=RTOL)


def test_memories_and_normalizers_are_in_the_state_dict_initialized_uniform(digits):
    data = subset(digits)
    method = allocated(build(data, negatives=64), data)
    state = method.state_dict()
    n = len(data.y_train)
    for side in ("student_rows", "teacher_rows"):
        rows = state[f"contrast.memory.{side}"]
        assert rows.shape == (n, FEAT) and rows.dtype == torch.float32
        bound = 1 / math.sqrt(FEAT / 3)
        assert rows.abs().max() <= bound and rows.abs().max() > 0.95 * bound
    assert torch.equal(state["contrast.memory.labels"], data.y_train)
    assert state["contrast.memory.z_student"].item() == -1.0 and state["contrast.memory.z_teacher"].item() == -1.0
    assert {"contrast.student_head.weight", "contrast.teacher_head.weight"} <= set(state)
    assert method.exported() is method.student  # heads and memories are dropped at export


def crd_step(method, data, index):
    """One loss evaluation on the training samples at `index`."""
    x, y = data.x_train[index], data.y_train[index]
    from kdpipe.taps import forward_with_taps

    student = forward_with_taps(method.student, x, method.student_taps())
    teacher = forward_with_taps(method.teacher, x, method.teacher_taps()).detach()
    return method.loss(Batch(index, x, y), student, teacher), student, teacher


def test_bank_update_is_the_normalized_half_mix_of_row_and_embedding_only_at_the_batch(digits):
    data = subset(digits, 300)
    method = allocated(build(data, negatives=64), data)
    memory = method.contrast.memory
    before_s, before_t = memory.student_rows.clone(), memory.teacher_rows.clone()
    index = torch.tensor([5, 17, 200, 3])
    _, student, teacher = crd_step(method, data, index)
    with torch.no_grad():
        v_s = F.normalize(method.contrast.student_head(student.features["pool"]), dim=1)
        v_t = F.normalize(method.contrast.teacher_head(teacher.features["pool"]), dim=1)
    torch.testing.assert_close(memory.student_rows[index], F.normalize(0.5 * before_s[index] + 0.5 * v_s, dim=1))
    torch.testing.assert_close(memory.teacher_rows[index], F.normalize(0.5 * before_t[index] + 0.5 * v_t, dim=1))
    others = torch.ones(len(before_s), dtype=torch.bool)
    others[index] = False
    assert torch.equal(memory.student_rows[others], before_s[others])
    assert torch.equal(memory.teacher_rows[others], before_t[others])


def test_loss_is_ce_plus_weight_times_both_sides_nce_with_z_fixed_at_the_first_batch(digits):
    digits = subset(digits)
    method = allocated(build(digits, negatives=32, weight=0.5), digits)
    memory = method.contrast.memory
    index = torch.arange(8)
    rows_s, rows_t = memory.student_rows.clone(), memory.teacher_rows.clone()
    negatives = draw_negatives(memory.labels, digits.y_train[index], 32, method.negatives_generator(index.device))
    (total, parts), student, teacher = crd_step(method, digits, index)
    n = len(digits.y_train)
    with torch.no_grad():
        v_s = F.normalize(method.contrast.student_head(student.features["pool"]), dim=1)
        v_t = F.normalize(method.contrast.teacher_head(teacher.features["pool"]), dim=1)
    rows = torch.cat([index[:, None], negatives], dim=1)
    scores_s = torch.exp(torch.einsum("nkd,nd->nk", rows_t[rows], v_s) / 0.07)
    scores_t = torch.exp(torch.einsum("nkd,nd->nk", rows_s[rows], v_t) / 0.07)
    z_s, z_t = scores_s.mean() * n, scores_t.mean() * n
    torch.testing.assert_close(memory.z_student, z_s)
    torch.testing.assert_close(memory.z_teacher, z_t)
    expected = ref.crd_nce_loss((scores_s / z_s).numpy(), n) + ref.crd_nce_loss((scores_t / z_t).numpy(), n)
    assert parts["crd"].item() == pytest.approx(expected, rel=1e-4)
    assert total.item() == pytest.approx(parts["ce"].item() + 0.5 * expected, rel=1e-4)
    crd_step(method, digits, torch.arange(8, 16))
    torch.testing.assert_close(memory.z_student, z_s)  # fixed: the second batch does not move it


def test_negatives_are_other_class_distinct_and_with_replacement_only_beyond_the_pool():
    labels = torch.tensor([0] * 6 + [1] * 3 + [2] * 3)
    anchors = torch.tensor([0, 1, 2])
    drawn = draw_negatives(labels, anchors, 6, torch.Generator().manual_seed(0))
    assert drawn.shape == (3, 6)
    assert all((labels[row] != a).all() for row, a in zip(drawn, anchors))
    assert len(set(drawn[0].tolist())) == 6  # class 0 has 6 other-class samples: all of them, once each
    assert len(set(drawn[1].tolist())) <= 6 and set(drawn[1].tolist()) <= set(range(6)) | set(range(9, 12))
    many = draw_negatives(labels, anchors, 50, torch.Generator().manual_seed(0))  # beyond every pool: repeats
    assert all((labels[row] != a).all() for row, a in zip(many, anchors))
    again = draw_negatives(labels, anchors, 50, torch.Generator().manual_seed(0))
    assert torch.equal(many, again)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_dots_score_against_every_row_or_gather_alike_in_fp32_without_gradient_to_the_memory(dtype):
    """Small memories are scored whole and the columns picked; memories larger than the gather (n_data > N·(K+1))
    are gathered: the same fp32 dot products, with gradient to v only."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(50, 8, generator=g).to(dtype)
    v = torch.randn(3, 8, generator=g, requires_grad=True)
    wide, narrow = torch.randint(0, 50, (3, 20), generator=g), torch.randint(0, 50, (3, 4), generator=g)
    expected = lambda cols: torch.einsum("nkd,nd->nk", rows.double()[cols], v.double())  # noqa: E731
    for columns in (wide, narrow):  # 60 ≥ 50 rows: scored whole; 12 < 50: gathered
        dots = memory_dots(rows, v, columns)
        assert dots.dtype == torch.float32
        torch.testing.assert_close(dots.double(), expected(columns), rtol=1e-5, atol=1e-5)
        rows.zero_()  # the memory's update in place before the backward pass must not be seen by it
        dots.sum().backward()
        rows.copy_(torch.randn(50, 8, generator=torch.Generator().manual_seed(0)).to(dtype))
    assert not rows.requires_grad and v.grad is not None


@pytest.mark.parametrize("params, mb", [
    ({}, lambda n: 2 * n * FEAT * 4 / 2**20),
    ({"bank_dtype": "bf16"}, lambda n: 2 * n * FEAT * 2 / 2**20),
    ({"memory": "queue", "queue_size": 64}, lambda n: 2 * 64 * FEAT * 4 / 2**20),
])
def test_bank_bf16_and_queue_train_and_report_their_memory(digits, params, mb):
    data = subset(digits)
    method = build(data, negatives=48, **params)
    seen = []
    run = trainer(data, on_epoch=lambda label, epoch, epochs, metrics: seen.append(metrics))
    method.fit(run)
    memory = method.contrast.memory
    assert seen[-1]["train_memory_mb"] == pytest.approx(mb(len(data.y_train)))
    assert torch.isfinite(memory.student_rows.float()).all() and memory.z_student.item() > 0
    assert memory.student_rows.dtype == (torch.bfloat16 if params.get("bank_dtype") == "bf16" else torch.float32)
    if params.get("memory") == "queue":
        assert (memory.labels >= 0).all()  # a 200-sample epoch filled the 64 slots with labelled embeddings
        assert memory.queue_next.item() == len(data.y_train) % 64


def test_method_checkpoint_restores_memories_into_a_method_not_yet_allocated(digits, tmp_path):
    data = subset(digits)
    method = build(data, negatives=48)
    method.fit(trainer(data))
    save_method(method, tmp_path / "student.pt")
    fresh = build(data, negatives=48)
    assert not fresh.contrast.memory.allocated
    load_method(fresh, tmp_path / "student.pt", torch.device("cpu"))
    for key, value in method.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_loss_runs_in_fp32_under_bf16_autocast(digits):
    digits = subset(digits)
    method = allocated(build(digits, negatives=32), digits)
    x, y = digits.x_train[:8], digits.y_train[:8]
    logits = torch.randn(8, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, parts = method.loss(Batch(torch.arange(8), x, y),
                               Outputs(logits.bfloat16(), {"pool": torch.randn(8, 16).bfloat16()}),
                               Outputs(logits.bfloat16(), {"pool": torch.randn(8, 64).bfloat16()}))
    assert parts["crd"].dtype == torch.float32 and torch.isfinite(parts["crd"])
    assert method.contrast.memory.z_student.dtype == torch.float32


def test_models_without_one_embedding_are_input_errors(digits):
    with pytest.raises(InputError) as err:
        build(digits, taps=TapsConfig(student=["blocks.0", "pool"], teacher=["blocks.0", "pool"]))
    assert err.value.key == "distill.taps" and "one embedding" in err.value.message

    class Bare(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.flat, self.fc = torch.nn.Flatten(), torch.nn.Linear(64, 10)

        def forward(self, x):
            return self.fc(self.flat(x))

    cls = get_method("crd")
    with pytest.raises(InputError) as err:
        cls(cls.Params(), student=Bare(), teacher=CNN(digits.input_shape, 10), num_classes=10, input_shape=(1, 8, 8))
    assert err.value.key == "distill.taps.student"


@pytest.mark.parametrize("setting, key, says", [
    ("distill.params.negatives=0", "distill.params.negatives", "≥ 1"),
    ("distill.params.temperature=0", "distill.params.temperature", "> 0"),
    ("distill.params.bank_dtype=fp16", "distill.params.bank_dtype", "fp32"),
    ("distill.params.memory=queue distill.params.queue_size=16", "distill.params.queue_size", "data.batch_size"),
])
def test_bad_settings_exit_2_in_one_line_before_anything_runs(workdir, setting, key, says):
    pipeline = PIPELINES / "crd.yaml"
    result = cli("run", pipeline, *sets(*setting.split()))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and says in lines[0], lines
    assert not (workdir / "runs").exists()


def _run_until(stage: str, *more: str) -> list[str]:
    return ["run", PIPELINES / "crd.yaml", "--until", stage, *more, *sets("teacher.train.epochs=8", "distill.epochs=4")]


@pytest.mark.slow
def test_memories_survive_sigkill_and_resume_bit_identically(workdir):
    """An uninterrupted run and one killed after its first distill epoch checkpoint, then resumed, end with the same
    method checkpoint (student.pt: student, heads, both memories, Z), bit for bit, on one thread. The teacher is
    trained first, so that both runs read it from the cache."""
    teacher = run_process(*_run_until("teacher", "--runs-dir", workdir / "teacher-run"), env=ONE_THREAD, cwd=workdir)
    assert teacher.returncode == 0, teacher.stderr[-3000:]  # both runs below read this cached teacher
    whole = run_process(*_run_until("distill"), env=ONE_THREAD, cwd=workdir)
    assert whole.returncode == 0, whole.stderr[-3000:]
    (whole_dir,) = (workdir / "runs").glob("*/*")

    proc = start_run(*_run_until("distill"), cwd=workdir)
    deadline = time.monotonic() + 240
    killed_dir = None
    while time.monotonic() < deadline and proc.poll() is None and killed_dir is None:
        found = [p for p in (workdir / "runs").glob("*/*/checkpoints/distill/*.pt") if whole_dir not in p.parents]
        killed_dir = found[0].parents[2] if found else None
        time.sleep(0.02)
    assert killed_dir is not None, proc.stderr.read() if proc.poll() is not None else "timeout"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / "student.pt").exists()  # killed mid-distill
    resumed = run_process("run", "--resume", killed_dir, "--until", "distill", env=ONE_THREAD, cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    whole_state = torch.load(whole_dir / "student.pt", weights_only=True)["state"]
    resumed_state = torch.load(killed_dir / "student.pt", weights_only=True)["state"]
    assert set(whole_state) == set(resumed_state)
    memories = {"contrast.memory.student_rows", "contrast.memory.teacher_rows", "contrast.memory.z_student"}
    assert memories <= set(whole_state)
    for key, value in whole_state.items():
        assert torch.equal(value, resumed_state[key]), key


def _rank_memories(rank: int, port: int, x: torch.Tensor, y: torch.Tensor, out: str) -> None:
    """One of two gloo ranks: three batches of 8, each rank taking its share, through CRD's loss; saves its memories."""
    from kdpipe import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.init(torch.device("cpu"))
    try:
        data = type("Data", (), {"input_shape": (1, 8, 8)})
        method = build(data, negatives=16)
        method.teacher.eval()  # outside the method's module tree
        method.contrast.memory.allocate(y, 0)
        for step in range(3):
            share = torch.arange(step * 8, (step + 1) * 8)[rank::2]
            crd_step(method.eval(), type("Split", (), {"x_train": x, "y_train": y}), share)
        torch.save({k: v for k, v in method.state_dict().items() if k.startswith("contrast.memory")}, f"{out}-{rank}.pt")
    finally:
        distributed.shutdown()


@pytest.mark.slow  # two spawned processes, each importing torch: ~25 s on a shared 2-core machine
def test_under_two_gloo_ranks_the_memories_stay_equal_and_take_every_ranks_rows(digits, tmp_path):
    """Each rank contrasts its share of a batch; both update the memories with the rows of both (all-gathered), so
    the ranks' memories and Z are equal, and the memories equal to one process's that took the whole batches
    (eval-mode networks: an embedding does not depend on the batch)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    x, y = digits.x_train[:64].clone(), digits.y_train[:64].clone()
    mp.spawn(_rank_memories, args=(port, x, y, str(tmp_path / "rank")), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank-{r}.pt", weights_only=True) for r in (0, 1))
    data = type("Split", (), {"x_train": x, "y_train": y, "input_shape": (1, 8, 8)})
    single = build(data, negatives=16)
    single.teacher.eval()
    single.contrast.memory.allocate(y, 0)
    for step in range(3):
        crd_step(single.eval(), data, torch.arange(step * 8, (step + 1) * 8))
    for key, value in rank0.items():
        assert torch.equal(value, rank1[key]), key
    for key in ("student_rows", "teacher_rows", "labels"):  # Z differs: each rank draws its own negatives
        torch.testing.assert_close(rank0[f"contrast.memory.{key}"], getattr(single.contrast.memory, key),
                                   rtol=1e-5, atol=1e-6)
    fresh = build(data, negatives=16).contrast.memory
    fresh.allocate(y, 0)
    assert not torch.equal(rank0["contrast.memory.student_rows"][:24], fresh.student_rows[:24])  # they were updated


def test_heads_start_alike_whether_the_teacher_was_trained_in_the_run_or_read_from_the_cache(workdir):
    """The distill stage draws the method's own modules (CRD's embedding heads) from the training seed: training the
    teacher in the same process consumed the global generator before, and a cached teacher gave another student."""
    students = []
    for _ in range(2):  # the first run trains the teacher, the second reads it from the cache
        report_path, _ = run_pipeline(PIPELINES / "crd.yaml", ["teacher.train.epochs=2", "distill.epochs=1"],
                                      workdir / "runs", cache_dir=workdir / "cache", until="distill")
        students.append(torch.load(report_path.parent / "student.pt", weights_only=True))
    first, second = (flat_tensors(s) for s in students)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first), [k for k in first if not torch.equal(first[k], second[k])]


def flat_tensors(state, prefix: str = "") -> dict[str, torch.Tensor]:
    if torch.is_tensor(state):
        return {prefix: state}
    if isinstance(state, dict):
        return {k: v for key, item in state.items() for k, v in flat_tensors(item, f"{prefix}.{key}").items()}
    return {}
