"""The frozen teacher's full pass over the training split (teacher outputs, teacher views) picks its batch by
measurement on CPU: its first chunks try each size in CPU_PASS_BATCHES twice (those that keep the probe within a
third of the pass), and the rest run at the size that cost least per row (issue 25). Every chunk is a real part of the pass. Views are sized to the run (teacher_views:
auto), and the report says what the pass cost, at which batch, and from which epoch it pays off."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import FAST, PIPELINES, cli, read_report, sets, write_pipeline
from torch import nn

from kdpipe.config import AUTO_TEACHER_VIEWS
from kdpipe.pipeline import load_pipeline
from kdpipe.teacher_cache import CPU_PASS_BATCHES, PROBE_SHARE, ProbedBatches, TeacherOutputCache, full_pass

PROBE = [size for size in CPU_PASS_BATCHES for _ in range(2)]  # the chunks the probe runs, in order


class CheapAt(nn.Module):
    """A linear classifier whose forward costs `per_row` seconds per row, `cheap_per_row` at batch size `cheap`, and
    records each forward's batch size. The cheap chunk still sleeps milliseconds, so that a busy machine's
    scheduling delays stay small against it."""

    def __init__(self, features: int, classes: int, cheap: int, per_row: float = 1e-3, cheap_per_row: float = 1e-4):
        super().__init__()
        self.linear = nn.Linear(features, classes)
        self.cheap, self.per_row, self.cheap_per_row = cheap, per_row, cheap_per_row
        self.seen: list[int] = []

    def forward(self, x):
        self.seen.append(len(x))
        time.sleep(len(x) * (self.cheap_per_row if len(x) == self.cheap else self.per_row))
        return self.linear(x.flatten(1))


@pytest.mark.parametrize("cheap", [64, 128, 512])
def test_the_pass_runs_at_the_batch_that_cost_least_per_row(cheap):
    teacher = CheapAt(4, 3, cheap)
    rows = 6000

    def forward(sizes):
        return torch.cat([teacher(torch.zeros(size, 4)) for size in sizes])

    out, done = full_pass(rows, torch.device("cpu"), forward)
    assert out.shape == (rows, 3)
    assert teacher.seen[:len(PROBE)] == PROBE
    rest = rows - sum(PROBE)
    assert teacher.seen[len(PROBE):] == [cheap] * (rest // cheap) + ([rest % cheap] if rest % cheap else [])
    assert done.batch == cheap and done.rows == rows
    assert min(done.probed, key=done.probed.get) == cheap
    assert done.probed[cheap] < 0.5 * min(v for b, v in done.probed.items() if b != cheap)


def probed_within_share(rows: int) -> list[int]:
    """The sizes a probe over `rows` rows tries: in order, while their two chunks each stay within PROBE_SHARE of
    the rows (the first always)."""
    sizes, spent = [], 0
    for size in CPU_PASS_BATCHES:
        if sizes and spent + 2 * size > PROBE_SHARE * rows:
            break
        sizes.append(size)
        spent += 2 * size
    return sizes


def test_probe_chunks_are_real_rows_in_order_and_a_short_pass_ends_within_the_probe():
    assert list(ProbedBatches(40)) == [32, 8]  # ends within the probe
    assert list(ProbedBatches(100)) == [32, 32, 32, 4]  # a probe of 64 would take over a third of the pass
    sizes = ProbedBatches(3 * sum(PROBE) + 1)
    assert list(sizes)[:len(PROBE)] == PROBE and sizes.batch in CPU_PASS_BATCHES
    assert set(sizes.seconds_per_row) == set(CPU_PASS_BATCHES)


def test_a_short_pass_spends_at_most_a_third_of_its_rows_probing():
    """A 4-epoch run's views of 640 images: the whole probe (1984 rows, most at 256 and 512, which cost more per row
    than the training batch on CPU) was 77% of the pass; now 32, 64 and 128 are tried, 448 rows."""
    sizes = ProbedBatches(2560)
    chunks = list(sizes)
    assert sum(chunks) == 2560
    assert set(sizes.seconds_per_row) == {32, 64, 128} == set(probed_within_share(2560))
    assert chunks[:6] == [32, 32, 64, 64, 128, 128] and sum(chunks[:6]) <= 2560 / 3
    assert set(chunks[6:-1]) == {sizes.batch}  # the rest at the chosen size, the last chunk what is left


def test_teacher_outputs_over_the_training_split_come_from_the_probed_chunks_in_row_order(digits):
    teacher = CheapAt(64, digits.num_classes, cheap=0, per_row=0.0)
    cache = TeacherOutputCache()
    outputs = cache.get(teacher, digits, [])
    rows = len(digits.y_train)
    probe = [size for size in probed_within_share(rows) for _ in range(2)]  # then the rest at the chosen size
    assert teacher.seen[:len(probe)] == probe and sum(teacher.seen) == rows
    assert set(teacher.seen[len(probe):-1]) <= {cache.last_pass.batch}
    assert torch.allclose(outputs.logits, teacher.linear(digits.to_input(digits.x_train).flatten(1)), atol=1e-6)
    assert cache.last_pass.rows == len(digits.y_train)
    cache.get(teacher, digits, [])
    assert cache.last_pass is None  # found in memory: no pass


@pytest.mark.parametrize(("epochs", "setting", "views"), [(2, "auto", 2), (30, "auto", AUTO_TEACHER_VIEWS),
                                                         (0, "auto", 1), (2, 5, 5)])
def test_auto_views_are_as_many_as_the_epochs_up_to_eight(epochs, setting, views):
    pipeline = load_pipeline(PIPELINES / "digits.yaml")
    distill = pipeline.distill.model_copy(update={"epochs": epochs, "teacher_views": setting})
    assert distill.views_per_image == views


@pytest.mark.slow  # two runs
def test_the_report_gives_the_view_pass_batch_its_cost_per_view_and_its_break_even(workdir):
    pipeline = write_pipeline(workdir / "p.yaml", **{"data.augment": [{"random_crop": {"padding": 1}}, "hflip"]})
    result = cli("run", pipeline, "--until", "distill", *sets(*FAST, "distill.epochs=3"))
    assert result.exit_code == 0, result.stderr
    report = read_report(result.stdout)
    (views,) = [t for t in report["distill"]["teacher"] if t["mode"] == "views"]
    done = views["teacher_pass"]
    assert views["found_in_cache"] is False
    assert views["views"] == 3  # auto: one per epoch
    assert done["rows"] == report["data"]["train"] * 3
    # digits.yaml trains at batch 64, a probed size: break-even = views × (pass cost per view) / (cost per row at 64)
    assert views["break_even_epochs"] == pytest.approx(3 * done["ms_per_row"] / done["probed_ms_per_row"]["64"],
                                                       rel=0.01, abs=0.006)  # the report rounds it to 0.01
    assert done["batch"] in CPU_PASS_BATCHES
    assert set(done["probed_ms_per_row"]) == {str(b) for b in probed_within_share(done["rows"])}
    assert done["ms_per_row"] == pytest.approx(done["seconds"] / done["rows"] * 1e3, rel=1e-3, abs=1e-4)
    rerun = read_report(cli("run", pipeline, "--until", "distill", *sets(*FAST, "distill.epochs=3")).stdout)
    (again,) = [t for t in rerun["distill"]["teacher"] if t["mode"] == "views"]
    assert again["found_in_cache"] is True and again["teacher_pass"] is None and again["break_even_epochs"] is None
