"""The published CIFAR recipe's parts (issue 20): the multistep LR schedule (its LR at every epoch, with and without
warm-up, across an interrupted and resumed phase, its keys refused where they cannot act, gamma searchable) and the
CIFAR source (the python archive as torchvision lays it out, read exactly, keyed by content, bad archives refused in
one line before any run)."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from cifar_archive import CIFAR10_FILES, read_batch, write_cifar10, write_cifar100
from conftest import FAST, PIPELINES, cli, sets
from kdpipe.config import OptimizerConfig
from kdpipe.data import load_data
from kdpipe.data.sources import data_config
from kdpipe.errors import InputError
from kdpipe.pipeline import load_pipeline
from kdpipe.search.space import resolve_space
from kdpipe.train import Phase, Trainer, TrainerSettings, Update, make_optimizer

MULTISTEP = ["distill.optimizer.scheduler=multistep", "distill.optimizer.milestones=[2, 4]"]


def stepped_lrs(cfg: OptimizerConfig, epochs: int, steps_per_epoch: int, **warmup) -> list[float]:
    """The LR of every optimizer step of `epochs` epochs."""
    optimizer, schedule = make_optimizer([nn.Parameter(torch.zeros(2))], cfg, epochs, steps_per_epoch, **warmup)
    lrs = []
    for _ in range(epochs * steps_per_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return lrs


def test_multistep_multiplies_the_lr_by_gamma_after_each_milestone_epoch():
    lr, gamma, milestones, epochs, per_epoch = 0.05, 0.2, [4, 7, 10], 12, 5
    cfg = OptimizerConfig(lr=lr, scheduler="multistep", milestones=milestones, gamma=gamma)
    lrs = stepped_lrs(cfg, epochs, per_epoch)
    for epoch in range(1, epochs + 1):  # epoch e trains at lr·gamma^(milestones before e), on every one of its steps
        expected = lr * gamma ** len([m for m in milestones if m < epoch])
        assert lrs[(epoch - 1) * per_epoch:epoch * per_epoch] == pytest.approx([expected] * per_epoch, rel=1e-12)
    # The published recipe: ×0.1 after 150, 180, 210 of 240 epochs (gamma's default).
    recipe = OptimizerConfig(lr=0.05, scheduler="multistep", milestones=[150, 180, 210])
    firsts = stepped_lrs(recipe, 240, 1)
    assert [firsts[e - 1] for e in (1, 150, 151, 180, 181, 210, 211, 240)] == pytest.approx(
        [0.05, 0.05, 5e-3, 5e-3, 5e-4, 5e-4, 5e-5, 5e-5], rel=1e-12)


def test_multistep_after_a_warmup_multiplies_the_warmup_factor():
    lr, gamma, milestones, per_epoch, warmup_epochs, start = 0.1, 0.5, [1, 3, 5], 4, 2, 0.01
    cfg = OptimizerConfig(lr=lr, scheduler="multistep", milestones=milestones, gamma=gamma)
    lrs = stepped_lrs(cfg, 6, per_epoch, warmup_steps=warmup_epochs * per_epoch, warmup_start_factor=start)
    warmup = warmup_epochs * per_epoch
    for step, got in enumerate(lrs):
        epoch = step // per_epoch + 1
        rising = start + (1 - start) * step / warmup if step < warmup else 1.0
        assert got == pytest.approx(lr * rising * gamma ** len([m for m in milestones if m < epoch]), rel=1e-12)
    assert lrs[warmup] == pytest.approx(lr * gamma)  # the first step after the warm-up: milestone 1 passed


class Interrupted(Exception):
    pass


def train_recording_lrs(data, checkpoint_dir, stop_at_epoch: int | None = None) -> tuple[list[float], nn.Module]:
    """4 epochs of a linear model with a multistep schedule; the LR of every optimizer step. With stop_at_epoch,
    the run dies as that epoch starts (after the checkpoints of the epochs before it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(data.input_shape)), data.num_classes))
    cfg = OptimizerConfig(lr=0.1, scheduler="multistep", milestones=[1, 3], gamma=0.3)
    trainer = Trainer(data, epochs=4, batch_size=256, optimizer=cfg, seed=0,
                      settings=TrainerSettings(checkpoint_dir=checkpoint_dir))
    lrs = []

    def before_epoch(epoch: int) -> None:
        if epoch == stop_at_epoch:
            raise Interrupted

    def loss(batch, shared):
        return nn.functional.cross_entropy(model(batch.x), batch.y), {}

    hook = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: lrs.append(optimizer.param_groups[0]["lr"]))
    try:
        trainer.run([Phase("student", [Update("student", [model], loss)], 4, before_epoch=before_epoch)])
    finally:
        hook.remove()
    return lrs, model


