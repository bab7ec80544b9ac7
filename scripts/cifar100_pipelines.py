"""Write pipelines/cifar100/: one pipeline per (teacher → student pair, method) with the published CIFAR-100 recipe
(/work/shared/METHODS.md, "Recipe" and each method's section), from the one table below so the files cannot drift.

Usage: python scripts/cifar100_pipelines.py [--check | --table]   (--check: exit 1 when a file differs from what it
would write, or is missing or extra; nothing is written. --table: print the table of the files and the published
top-1 each should reach, as docs/how-to/port.md shows it)
"""

from __future__ import annotations

import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parent.parent / "pipelines" / "cifar100"
EPOCHS, MILESTONES = 240, [150, 180, 210]  # RepDistiller train_student.py, mdistiller configs, CTKD script
CIFAR100_NORMALIZATION = {"mean": [0.5071, 0.4867, 0.4408], "std": [0.2675, 0.2565, 0.2761]}
# MLKD's strong view: the weak view's crop and flip, then FixMatch RandAugment (2 ops) and Cutout up to half the side.
MLKD_STRONG_AUGMENT = "[{randaugment: {ops: 2}}, {cutout: {max_fraction: 0.5}}]"


@dataclass(frozen=True)
class Pair:
    teacher: str
    student: str
    lr: float  # 0.05; 0.01 for ShuffleNetV2 students
    teacher_top1: float  # RepDistiller's teacher and from-scratch student, CIFAR-100 top-1 (METHODS.md)
    student_top1: float


PAIRS = {
    "resnet32x4-resnet8x4": Pair("resnet32x4", "resnet8x4", 0.05, 79.42, 72.50),
    "wrn_40_2-wrn_16_2": Pair("wrn_40_2", "wrn_16_2", 0.05, 75.61, 73.26),
    "resnet56-resnet20": Pair("resnet56", "resnet20", 0.05, 72.34, 69.06),
    "vgg13-vgg8": Pair("vgg13", "vgg8", 0.05, 74.64, 70.36),
    "resnet32x4-shufflev2": Pair("resnet32x4", "shufflev2", 0.01, 79.42, 71.82),
}
PAIR_ORDER = list(PAIRS)


@dataclass(frozen=True)
class Recipe:
    """One method's published setting: its kdpipe method and params per pair, and where the training recipe
    differs from the common one."""

    method: str
    params: dict  # pair → params (a pair missing: its setting is unconfirmed, no file)
    source: str
    top1: dict = field(default_factory=dict)  # pair → published CIFAR-100 top-1 (METHODS.md's tables)
    note: str = ""
    epochs: dict = field(default_factory=dict)  # pair → epochs, where not 240
    lr: dict = field(default_factory=dict)  # pair → lr, where not the pair's
    optimizer: dict = field(default_factory=dict)  # other optimizer keys (nesterov, weight_decay, milestones)
    batch_size: int = 64


def every(params: dict) -> dict:
    return {pair: params for pair in PAIRS}


def per_pair(values: list, make) -> dict:
    return {pair: make(v) for pair, v in zip(PAIR_ORDER, values) if v is not None}


def top1(*values) -> dict:
    return {pair: v for pair, v in zip(PAIR_ORDER, values) if v is not None}


REPDISTILLER = "RepDistiller (train_student.py, README)"
KD_TOP1 = top1(73.33, 74.92, 70.66, 72.98, 74.45)
DKD_BETA = [8.0, 6.0, 2.0, 6.0, 8.0]
DKD_LS = [(9.0, 8.0, 2.0), (12.0, 2.0, 2.0), (18.0, 2.0, 3.0), (15.0, 2.0, 2.0), (9.0, 8.0, 2.0)]  # weight, beta, T
MLKD_LR = {"resnet32x4-shufflev2": 0.01}
MLKD_LR_REST = {pair: 0.025 for pair in PAIRS if pair not in MLKD_LR}

