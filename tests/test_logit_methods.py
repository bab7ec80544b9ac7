"""The logit methods of issue 20: `dkd`, `dist`, `ctkd` and the logit standardization switch (also on `kd`).

Losses against the hand-written float64 references of tests/reference_losses.py (rel 1e-5, fp32, random inputs),
METHODS.md's checkable facts 8–11, DKD's warm-up, CTKD's adversarial temperature and where θ lives, LS under a
search and under augmented data, and bad settings (exit 2, one line).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx.numpy_helper
import optuna
import pytest
import torch
import torch.nn.functional as F

import reference_losses as ref
from conftest import PIPELINES, cli, sets
from kdpipe.config import ModelConfig, OptimizerConfig
from kdpipe.data import load_data
from kdpipe.data.sources import data_config
from kdpipe.losses import dist_loss, dkd_loss, grad_reverse, kd_loss, standardize_logits
from kdpipe.config_base import search_space
from kdpipe.methods import get_method
from kdpipe.models import build_model
from kdpipe.onnx_export import export_onnx
from kdpipe.search.space import _draw_all
from kdpipe.taps import Outputs
from kdpipe.teacher_cache import TeacherOutputCache
from kdpipe.train import Batch, Trainer, TrainerSettings, save_method

REL = 1e-5
CLASSES = 10


def logits(n: int = 8, c: int = CLASSES, seed: int = 0, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, c, generator=g), scale * torch.randn(n, c, generator=g)


def labels(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, CLASSES, (n,), generator=torch.Generator().manual_seed(seed + 1))


def build(name: str, **params):
    cls = get_method(name)
    torch.manual_seed(0)
    student = build_model(ModelConfig(arch="cnn", width=4, depth=2), "student", (1, 8, 8), CLASSES)
    teacher = build_model(ModelConfig(arch="cnn", width=8, depth=2), "teacher", (1, 8, 8), CLASSES)
    return cls(cls.Params(**params), student=student, teacher=teacher, num_classes=CLASSES, input_shape=(1, 8, 8))


def method_loss(method, z_s: torch.Tensor, z_t: torch.Tensor, y: torch.Tensor):
    batch = Batch(torch.arange(len(y)), torch.zeros(len(y), 1, 8, 8), y)
    return method.loss(batch, Outputs(z_s), Outputs(z_t))


# --- losses against the references -------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha, beta, temperature", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (2.0, 0.5, 7.0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_dkd_loss_matches_the_reference(alpha, beta, temperature, seed):
    z_s, z_t = logits(seed=seed)
    y = labels(seed=seed)
    expected = ref.dkd_loss(z_s.numpy(), z_t.numpy(), y.numpy(), alpha, beta, temperature)
    got = dkd_loss(z_s, z_t, y, alpha=alpha, beta=beta, temperature=temperature)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(expected, rel=REL)


def test_dkd_loss_stays_finite_where_the_target_takes_all_the_mass():
    """p_g = 1 in fp32: log(1 − p_g) from the sum of probabilities is log 0; from log-sum-exp it is finite."""
    z_s, z_t = logits()
    y = labels()
    z_s = z_s.scatter(1, y[:, None], 200.0).requires_grad_()
    z_t = z_t.scatter(1, y[:, None], 200.0)
    loss = dkd_loss(z_s, z_t, y, temperature=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z_s.grad).all()
    half = dkd_loss(z_s.detach().half(), z_t.half(), y, temperature=1.0)
    assert torch.isfinite(half)


def test_dist_loss_matches_the_reference_and_reshapes_dense_outputs():
    z_s, z_t = logits(n=12)
    for beta, gamma, temperature in [(2.0, 2.0, 4.0), (0.5, 3.0, 1.0)]:
        expected = ref.dist_loss(z_s.numpy(), z_t.numpy(), beta, gamma, temperature)
        got = dist_loss(z_s, z_t, beta=beta, gamma=gamma, temperature=temperature)
        assert got.item() == pytest.approx(expected, rel=REL)
    # N×C×H×W: every position is a row, (N·H·W)×C.
    dense_s, dense_t = z_s.view(3, 2, 2, CLASSES).permute(0, 3, 1, 2), z_t.view(3, 2, 2, CLASSES).permute(0, 3, 1, 2)
    assert dist_loss(dense_s, dense_t).item() == pytest.approx(ref.dist_loss(z_s.numpy(), z_t.numpy()), rel=REL)


def test_dist_loss_refuses_a_single_sample():
    z_s, z_t = logits(n=1)
    with pytest.raises(ValueError, match="at least 2 samples"):
        dist_loss(z_s, z_t)


def test_standardize_logits_matches_the_reference():
    z, _ = logits()
    assert np.allclose(standardize_logits(z).numpy(), ref.standardize_logits(z.numpy()), rtol=REL, atol=1e-6)


# --- METHODS.md's checkable facts 8–11 ----------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_fact_8_kd_is_tckd_plus_weighted_nckd_per_sample(temperature):
    z_s, z_t = logits()
    y = labels()
    p_t_target = F.softmax(z_t / temperature, dim=1).gather(1, y[:, None]).squeeze(1)
    for n in range(len(y)):
        row = slice(n, n + 1)
        kd = kd_loss(z_s[row], z_t[row], temperature=temperature)
        dkd = dkd_loss(z_s[row], z_t[row], y[row], alpha=1.0, beta=1.0 - p_t_target[n].item(), temperature=temperature)
        assert dkd.item() == pytest.approx(kd.item(), rel=1e-4)


def test_fact_8_nckd_has_no_gradient_at_the_target_logit():
    z_s, z_t = logits()
    y = labels()
    z_s.requires_grad_()
    dkd_loss(z_s, z_t, y, alpha=0.0, beta=1.0).backward()
    assert torch.all(z_s.grad.gather(1, y[:, None]) == 0)
    assert z_s.grad.abs().sum() > 0


def test_fact_9_dist_is_zero_for_per_row_shifts_and_its_terms_lie_in_0_2():
    z_s, z_t = logits()
    shifted = z_t + torch.randn(len(z_t), 1) * 5
    assert dist_loss(shifted, z_t).item() == pytest.approx(0.0, abs=1e-3)  # the 1e-8 of ρ's denominator, no more
    for z_s_case in (z_s, -z_t, z_t):
        temperature = 2.0
        inter = dist_loss(z_s_case, z_t, beta=1.0, gamma=0.0, temperature=temperature).item() / temperature**2
        intra = dist_loss(z_s_case, z_t, beta=0.0, gamma=1.0, temperature=temperature).item() / temperature**2
        assert 0.0 <= inter + 1e-6 and inter <= 2.0 and 0.0 <= intra + 1e-6 and intra <= 2.0
        assert (inter, intra) == pytest.approx(ref.dist_inter_intra(z_s_case.numpy(), z_t.numpy(), temperature),
                                               rel=1e-4, abs=1e-6)
    inter_opposed = dist_loss(-z_t, z_t, beta=1.0, gamma=0.0, temperature=1.0).item()
    assert inter_opposed > 1.0  # anti-correlated rows: inter beyond 1, toward 2


def test_fact_10_standardization_is_invariant_to_affine_maps_and_a_constant_row_gives_zero():
    z, _ = logits()
    scale, shift = torch.rand(len(z), 1) * 5 + 0.1, torch.randn(len(z), 1) * 10
    assert torch.allclose(standardize_logits(scale * z + shift), standardize_logits(z), atol=1e-5)
    constant = torch.full((2, CLASSES), 3.5)
    assert torch.equal(standardize_logits(constant), torch.zeros(2, CLASSES))


def test_fact_11_grad_reverse_is_the_identity_forward_and_negates_the_gradient_times_lambda():
    x = torch.randn(5, requires_grad=True)
    upstream = torch.randn(5)
    y = grad_reverse(x, 0.3)
    assert torch.equal(y, x.detach())
    y.backward(upstream)
    assert torch.allclose(x.grad, -0.3 * upstream)


# --- DKD ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("epoch, weight", [(1, 1 / 20), (10, 0.5), (20, 1.0), (25, 1.0)])
def test_dkd_warmup_weighs_epoch_1_by_one_twentieth_and_from_epoch_20_fully(epoch, weight):
    method = build("dkd")
    method.start_epoch(epoch)
    z_s, z_t = logits()
    y = labels()
    total, parts = method_loss(method, z_s, z_t, y)
    dkd = ref.dkd_loss(z_s.numpy(), z_t.numpy(), y.numpy(), 1.0, 8.0, 4.0)
    assert parts["dkd"].item() == pytest.approx(dkd, rel=REL)
    assert total.item() == pytest.approx(F.cross_entropy(z_s, y).item() + weight * dkd, rel=REL)


# --- logit standardization ----------------------------------------------------------------------------------------

def test_kd_default_loss_is_unchanged():
    z_s, z_t = logits()
    y = labels()
    total, _ = method_loss(build("kd"), z_s, z_t, y)
    expected = 0.1 * F.cross_entropy(z_s, y).item() + 0.9 * ref.kd_loss(z_s.numpy(), z_t.numpy(), 4.0)
    assert total.item() == pytest.approx(expected, rel=REL)


def test_logit_stand_on_kd_is_kd_of_standardized_logits_at_base_temperature_with_separate_weights():
    """LS's KD recipe: CE 0.1 on the raw logits + 9 · KD of the standardized logits at T = 2."""
    z_s, z_t = logits()
    y = labels()
    method = build("kd", logit_stand=True, base_temperature=2.0, weights="separate", ce_weight=0.1, kd_weight=9.0)
    total, parts = method_loss(method, z_s, z_t, y)
    kd = ref.kd_loss(ref.standardize_logits(z_s.numpy()), ref.standardize_logits(z_t.numpy()), 2.0)
    assert parts["kd"].item() == pytest.approx(kd, rel=REL)
    assert total.item() == pytest.approx(0.1 * F.cross_entropy(z_s, y).item() + 9.0 * kd, rel=REL)
    # temperature is LS's base_temperature's to replace: changing it changes nothing.
    other = build("kd", logit_stand=True, base_temperature=2.0, temperature=9.0, weights="separate")
    assert method_loss(other, z_s, z_t, y)[0].item() == pytest.approx(total.item(), rel=REL)


