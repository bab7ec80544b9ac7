"""Teacher views (FKD): recorded augmented views replayed exactly, top-k soft labels, one teacher pass per campaign,
the KD loss equal to the online teacher's when all classes are kept, and the online teacher where views do not
apply."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kdpipe.teacher_cache
import kdpipe.teacher_views
import kdpipe.train.serving
from kdpipe.config import ModelConfig, OptimizerConfig
from kdpipe.data.sources import data_config
from kdpipe.data import load_data
from kdpipe.methods import get_method
from kdpipe.models import build_model
from kdpipe.teacher_cache import TeacherOutputCache, teacher_pass
from kdpipe.train import Trainer, TrainerSettings
from conftest import FAST, PIPELINES, cli, read_report, sets, write_pipeline

CROP_FLIP = [{"random_crop": {"padding": 4}}, "hflip"]
RESIZE_JITTER = [{"random_resized_crop": {"scale": [0.4, 1.0]}},
                 {"color_jitter": {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1}}]
CLASSES = 10
VIEWS = 3
# Two-epoch students on augmented 8×8 digits are not accurate yet (at chance): these tests are about how the teacher
# ran.
NO_GATES = ["validate.gates.accuracy_min=0.0", "validate.gates.max_accuracy_drop_vs_teacher=1.0",
            "validate.gates.above_chance=null"]


@pytest.fixture(scope="module")
def images_npz(tmp_path_factory):
    """120 random 16×16 RGB images in 10 classes: every crop, flip and colour change of one is distinguishable."""
    path = tmp_path_factory.mktemp("views") / "images.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 256, (120, 3, 16, 16), dtype=np.uint8), y=np.arange(120) % CLASSES)
    return path


def load(path, augment):
    return load_data(data_config(source="npz", path=path, augment=augment, val_fraction=0.2, test_fraction=0.2,
                                normalize={"mean": [0.5] * 3, "std": [0.25] * 3}), seed=0)


def models(data):
    torch.manual_seed(0)
    teacher = build_model(ModelConfig(arch="cnn", width=16, depth=2), "teacher", data.input_shape, data.num_classes)
    student = build_model(ModelConfig(arch="cnn", width=4, depth=2), "student", data.input_shape, data.num_classes)
    return teacher, student


def trainer(data, cache=None, **options):
    return Trainer(data, epochs=1, batch_size=32, optimizer=OptimizerConfig(), seed=0,
                   settings=TrainerSettings(teacher_cache=cache, teacher_views=VIEWS, **options))


def scored_inputs(teacher, data, **options):
    """The trainer after it built the views, and every input the teacher scored in its view pass, in row order."""
    scored = []
    hook = teacher.register_forward_pre_hook(lambda module, args: scored.append(args[0].detach().clone()))
    try:
        t = trainer(data, **options)
        t.teacher(teacher, [], soft_labels=True)
    finally:
        hook.remove()
    return t, torch.cat(scored)


@pytest.mark.parametrize("augment", [CROP_FLIP, RESIZE_JITTER], ids=["crop-flip", "resized-crop-color-jitter"])
def test_replayed_views_are_exactly_the_inputs_the_teacher_scored(images_npz, augment):
    data = load(images_npz, augment)
    teacher, _ = models(data)
    t, scored = scored_inputs(teacher, data)
    n = len(data.y_train)
    assert t.teacher_modes[-1]["mode"] == "views" and len(scored) == n * VIEWS
    plain = data.to_input(data.x_train)
    assert not torch.equal(scored[0::VIEWS], plain) and not torch.equal(scored[0::VIEWS], scored[1::VIEWS])

    generator = torch.Generator().manual_seed(0)
    chosen = []
    for _ in range(2):  # two epochs: other batches, other views, the same recorded inputs
        for batch in t.batches(generator):
            assert torch.equal(batch.x, scored[batch.index * VIEWS + batch.view])
            assert torch.equal(batch.y, data.y_train[batch.index])
            chosen.append(torch.zeros(n, dtype=torch.long).index_put_((batch.index,), batch.view))
    assert set(torch.cat([c.unique() for c in chosen]).tolist()) == set(range(VIEWS))
    assert not torch.equal(sum(chosen[:len(chosen) // 2]), sum(chosen[len(chosen) // 2:]))  # a new pick each epoch


def test_topk_targets_sum_to_one_and_spread_the_rest_evenly(images_npz):
    data = load(images_npz, CROP_FLIP)
    teacher, _ = models(data)
    t, scored = scored_inputs(teacher, data, teacher_topk=3)
    index = torch.arange(len(data.y_train))
    view = index % VIEWS
    targets = t.views.log_probabilities(index, view).exp()
    assert targets.shape == (len(index), CLASSES)
    assert torch.allclose(targets.sum(1), torch.ones(len(index)), atol=2e-3)  # fp16 log-probabilities

    p = F.softmax(teacher_pass(teacher, scored[index * VIEWS + view], []).logits, dim=1)
    top, top_class = p.topk(3, dim=1)
    assert torch.allclose(targets.gather(1, top_class), top, rtol=2e-3, atol=1e-4)
    others = targets.scatter(1, top_class, float("nan"))
    rest = (1 - top.sum(1, keepdim=True)) / (CLASSES - 3)
    assert torch.allclose(others[~others.isnan()].view(-1, CLASSES - 3), rest.expand(-1, CLASSES - 3), rtol=2e-3)


def kd_losses(data, teacher, student, batch, **options):
    """kd's loss and parts on `batch` through a fresh trainer with `options`, and the teacher mode it used."""
    t = trainer(data, TeacherOutputCache(), **options)
    kd = get_method("kd")
    method = kd(kd.Params(temperature=4.0, alpha=0.9), student=student, teacher=teacher, num_classes=CLASSES,
                input_shape=data.input_shape)
    loss, parts = method.student_update(t, "student").loss(batch, {})
    return loss, parts["kd"], t.teacher_modes[-1]["mode"]


