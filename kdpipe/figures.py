"""The figures of report.html and compare.html, drawn from report.json's data by kdpipe.svg_plot and returned as
inline SVG (text stays text: a figure is a few kB, a heatmap's cells one PNG raster). No matplotlib: its import
alone took most of a second; the default pipeline's whole page now takes about a hundredth.
"""

from __future__ import annotations

from typing import Any

from kdpipe.svg_plot import CYCLE, Panel, figure

STUDENT, TEACHER = "#1f77b4", "#ff7f0e"  # the same colour for a model in every figure
CANDIDATES = {"fp32": "#1f77b4", "int8": "#2ca02c", "qat": "#9467bd", "teacher": "#ff7f0e"}
OTHERS = [c for c in CYCLE if c not in (STUDENT, TEACHER)]  # another network's (a DML peer's), in turn


def learning_curves(histories: dict[str, dict[str, list]]) -> str:
    """Training loss parts (left, log scale) and validation accuracy (right) per epoch; `histories`: a curve's name
    (teacher, student, a DML peer) → {"epoch": [...], metric: [...]} as report.json's histories hold them."""
    losses = Panel(title="training loss parts", xlabel="epoch", ylog=True)
    accuracy = Panel(title="validation accuracy", xlabel="epoch")
    others = iter(OTHERS * len(histories))
    for name, columns in histories.items():
        color = {"student": STUDENT, "teacher": TEACHER}.get(name) or next(others)
        epochs = columns["epoch"]
        parts = [k for k in columns if k.startswith("train_")]
        for dash, part in zip(["-", "--", ":", "-."] * len(parts), parts):
            losses.line(epochs, columns[part], color, f"{name} {part[6:]}", dash)
        if "val_accuracy" in columns:
            accuracy.line(epochs, columns["val_accuracy"], color, name, marker=".")
    return figure([losses, accuracy], 780, 280)


def confusion_matrices(matrices: dict[str, list[list[int]]], classes: list[str]) -> str:
    """One heatmap per model (rows: true class, columns: predicted), counts written in when the classes are few."""
    panels = []
    for name, matrix in matrices.items():
        panel = Panel(title=f"{name}: confusion matrix", xlabel="predicted class", ylabel="true class")
        panel.heatmap(matrix, classes if len(classes) <= 12 else None)
        panels.append(panel)
    return figure(panels, 390 * len(panels), 390)


def per_class_accuracy(accuracies: dict[str, list[float | None]], classes: list[str]) -> str:
    """Each model's test accuracy per class, side by side per class."""
    panel = Panel(title="test accuracy per class", xlabel="class", ylim=(0, 1.05), grid="y", legend="lower right",
                  xticks=list(enumerate(classes)) if len(classes) <= 30 else None)
    width = 0.8 / len(accuracies)
    for number, (name, values) in enumerate(accuracies.items()):
        offset = (number - (len(accuracies) - 1) / 2) * width
        panel.bars([c + offset for c in range(len(classes))], values, width, TEACHER if name == "teacher" else STUDENT,
                   name)
    return figure([panel], min(780, 200 + 48 * len(classes) * len(accuracies)), 260)


def latency(candidates: dict[str, dict[str, dict[str, float]]], gates: dict[str, dict[str, Any]]) -> str:
    """p50 (left) and p99 (right) latency per batch size of each model (`candidates`: name → report.json's
    latency_ms), the latency gates drawn on as red bars at their batch size (the legend says which failed)."""
    sizes = sorted({int(b) for by_size in candidates.values() for b in by_size})
    panels = []
    for stat in ("p50", "p99"):
        panel = Panel(title=f"{stat} latency", xlabel="batch size", ylabel="ms", xlog=True, ylog=True,
                      xticks=[(b, str(b)) for b in sizes])
        for name, by_size in candidates.items():
            ordered = sorted(by_size, key=int)
            panel.line([int(b) for b in ordered], [by_size[b][stat] for b in ordered], CANDIDATES.get(name, "#7f7f7f"),
                       name, "--" if name == "teacher" else "-", "o")
        for gate, found in gates.items():
            key, _, size = gate.partition(":bs")
            if key == f"latency_{stat}_ms_max" and size:
                panel.line([int(size)], [found["limit"]], "red", f"gate {found['limit']:g} ms at bs {size}"
                           + ("" if found["passed"] else " FAILED"), "", "_")
        panels.append(panel)
    return figure(panels, 780, 280)


def search_front(trials: list[dict], objective: list[str], front: list[dict] | None) -> str:
    """A single-objective campaign: each trial's value and the best so far; a Pareto search: every complete trial
    in the objectives' plane, the front drawn over them."""
    if front is None:
        numbers, values = [t["number"] for t in trials], [t["values"][0] for t in trials]
        best = [max(values[:i + 1]) for i in range(len(values))]  # val_accuracy is maximized
        panel = Panel(title="optimization history", xlabel="trial", ylabel=objective[0])
        panel.line(numbers, values, STUDENT, "trial", "", "o")
        panel.line(numbers, best, "red", "best so far")
    else:
        x, y = objective[0], objective[1]
        panel = Panel(title="Pareto front", xlabel=x, ylabel=y)
        panel.line([t["values"][0] for t in trials], [t["values"][1] for t in trials], "#bbbbbb", "trial", "", "o")
        on_front = sorted(front, key=lambda t: t["values"][x])
        panel.line([t["values"][x] for t in on_front], [t["values"][y] for t in on_front], "red", "Pareto front",
                   "-", "o")
    return figure([panel], 440, 300)


def importances(values: dict[str, float]) -> str:
    """The parameters' importances for val_accuracy (Optuna's fANOVA), largest on top."""
    names = sorted(values, key=values.get)
    panel = Panel(title="parameter importances (val_accuracy)", xlabel="importance", xlim=(0, None), grid="x")
    panel.hbars(names, [values[n] for n in names], STUDENT)
    return figure([panel], 440, 70 + 22 * len(names))