RECIPES = {
    "kd": Recipe("kd", every({"temperature": 4.0, "alpha": 0.9}), REPDISTILLER, KD_TOP1,
                 "RepDistiller's -r 0.1 -a 0.9: total 0.1·CE + 0.9·KD at T 4"),
    "fitnets": Recipe("fitnets", every({"stages": 1, "hint_weight": 100.0}), REPDISTILLER,
                      top1(73.50, None, None, None, None),
                      "RepDistiller trains the hint jointly (-r 1 -a 0 -b 100): stages 1, CE + 100·hint"),
    "at": Recipe("at", every({"weight": 2000.0}), REPDISTILLER, top1(73.44, None, None, None, None),
                 "weight 2000, not the paper's 1000: kdpipe adds (weight/2)·Σ at_loss (the paper's eq. 2), "
                 "RepDistiller adds 1000·Σ at_loss (-b 1000), whose results these are"),
    "sp": Recipe("sp", every({"weight": 3000.0}), REPDISTILLER, top1(72.94, None, None, None, None),
                 "RepDistiller's -b 3000"),
    "rkd": Recipe("rkd", every({"distance_weight": 25.0, "angle_weight": 50.0}), REPDISTILLER,
                  top1(71.90, None, None, None, None), "RepDistiller's -b 1 with its distance 25, angle 50"),
    "nst": Recipe("nst", every({"weight": 50.0}), REPDISTILLER, top1(73.30, 73.68, None, None, None),
                  "RepDistiller's -b 50"),
    "pkt": Recipe("pkt", every({"weight": 30000.0}), REPDISTILLER, note="RepDistiller's -b 30000"),
    "vid": Recipe("vid", every({"weight": 1.0}), REPDISTILLER, note="RepDistiller's -b 1"),
    "crd": Recipe("crd", every({"weight": 0.8, "temperature": 0.07, "negatives": 16384, "feat_dim": 128,
                                "kd_weight": 0.0}), REPDISTILLER, top1(75.51, 75.48, 71.16, 73.94, 75.65),
                  "RepDistiller's -r 1 -a 0 -b 0.8: CE + 0.8·CRD"),
    "crd+kd": Recipe("crd", every({"weight": 0.8, "temperature": 0.07, "negatives": 16384, "feat_dim": 128,
                                   "kd_weight": 1.0}), REPDISTILLER,
                     note="RepDistiller's -r 1 -a 1 -b 0.8: CE + KD + 0.8·CRD"),
    "ofd": Recipe("ofd", every({"weight": 1.0e-3}), "OFD's official CIFAR recipe (METHODS.md)",
                  note="OFD's own recipe: 200 epochs, batch 128, lr 0.1 Nesterov, ×0.1 after 100 and 150",
                  epochs=every(200), lr=every(0.1), optimizer={"nesterov": True, "milestones": [100, 150]},
                  batch_size=128),
    # dvlab's script has no vgg13→vgg8 weight (unconfirmed): no file for it.
    "reviewkd": Recipe("reviewkd", per_pair([5.0, 5.0, 0.6, None, 8.0],
                                             lambda w: {"weight": w, "warmup_epochs": 20}),
                       "dvlab ReviewKD (its CIFAR script)", top1(75.63, 76.12, 71.89, None, 77.78),
                       "ReviewKD's own code: batch 128, lr 0.1 (0.02 ShuffleNet), Nesterov",
                       lr={**every(0.1), "resnet32x4-shufflev2": 0.02}, optimizer={"nesterov": True},
                       batch_size=128),
    "dkd": Recipe("dkd", per_pair(DKD_BETA, lambda beta: {"alpha": 1.0, "beta": beta, "temperature": 4.0,
                                                          "warmup": 20, "ce_weight": 1.0}),
                  "mdistiller configs", top1(76.32, 76.23, 71.97, 74.68, 77.07)),
    "dist": Recipe("dist", every({"beta": 2.0, "gamma": 2.0, "temperature": 4.0}),
                   "DIST_KD (hunto/image_classification_sota)", top1(76.31, None, 71.75, None, 77.35),
                   "the reference's DIST(beta 1, gamma 1) × kd_loss_weight 2 at τ 4"),
    "ctkd": Recipe("ctkd", every({"ce_weight": 0.1, "kd_weight": 0.9}), "CTKD script",
                   top1(73.39, 75.45, 71.19, 73.52, 75.37), "total 0.1·CE + 0.9·KD(τ)"),
    "mlkd": Recipe("mlkd", every({"weight": 0.9, "masking": "reference"}), "MLKD (Jin-Ying repo)",
                   top1(77.08, 76.63, 72.19, 75.18, 78.44), "MLKD's recipe: lr 0.025 (0.01 ShuffleNet), "
                   "960 epochs for resnet32x4→shufflev2, milestones still 150/180/210",
                   epochs={"resnet32x4-shufflev2": 960}, lr={**MLKD_LR_REST, **MLKD_LR}),
    "kd+ls": Recipe("kd", per_pair([2.0, 2.0, 2.0, 3.0, 2.0], lambda t: {
        "temperature": 4.0, "weights": "separate", "ce_weight": 0.1, "kd_weight": 9.0, "logit_stand": True,
        "base_temperature": t}),
        "logit-standardization-KD", top1(76.62, 76.11, 71.43, 74.36, 75.56), "LS's 0.1·CE + 9·KD"),
    "dkd+ls": Recipe("dkd", per_pair(DKD_LS, lambda v: {
        "alpha": v[0], "beta": v[0] * v[1], "temperature": 4.0, "warmup": 20, "ce_weight": 1.0,
        "logit_stand": True, "base_temperature": v[2]}),
        "logit-standardization-KD", top1(77.01, 76.39, 72.32, 74.81, 77.37),
        "LS's kd_weight multiplies alpha and beta"),
    "ctkd+ls": Recipe("ctkd", every({"ce_weight": 0.1, "kd_weight": 9.0, "logit_stand": True}),
                      "logit-standardization-KD", top1(76.67, 76.08, 71.34, 74.47, 76.18),
                      "CTKD keeps its learned τ under LS"),
    "mlkd+ls": Recipe("mlkd", per_pair([9.0, 9.0, 9.0, 6.0, 6.0], lambda w: {
        "weight": w, "masking": "reference", "logit_stand": True, "base_temperature": 2.0}),
        "logit-standardization-KD", top1(78.28, 76.95, 72.33, 75.22, 78.76),
        "MLKD's recipe; the LS repo trains resnet32x4→resnet8x4 for 480 epochs",
        epochs={"resnet32x4-resnet8x4": 480, "resnet32x4-shufflev2": 960}, lr={**MLKD_LR_REST, **MLKD_LR}),
}