def test_a_resumed_phase_continues_the_multistep_schedule(digits, tmp_path):
    whole, model = train_recording_lrs(digits, tmp_path / "whole")
    per_epoch = len(whole) // 4
    assert sorted(set(whole), reverse=True) == pytest.approx([0.1, 0.03, 0.009])
    with pytest.raises(Interrupted):
        train_recording_lrs(digits, tmp_path / "killed", stop_at_epoch=3)
    resumed, resumed_model = train_recording_lrs(digits, tmp_path / "killed")
    assert resumed == pytest.approx(whole[2 * per_epoch:], rel=1e-12)  # epochs 3 and 4, at their LR
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("overrides, key", [
    (["distill.optimizer.gamma=0.5"], "distill.optimizer.gamma"),
    (["distill.optimizer.scheduler=none", "distill.optimizer.milestones=[3]"], "distill.optimizer.milestones"),
    ([*MULTISTEP, "distill.epochs=3"], "distill.optimizer.milestones"),
    (["distill.optimizer.scheduler=multistep", "distill.optimizer.milestones=[4, 4]"], "distill.optimizer.milestones"),
    (["distill.optimizer.scheduler=multistep", "distill.optimizer.milestones=[0, 2]"],
     "distill.optimizer.milestones.0"),
    (["distill.optimizer.scheduler=multistep", "distill.optimizer.milestones=[]"], "distill.optimizer.milestones"),
    (["distill.optimizer.scheduler=multistep"], "distill.optimizer"),
    ([*MULTISTEP, "distill.optimizer.gamma=1.5"], "distill.optimizer.gamma"),
    (["teacher.train.optimizer={scheduler: multistep, milestones: [31]}"], "teacher.train.optimizer.milestones"),
])
def test_multistep_keys_that_cannot_act_are_refused_naming_the_key(overrides, key):
    with pytest.raises(InputError) as caught:
        load_pipeline(PIPELINES / "digits.yaml", overrides)
    assert caught.value.key == key, caught.value.message


def test_a_bad_milestone_exits_2_in_one_line():
    result = cli("check", PIPELINES / "digits.yaml", *sets(*MULTISTEP, "distill.epochs=3"))
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "distill.optimizer.milestones: expected epochs within 1..3" in lines[0], lines


def test_multistep_keys_are_recorded_only_when_set():
    """A pipeline without multistep records (and keys its teacher cache by) what the release before it did."""
    plain = load_pipeline(PIPELINES / "digits.yaml", [])
    assert set(plain.resolved()["distill"]["optimizer"]) == {"name", "lr", "momentum", "nesterov", "weight_decay",
                                                             "scheduler"}
    recipe = load_pipeline(PIPELINES / "digits.yaml", [*MULTISTEP, "distill.optimizer.gamma=0.2"])
    assert recipe.resolved()["distill"]["optimizer"]["milestones"] == [2, 4]
    again = load_pipeline(PIPELINES / "digits.yaml", [f"distill.optimizer={recipe.resolved()['distill']['optimizer']}"])
    assert again.distill.optimizer == recipe.distill.optimizer
    assert recipe.distill.optimizer.decay_factor == 0.2 and again.distill.optimizer.model_copy(
        update={"gamma": None}).decay_factor == 0.1


def test_a_search_draws_gamma_only_under_multistep():
    search = "search={space: {optimizer.gamma: {low: 0.05, high: 0.5, log: true}}}"
    pipeline = load_pipeline(PIPELINES / "digits.yaml", [*MULTISTEP, search])
    assert resolve_space(pipeline).optimizer == {"gamma": {"low": 0.05, "high": 0.5, "log": True}}
    with pytest.raises(InputError) as caught:
        load_pipeline(PIPELINES / "digits.yaml", [search])
    assert caught.value.key == "search.space.optimizer.gamma" and "multistep" in caught.value.message


# --- the CIFAR source --------------------------------------------------------------------------------------------


def cifar(path, **keys):
    return data_config(source="cifar", path=str(path), **keys)