def test_logit_stand_on_dkd_and_dist_reads_standardized_logits():
    z_s, z_t = logits()
    y = labels()
    std_s, std_t = ref.standardize_logits(z_s.numpy()), ref.standardize_logits(z_t.numpy())
    dkd = build("dkd", logit_stand=True, base_temperature=3.0, alpha=9.0, beta=72.0)
    dkd.start_epoch(30)
    _, parts = method_loss(dkd, z_s, z_t, y)
    assert parts["dkd"].item() == pytest.approx(ref.dkd_loss(std_s, std_t, y.numpy(), 9.0, 72.0, 3.0), rel=REL)
    _, parts = method_loss(build("dist", logit_stand=True, base_temperature=2.0), z_s, z_t, y)
    assert parts["dist"].item() == pytest.approx(ref.dist_loss(std_s, std_t, 2.0, 2.0, 2.0), rel=REL)


@pytest.mark.parametrize("name", ["kd", "dkd", "dist"])
def test_a_search_draws_base_temperature_only_when_logit_stand_is_true_and_temperature_only_when_false(name):
    params = get_method(name).Params
    dims = search_space(params)
    assert "base_temperature" in dims and "logit_stand" in dims
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(16):
        trial = study.ask()
        drawn = _draw_all(trial, params, dims, params().model_dump(), lambda n: n)
        assert ("base_temperature" in drawn) == drawn["logit_stand"]
        assert ("temperature" in drawn) != drawn["logit_stand"]  # LS's base_temperature replaces it
        seen.add(drawn["logit_stand"])
        study.tell(trial, 0.0)
    assert seen == {False, True}