def test_kd_loss_from_views_equals_the_online_teachers_when_every_class_is_kept(images_npz):
    data = load(images_npz, CROP_FLIP)
    teacher, student = models(data)
    t = trainer(data, teacher_topk=50)  # clipped to the 10 classes
    t.teacher(teacher, [], soft_labels=True)
    batch = next(t.batches(torch.Generator().manual_seed(1)))
    student.eval()  # the same student outputs for every loss below

    views, views_kd, mode = kd_losses(data, teacher, student, batch, teacher_topk=CLASSES)
    assert mode == "views"
    online, online_kd, mode = kd_losses(data, teacher, student, batch, teacher_online=True)
    assert mode == "online"
    assert views_kd.item() == pytest.approx(online_kd.item(), rel=2e-3) and views_kd.item() > 1e-3
    assert views.item() == pytest.approx(online.item(), rel=2e-3)
    _, top2_kd, _ = kd_losses(data, teacher, student, batch, teacher_topk=2)
    assert abs(top2_kd.item() - online_kd.item()) > 10 * abs(views_kd.item() - online_kd.item())


def test_feature_methods_and_unaugmented_data_do_not_use_views(images_npz):
    data = load(images_npz, CROP_FLIP)
    teacher, student = models(data)
    t = trainer(data)
    at = get_method("at")
    at(at.Params(), student=student, teacher=teacher, num_classes=CLASSES, input_shape=data.input_shape) \
        .student_update(t, "student")
    assert t.teacher_modes == [{"mode": "online", "reason": "augmented inputs, and the method reads teacher features "
                                                            "or raw logits, which teacher views do not keep"}]
    assert t.views is None

    t = trainer(load(images_npz, []))
    t.teacher(teacher, [], soft_labels=True)
    assert t.teacher_modes[-1]["mode"] == "cached" and t.views is None


def test_fitnets_hints_run_online_and_its_kd_stage_replays_views(images_npz):
    data = load(images_npz, CROP_FLIP)
    teacher, student = models(data)
    t = trainer(data)
    fitnets = get_method("fitnets")
    fitnets(fitnets.Params(stages=2, hint_epochs=1), student=student, teacher=teacher, num_classes=CLASSES,
            input_shape=data.input_shape).fit(t)
    assert [m["mode"] for m in t.teacher_modes] == ["online", "views"]
    assert t.views is not None and len(t.epoch_log) == 2  # one hint epoch, one KD epoch


def test_views_are_kept_on_disk_and_memory_mapped_beyond_the_memory_budget(images_npz, tmp_path):
    data = load(images_npz, CROP_FLIP)
    teacher, _ = models(data)
    first = trainer(data, TeacherOutputCache(tmp_path, memory_budget_mb=0.0))
    first.teacher(teacher, [], soft_labels=True)
    assert [p.name.startswith("views-") for p in tmp_path.glob("*.pt")] == [True]
    second_cache = TeacherOutputCache(tmp_path, memory_budget_mb=0.0)  # another process: reads the file
    second = trainer(data, second_cache)
    second.teacher(teacher, [], soft_labels=True)
    assert second_cache.view_passes == 0 and first.teacher_cache.view_passes == 1
    index, view = torch.arange(len(data.y_train)), torch.arange(len(data.y_train)) % VIEWS
    assert torch.equal(second.views.log_probabilities(index, view), first.views.log_probabilities(index, view))
    assert mapped_from(second.views.top_logprob, next(tmp_path.glob("views-*.pt")))  # read from the file, not copied
    resident = trainer(data, TeacherOutputCache(tmp_path))  # no budget: loaded into memory
    resident.teacher(teacher, [], soft_labels=True)
    assert not mapped_from(resident.views.top_logprob, next(tmp_path.glob("views-*.pt")))