def test_cifar100_reads_the_archive_exactly(tmp_path):
    root = write_cifar100(tmp_path)
    folder = root / "cifar-100-python"
    data = load_data(cifar(root, val_fraction=0.1), 0)
    test = read_batch(folder / "test")
    # The test batch is the test split, in its order: each row's 3072 bytes are the R, G, B 32×32 planes.
    assert data.stored_test.dtype == torch.uint8 and data.stored_test.shape == (20, 3, 32, 32)
    np.testing.assert_array_equal(data.stored_test.numpy(), test[b"data"].reshape(20, 3, 32, 32))
    np.testing.assert_array_equal(data.stored_test[0, 1, 2, 5].item(), test[b"data"][0, 1024 + 2 * 32 + 5])
    assert data.y_test.tolist() == test[b"fine_labels"]
    assert data.sizes() == {"train": 45, "val": 5, "test": 20} and data.num_classes == 5
    assert data.provenance["classes"] == [f"class_{c}" for c in range(5)]
    assert data.conversion.divisor == 255.0  # 8-bit images stay uint8, scaled per batch
    # The inner folder itself reads the same; coarse labels are the 20 superclasses' (here 2).
    assert load_data(cifar(folder, val_fraction=0.1), 0).fingerprint == data.fingerprint
    coarse = load_data(cifar(root, label="coarse", val_fraction=0.1), 0)
    assert coarse.num_classes == 2 and coarse.y_test.tolist() == test[b"coarse_labels"]


def test_cifar10_reads_its_five_batches_and_test_batch(tmp_path):
    root = write_cifar10(tmp_path)
    folder = root / "cifar-10-batches-py"
    data = load_data(cifar(root, val_fraction=0.2), 0)
    train = np.concatenate([read_batch(folder / name)[b"data"] for name in CIFAR10_FILES])
    stored = torch.cat([data.x_train, data.stored_val]).numpy().reshape(len(train), -1)
    assert sorted(map(bytes, stored)) == sorted(map(bytes, train))  # every training image, split into train and val
    assert data.y_test.tolist() == read_batch(folder / "test_batch")[b"labels"] and data.num_classes == 3
    with pytest.raises(InputError) as caught:
        load_data(cifar(root, label="coarse"), 0)
    assert caught.value.key == "data.label"


def test_the_cifar_fingerprint_is_the_content_not_the_place(tmp_path):
    root = write_cifar100(tmp_path / "a")
    first = load_data(cifar(root), 0).fingerprint
    moved = shutil.copytree(root, tmp_path / "b")
    assert load_data(cifar(moved), 0).fingerprint == first
    batch = read_batch(moved / "cifar-100-python" / "train")
    batch[b"data"][7, 100] ^= 1  # one bit of one training image
    (moved / "cifar-100-python" / "train").write_bytes(pickle.dumps(batch, protocol=2))
    assert load_data(cifar(moved), 0).fingerprint != first


def corrupt(how: str, root):
    folder = root / "cifar-100-python"
    if how == "no folder":
        shutil.rmtree(folder)
    elif how == "missing test":
        (folder / "test").unlink()
    elif how == "not a pickle":
        (folder / "train").write_bytes(b"these are not CIFAR images")
    elif how == "wrong keys":
        (folder / "train").write_bytes(pickle.dumps({b"images": []}, protocol=2))
    elif how == "wrong row size":
        batch = read_batch(folder / "train")
        batch[b"data"] = batch[b"data"][:, :1024]
        (folder / "train").write_bytes(pickle.dumps(batch, protocol=2))
    elif how == "label beyond the classes":
        batch = read_batch(folder / "test")
        batch[b"fine_labels"][0] = 5
        (folder / "test").write_bytes(pickle.dumps(batch, protocol=2))
    elif how == "code in the pickle":
        (folder / "train").write_bytes(pickle.dumps(Exploit(), protocol=2))


class Exploit:
    def __reduce__(self):
        return (print, ("unpickled code ran",))


@pytest.mark.parametrize("how", ["no folder", "missing test", "not a pickle", "wrong keys", "wrong row size",
                                 "label beyond the classes", "code in the pickle"])
def test_a_bad_archive_exits_2_in_one_line_before_any_run(workdir, how):
    root = write_cifar100(workdir / "cifar")
    corrupt(how, root)
    result = cli("run", PIPELINES / "digits.yaml", "--runs-dir", workdir / "runs",
                 *sets(*FAST, f"data={{source: cifar, path: {root}}}"))
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "data.path: " in lines[0], result.output
    assert "unpickled code ran" not in result.output
    assert not (workdir / "runs").exists()


def test_a_path_without_an_archive_names_what_is_expected(tmp_path):
    for path, expected in ((tmp_path / "absent", "not found"), (tmp_path, "cifar-10-batches-py/")):
        with pytest.raises(InputError) as caught:
            load_data(cifar(path), 0)
        assert caught.value.key == "data.path" and expected in caught.value.message
    write_cifar10(tmp_path)
    write_cifar100(tmp_path)
    with pytest.raises(InputError, match="holds both"):
        load_data(cifar(tmp_path), 0)