def test_kd_weights_alpha_or_separate_are_drawn_by_a_search_under_their_switch():
    params = get_method("kd").Params
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(12):
        trial = study.ask()
        drawn = _draw_all(trial, params, search_space(params), params().model_dump(), lambda n: n)
        assert ("alpha" in drawn) == (drawn["weights"] == "alpha")
        assert ("ce_weight" in drawn) == ("kd_weight" in drawn) == (drawn["weights"] == "separate")
        study.tell(trial, 0.0)


@pytest.fixture(scope="module")
def augmented(tmp_path_factory):
    path = tmp_path_factory.mktemp("ls-views") / "images.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 256, (60, 3, 16, 16), dtype=np.uint8), y=np.arange(60) % CLASSES)
    return load_data(data_config(source="npz", path=path, augment=["hflip"], val_fraction=0.2, test_fraction=0.2,
                                 normalize={"mean": [0.5] * 3, "std": [0.25] * 3}), seed=0)


@pytest.mark.parametrize("name", ["kd", "dkd", "dist", "ctkd"])
@pytest.mark.parametrize("logit_stand, mode", [(False, "views"), (True, "online")])
def test_logit_stand_on_augmented_data_runs_the_teacher_online(augmented, name, logit_stand, mode):
    """The logit methods read the teacher through softmax(z / T) alone, so augmented data replays teacher views;
    but views keep top-k log-probabilities, whose standardization is not the logits': under LS the method reads
    the online teacher's raw logits, and the trainer records why (report.json's distill.teacher)."""
    kd = get_method(name)
    torch.manual_seed(0)
    student = build_model(ModelConfig(arch="cnn", width=4, depth=2), "student", augmented.input_shape, CLASSES)
    teacher = build_model(ModelConfig(arch="cnn", width=8, depth=2), "teacher", augmented.input_shape, CLASSES)
    method = kd(kd.Params(logit_stand=logit_stand), student=student, teacher=teacher, num_classes=CLASSES,
                input_shape=augmented.input_shape)
    trainer = Trainer(augmented, epochs=1, batch_size=16, optimizer=OptimizerConfig(), seed=0,
                      settings=TrainerSettings(teacher_views=2))
    method.student_update(trainer, "student")
    assert trainer.teacher_modes[-1]["mode"] == mode
    if logit_stand:
        assert "raw logits" in trainer.teacher_modes[-1]["reason"]
    assert kd.reads_teacher_soft_labels(method.params) is not logit_stand