def slug(name: str) -> str:
    return name.replace("+", "_")


def flow(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 16, sort_keys=False)
    return text.strip().removesuffix("...").strip()  # a scalar's document ends with "..."


def block(mapping: dict, indent: int) -> list[str]:
    """`mapping` one key a line (nested values in flow style), indented by `indent` spaces."""
    return [f"{' ' * indent}{key}: {flow(value)}" for key, value in mapping.items()]


# The teachers' recipe: RepDistiller's train_teacher.py, the same for every teacher, so every file of one teacher
# (and batch size) shares its cache entry.
TEACHER_TRAIN = {"epochs": EPOCHS, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": False,
                                                 "weight_decay": 5.0e-4, "scheduler": "multistep",
                                                 "milestones": MILESTONES}}


def pipeline(name: str, recipe: Recipe, pair_name: str) -> str:
    pair = PAIRS[pair_name]
    epochs = recipe.epochs.get(pair_name, EPOCHS)
    optimizer = {"name": "sgd", "lr": recipe.lr.get(pair_name, pair.lr), "momentum": 0.9, "nesterov": False,
                 "weight_decay": 5.0e-4, "scheduler": "multistep", "milestones": MILESTONES, **recipe.optimizer}
    full_name = f"cifar100-{pair_name}-{slug(name)}".replace("_", "-")
    published = recipe.top1.get(pair_name)
    header = [
        f"{name} on CIFAR-100, {pair.teacher} → {pair.student}: the published recipe, written by",
        "scripts/cifar100_pipelines.py (edit its table, not this file).",
        f"Setting: {recipe.source}" + (f"; {recipe.note}" if recipe.note else "") + ".",
        f"Published top-1: {published if published is not None else 'not reported in METHODS.md'} "
        f"(teacher {pair.teacher_top1}, student from scratch {pair.student_top1}).",
        "Data: the CIFAR-100 python archive, extracted (cifar-100-python/ in data/ beside this file, or",
        "--set data.path=DIR). 10% of the training set is held out for validation (the references train on",
        "all 50000 and keep the best test epoch). teacher_cache off: the teacher sees every fresh augmentation,",
        "as in the references.",
        f"Teacher: trained here with RepDistiller's teacher recipe (batch {recipe.batch_size}; cached, shared by "
        "every file of",
        "this teacher and batch size). To use a trained one: --set teacher.checkpoint=PATH, a state dict of",
        f"kdpipe's {pair.teacher} for 100 classes (a previous run's teacher is in KDPIPE_CACHE_DIR/teachers/).",
    ]
    lines = [f"# {line}" for text in header for line in textwrap.wrap(text, 110)] + [
        f"name: {full_name}",
        "seed: 0",
        "data:",
        "  source: cifar",
        "  path: data",
        "  val_fraction: 0.1",
        f"  batch_size: {recipe.batch_size}",
        f"  normalize: {flow(CIFAR100_NORMALIZATION)}",
        "  augment: [{random_crop: {padding: 4}}, hflip]",
        *([f"  strong_augment: {MLKD_STRONG_AUGMENT}"] if recipe.method == "mlkd" else []),
        "teacher:",
        f"  model: {{arch: {pair.teacher}}}",
        "  checkpoint: null",
        "  train:",
        f"    epochs: {TEACHER_TRAIN['epochs']}",
        "    optimizer:",
        *block(TEACHER_TRAIN["optimizer"], 6),
        "student:",
        f"  model: {{arch: {pair.student}}}",
        "distill:",
        f"  method: {recipe.method}",
        "  params:",
        *block(recipe.params[pair_name], 4),
        f"  epochs: {epochs}",
        "  optimizer:",
        *block(optimizer, 4),
        "  teacher_cache: 'off'",
        "  device: auto",
        "export: {opset: 18, dynamic_batch: true}",
        "validate:",
        "  batch_sizes: [1, 64]",
        "  # at least the student trained from scratch, less a point",
        f"  gates: {{accuracy_min: {round(pair.student_top1 / 100 - 0.01, 4)}}}",
        f"register: {{model_name: {full_name}-student, alias: champion}}",
    ]
    return "\n".join(lines) + "\n"