def test_views_and_teacher_outputs_share_one_memory_budget(images_npz):
    """Room for either entry but not both: each one held pushes the other out, least recently used first."""
    from kdpipe.teacher_cache import nbytes
    from kdpipe.teacher_views import _nbytes

    data = load(images_npz, CROP_FLIP)
    teacher, _ = models(data)
    unbounded = trainer(data, TeacherOutputCache())
    unbounded.teacher(teacher, [], soft_labels=True)
    sizes = sorted([_nbytes(unbounded.views.state()), nbytes(TeacherOutputCache().get(teacher, data, []))])
    cache = TeacherOutputCache(memory_budget_mb=(sizes[1] + sizes[0] / 2) / 2**20)
    outputs = cache.get(teacher, data, [])
    assert cache.get(teacher, data, []) is outputs and cache.forward_passes == 1  # held
    views = trainer(data, cache)
    views.teacher(teacher, [], soft_labels=True)
    assert cache.view_passes == 1 and cache.spilled == 0
    cache.get(teacher, data, [])  # the views took its room: computed again, and now the views leave
    assert cache.forward_passes == 2
    again = trainer(data, cache)
    again.teacher(teacher, [], soft_labels=True)
    assert cache.view_passes == 2
    index, view = torch.arange(len(data.y_train)), torch.arange(len(data.y_train)) % VIEWS
    assert torch.equal(again.views.log_probabilities(index, view), views.views.log_probabilities(index, view))


def mapped_from(tensor: torch.Tensor, path) -> bool:
    """Whether `tensor`'s memory lies in a mapping of the file `path` (Linux /proc/self/maps)."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(path):
            low, high = (int(a, 16) for a in fields[0].split("-"))
            if low <= address < high:
                return True
    return False


@pytest.fixture
def count_teacher_passes(monkeypatch):
    """Counts every teacher forward kdpipe makes (view pass, cached pass, online steps), running each for real."""
    calls = {"views": 0, "view_rows": 0, "other": 0}

    def counting(kind):
        def run(teacher, x, *args, **kwargs):
            calls[kind] += 1
            if kind == "views":
                calls["view_rows"] += len(x)
            return teacher_pass(teacher, x, *args, **kwargs)
        return run

    monkeypatch.setattr(kdpipe.teacher_views, "teacher_pass", counting("views"))
    monkeypatch.setattr(kdpipe.train.serving, "teacher_pass", counting("other"))
    monkeypatch.setattr(kdpipe.teacher_cache, "teacher_pass", counting("other"))
    return calls


@pytest.mark.slow
def test_a_three_trial_campaign_scores_the_views_once(workdir, teacher_cache, monkeypatch, count_teacher_passes):
    # A view cache of its own (other tests record views of this augmentation in the session's cache), with the
    # session's trained teachers, so the one view pass counted is this campaign's.
    if (teacher_cache / "teachers").is_dir():
        shutil.copytree(teacher_cache / "teachers", workdir / "cache" / "teachers")
    monkeypatch.setenv("KDPIPE_CACHE_DIR", str(workdir / "cache"))
    search = write_pipeline(workdir / "search.yaml", PIPELINES / "digits-search.yaml",
                            **{"data.augment": [{"random_crop": {"padding": 1}}, "hflip"]})
    # kd's space without logit_stand, under which the teacher runs online (its raw logits, not soft labels, count)
    result = cli("run", search, *sets(*FAST, *NO_GATES, "search.space={temperature: auto, alpha: auto}",
                                      "search.trials=3", "search.pruner=none", "distill.epochs=2"))
    assert result.exit_code == 0, result.stderr
    report = read_report(result.stdout)
    assert report["search"]["n_complete"] == 3
    assert report["search"]["teacher_view_passes"] == 1 and report["search"]["teacher_forward_passes"] == 0
    views = 2  # distill.teacher_views' default, auto: min(8, epochs); one pass over train × views, each scored once
    assert count_teacher_passes["view_rows"] == report["data"]["train"] * views
    assert count_teacher_passes["other"] == 0  # no trial ran the teacher online, nor over un-augmented data


@pytest.mark.slow
@pytest.mark.parametrize(("cache", "mode"), [("auto", "views"), ("off", "online")])
def test_the_report_says_how_the_teacher_ran(workdir, cache, mode):
    pipeline = write_pipeline(workdir / "p.yaml", **{"data.augment": [{"random_crop": {"padding": 1}}, "hflip"],
                                                     "distill.teacher_cache": cache})
    result = cli("run", pipeline, *sets(*FAST, *NO_GATES, "distill.epochs=2", "distill.teacher_views=2"))
    assert result.exit_code == 0, result.stderr
    distill = read_report(result.stdout)["distill"]
    assert distill["teacher_mode"] == mode
    assert distill["teacher"][0]["reason"] == ("distill.teacher_cache is off" if cache == "off" else
                                               "augmented inputs: the teacher's soft labels on recorded views, replayed")