# --- CTKD ---------------------------------------------------------------------------------------------------------

def ctkd_step(lambda_max: float, loss: str = "kd"):
    """One SGD step of θ alone on CTKD's loss at an epoch where λ = lambda_max, the logits fixed: the distillation
    term before and after, at the old and the new τ, and θ's gradient."""
    method = build("ctkd", lambda_max=lambda_max, loss=loss)
    method.start_epoch(method.params.curriculum_epochs)
    optimizer = torch.optim.SGD(method.temperature.parameters(), lr=0.5)
    z_s, z_t = logits()
    y = labels()
    total, parts = method_loss(method, z_s, z_t, y)
    total.backward()
    grad = method.temperature.theta.grad.clone()
    optimizer.step()
    _, after = method_loss(method, z_s, z_t, y)
    return parts, after, grad


@pytest.mark.parametrize("loss", ["kd", "dkd"])
def test_ctkd_temperature_moves_against_the_loss(loss):
    before, after, grad = ctkd_step(1.0, loss)
    assert grad.item() != 0.0
    assert after["temperature"].item() != before["temperature"].item()
    assert after[loss].item() > before[loss].item()


def test_ctkd_with_lambda_zero_gives_theta_no_gradient():
    before, after, grad = ctkd_step(0.0)
    assert grad.item() == 0.0
    assert after["temperature"].item() == before["temperature"].item()