def files() -> dict[str, str]:
    """File name → content, for every (pair, method) with a published setting."""
    return {f"{pair}-{slug(name)}.yaml": pipeline(name, recipe, pair)
            for name, recipe in RECIPES.items() for pair in PAIRS if pair in recipe.params}


def table() -> str:
    """Markdown: a row per recipe, a column per pair; the published top-1 where METHODS.md gives one, "file" where
    the file is written without a published number, "—" where the setting is unconfirmed (no file)."""
    head = ["recipe (file suffix)", *(f"{PAIRS[p].teacher} → {PAIRS[p].student}" for p in PAIR_ORDER)]
    rows = [["teacher", *(f"{PAIRS[p].teacher_top1:.2f}" for p in PAIR_ORDER)],
            ["student from scratch (`none`)", *(f"{PAIRS[p].student_top1:.2f}" for p in PAIR_ORDER)]]
    for name, recipe in RECIPES.items():
        cells = [f"{recipe.top1[p]:.2f}" if p in recipe.top1 else "file" if p in recipe.params else "—"
                 for p in PAIR_ORDER]
        rows.append([f"{name} (`-{slug(name)}`)", *cells])
    return "\n".join("| " + " | ".join(row) + " |" for row in [head, ["---"] * len(head), *rows])


def main(argv: list[str]) -> int:
    if "--table" in argv:
        print(table())
        return 0
    wanted = files()
    if "--check" in argv:
        have = {p.name for p in OUT.glob("*.yaml")}
        stale = sorted(n for n, text in wanted.items() if not (OUT / n).is_file() or (OUT / n).read_text() != text)
        extra = sorted(have - set(wanted))
        for n in stale + extra:
            print(f"{OUT / n}: {'not written by' if n in extra else 'differs from'} scripts/cifar100_pipelines.py")
        return 1 if stale or extra else 0
    OUT.mkdir(parents=True, exist_ok=True)
    for stale in set(p.name for p in OUT.glob("*.yaml")) - set(wanted):
        (OUT / stale).unlink()
    for name, text in wanted.items():
        (OUT / name).write_text(text)
    print(f"{len(wanted)} pipelines in {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