def test_ctkd_tau_starts_near_15_6_and_replaces_t_in_kd_loss():
    method = build("ctkd")
    method.start_epoch(1)
    z_s, z_t = logits()
    y = labels()
    total, parts = method_loss(method, z_s, z_t, y)
    tau = 1.0 + 20.0 / (1.0 + np.exp(-1.0))
    assert parts["temperature"].item() == pytest.approx(tau, rel=REL)
    kd = ref.kd_loss(z_s.numpy(), z_t.numpy(), tau)
    assert total.item() == pytest.approx(0.1 * F.cross_entropy(z_s, y).item() + 0.9 * kd, rel=REL)


@pytest.mark.parametrize("epoch, lam", [(0, 0.0), (5, 0.5), (10, 1.0), (30, 1.0)])
def test_ctkd_lambda_follows_the_cosine_curriculum(epoch, lam):
    from kdpipe.methods.ctkd import curriculum_lambda

    assert curriculum_lambda(epoch, 0.0, 1.0, 10) == pytest.approx(lam, abs=1e-12)


@pytest.mark.slow
def test_ctkd_theta_is_in_the_checkpoints_and_not_in_the_onnx_graph(tmp_path):
    digits = load_data(data_config(), 0)
    small = dataclasses.replace(digits, x_train=digits.x_train[:128], y_train=digits.y_train[:128])
    cls = get_method("ctkd")
    torch.manual_seed(0)
    student = build_model(ModelConfig(arch="cnn", width=4, depth=2), "student", digits.input_shape, CLASSES)
    teacher = build_model(ModelConfig(arch="cnn", width=8, depth=2), "teacher", digits.input_shape, CLASSES)
    method = cls(cls.Params(), student=student, teacher=teacher, num_classes=CLASSES, input_shape=digits.input_shape)
    trainer = Trainer(small, epochs=1, batch_size=32, optimizer=OptimizerConfig(lr=0.05, momentum=0.9),
                      seed=0, settings=TrainerSettings(checkpoint_dir=tmp_path / "phases"))
    method.fit(trainer)
    theta = method.temperature.theta.detach().clone()
    assert theta.item() != 1.0  # trained by the student's optimizer
    phase = torch.load(next((tmp_path / "phases").glob("*.pt")), weights_only=False)
    assert any(torch.equal(state.get("theta", torch.empty(0)), theta) for state in phase["modules"])  # its module
    save_method(method, tmp_path / "method.pt")
    saved = torch.load(tmp_path / "method.pt", weights_only=True)
    assert torch.equal(saved["state"]["temperature.theta"], theta) and "temperature.theta" not in saved["student"]

    export_onnx(method.exported(), torch.zeros(1, *digits.input_shape), tmp_path / "student.onnx", 18, True)
    graph = onnx.load(str(tmp_path / "student.onnx")).graph
    names = [i.name for i in graph.initializer]
    assert not any("theta" in n or "temperature" in n for n in names)
    scalars = [onnx.numpy_helper.to_array(i) for i in graph.initializer if int(np.prod(i.dims)) == 1]
    assert not any(np.isclose(float(v.reshape(-1)[0]), theta.item(), rtol=1e-7) for v in scalars)


# --- bad settings -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("file, overrides, key", [
    ("dist.yaml", ["data.batch_size=1"], "data.batch_size"),
    ("digits.yaml", ["distill.params.weights=separate", "distill.params.alpha=0.5"], "distill.params.alpha"),
    ("digits.yaml", ["distill.params.kd_weight=3"], "distill.params.kd_weight"),
    ("dkd.yaml", ["distill.params.warmup=0"], "distill.params.warmup"),
    ("ctkd.yaml", ["distill.params.loss=mse"], "distill.params.loss"),
    ("ctkd.yaml", ["distill.params.base_temperature=2"], "distill.params.base_temperature"),
    ("dkd.yaml", ["distill.params.temperature=0"], "distill.params.temperature"),
    ("ctkd.yaml", ["distill.params.lambda_min=0.5", "distill.params.lambda_max=0.2"], "distill.params.lambda_max"),
])
def test_bad_settings_exit_2_with_one_line(workdir, file, overrides, key):
    pipeline = PIPELINES / file
    result = cli("check", pipeline, *sets(*overrides))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{pipeline}: {key}"), lines


@pytest.mark.parametrize("name, part", [("dkd", "dkd"), ("dist", "dist"), ("ctkd", "kd")])
def test_views_keeping_every_class_give_the_online_teachers_loss(augmented, name, part):
    """teacher_soft_labels holds for dkd, dist and ctkd: log p̂ in place of the logits gives the same loss."""
    cls = get_method(name)
    torch.manual_seed(0)
    student = build_model(ModelConfig(arch="cnn", width=4, depth=2), "student", augmented.input_shape, CLASSES)
    teacher = build_model(ModelConfig(arch="cnn", width=8, depth=2), "teacher", augmented.input_shape, CLASSES)
    student.eval()  # the same student outputs for both losses
    method = cls(cls.Params(), student=student, teacher=teacher, num_classes=CLASSES, input_shape=augmented.input_shape)
    method.start_epoch(30)
    losses = {}
    for options in ({"teacher_topk": CLASSES}, {"teacher_online": True}):
        trainer = Trainer(augmented, epochs=1, batch_size=16, optimizer=OptimizerConfig(), seed=0,
                          settings=TrainerSettings(teacher_views=2, teacher_cache=TeacherOutputCache(), **options))
        update = method.student_update(trainer, "student")
        if "teacher_topk" in options:
            batch = next(trainer.batches(torch.Generator().manual_seed(1)))
        losses[trainer.teacher_modes[-1]["mode"]] = update.loss(batch, {})[1][part].item()
    assert losses["views"] == pytest.approx(losses["online"], rel=2e-3) and losses["online"] > 1e-3


def test_kd_ls_recipe_checks_and_its_full_dump_checks_again(workdir, tmp_path):
    """The LS recipe on kd is a valid file; so is its dump with every default (a run record `--resume` checks)."""
    import yaml

    from kdpipe.pipeline import load_pipeline

    recipe = ["distill.params.logit_stand=true", "distill.params.base_temperature=2", "distill.params.weights=separate",
              "distill.params.ce_weight=0.1", "distill.params.kd_weight=9"]
    result = cli("check", PIPELINES / "digits.yaml", *sets(*recipe))
    assert result.exit_code == 0, result.output
    dumped = tmp_path / "pipeline.yaml"
    dumped.write_text(yaml.safe_dump(load_pipeline(PIPELINES / "digits.yaml", recipe).model_dump(mode="json")))
    assert load_pipeline(dumped, []).distill.params.kd_weight == 9.0


def test_a_search_records_the_weights_it_did_not_draw_at_their_defaults():
    """A file's alpha 0.5 under a drawn weights: separate would contradict itself in the run's record (checked again
    by --resume): the search puts a parameter whose condition fails back at its default."""
    from kdpipe.pipeline import load_pipeline
    from kdpipe.search import resolve_space

    pipeline = load_pipeline(PIPELINES / "digits.yaml", ["distill.params.alpha=0.5", "search={trials: 1}"])
    space = resolve_space(pipeline)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = set()
    for _ in range(12):
        trial = study.ask()
        choice = space.suggest(trial)
        assert space.decode(trial.params).params == choice.params
        drawn.add(choice.params["weights"])
        if choice.params["weights"] == "separate":
            assert choice.params["alpha"] == 0.9
        get_method("kd").check_pipeline(pipeline.with_method("kd", choice.params, choice.optimizer))
        study.tell(trial, 0.5)
    assert drawn == {"alpha", "separate"}
