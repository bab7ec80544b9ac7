"""The figures of report.html and compare.html, drawn with matplotlib (Agg, no pyplot) from report.json's data and
returned as inline SVG: text stays text (`svg.fonttype: none`), so a figure is a few kB to tens of kB, scales and
draws faster than a PNG of it (measured: about 0.08 s against 0.15 s for a confusion matrix).

matplotlib is imported inside the functions: `kdpipe --version` and `kdpipe check` never pay for it.
"""

from __future__ import annotations

import io
from typing import Any

STUDENT, TEACHER = "#1f77b4", "#ff7f0e"  # the same colour for a model in every figure
CANDIDATES = {"fp32": "#1f77b4", "int8": "#2ca02c", "qat": "#9467bd", "teacher": "#ff7f0e"}
STYLE = {"font.size": 8, "axes.titlesize": 9, "legend.fontsize": 7, "svg.fonttype": "none", "svg.hashsalt": None}


def _figure(width: float, height: float, columns: int = 1, left: float = 0.7):
    """A figure of `columns` axes side by side, margins fixed in inches (`left` for the y labels): a layout engine
    measures every tick label, twice the drawing time."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    figure.subplots_adjust(left=left / width, right=1 - 0.15 / width, bottom=0.5 / height, top=1 - 0.3 / height,
                           wspace=0.3)
    return figure, figure.subplots(1, columns, squeeze=False)[0]


def _log(axes, *which: str) -> None:
    """Log axes (`which`: "x", "y") ticked at their decades only: a log axis's minor ticks cost the figure most of
    its drawing time."""
    from matplotlib.ticker import NullLocator

    for name in which:
        getattr(axes, f"set_{name}scale")("log")
        getattr(axes, f"{name}axis").set_minor_locator(NullLocator())


def _svg(figure) -> str:
    """The figure as an <svg> element to inline (no XML declaration or DOCTYPE)."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context(STYLE):
        figure.savefig(buffer, format="svg")
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def learning_curves(histories: dict[str, dict[str, list]]) -> str:
    """Training loss parts (left) and validation accuracy (right) per epoch; `histories`: a curve's name (teacher,
    student, a DML peer) → {"epoch": [...], metric: [...]} as report.json's histories hold them."""
    import matplotlib

    with matplotlib.rc_context(STYLE):
        figure, (losses, accuracy) = _figure(8, 2.8, 2)
        for name, columns in histories.items():
            color = {"student": STUDENT, "teacher": TEACHER}.get(name)  # another network (a DML peer): its own
            epochs = columns["epoch"]
            parts = [k for k in columns if k.startswith("train_")]
            for style, part in zip(["-", "--", ":", "-."] * len(parts), parts):
                losses.plot(epochs, _floats(columns[part]), style, color=color, label=f"{name} {part[6:]}")
            if "val_accuracy" in columns:
                accuracy.plot(epochs, _floats(columns["val_accuracy"]), color=color, label=name, marker=".")
        losses.set(title="training loss parts", xlabel="epoch")
        _log(losses, "y")
        accuracy.set(title="validation accuracy", xlabel="epoch")
        for axes in (losses, accuracy):
            axes.grid(alpha=0.3)
            axes.legend()
        return _svg(figure)


def confusion_matrices(matrices: dict[str, list[list[int]]], classes: list[str]) -> str:
    """One heatmap per model (rows: true class, columns: predicted), counts written in when the classes are few."""
    import matplotlib
    import numpy as np

    many = len(classes) > 12
    with matplotlib.rc_context(STYLE):
        figure, panels = _figure(4 * len(matrices), 3.8, len(matrices))
        for axes, (name, matrix) in zip(panels, matrices.items()):
            counts = np.asarray(matrix)
            axes.imshow(counts, cmap="Blues")
            if not many:
                ticks = range(len(classes))
                axes.set(xticks=ticks, yticks=ticks, xticklabels=classes, yticklabels=classes)
                top = counts.max() or 1
                for (row, column), value in np.ndenumerate(counts):
                    if value:
                        axes.text(column, row, str(value), ha="center", va="center", fontsize=7,
                                  color="white" if value > top / 2 else "black")
            axes.set(title=f"{name}: confusion matrix", xlabel="predicted class", ylabel="true class")
        return _svg(figure)


def per_class_accuracy(accuracies: dict[str, list[float | None]], classes: list[str]) -> str:
    """Each model's test accuracy per class, side by side per class."""
    import matplotlib
    import numpy as np

    with matplotlib.rc_context(STYLE):
        figure, (axes,) = _figure(min(8.0, 2 + 0.5 * len(classes) * len(accuracies)), 2.6)
        width = 0.8 / len(accuracies)
        for number, (name, values) in enumerate(accuracies.items()):
            axes.bar(np.arange(len(classes)) + (number - (len(accuracies) - 1) / 2) * width, _floats(values), width,
                     label=name, color=TEACHER if name == "teacher" else STUDENT)
        if len(classes) <= 30:
            axes.set(xticks=range(len(classes)), xticklabels=classes)
        axes.set(title="test accuracy per class", xlabel="class", ylim=(0, 1.05))
        axes.grid(axis="y", alpha=0.3)
        axes.legend(loc="lower right")
        return _svg(figure)


def latency(candidates: dict[str, dict[str, dict[str, float]]], gates: dict[str, dict[str, Any]]) -> str:
    """p50 (left) and p99 (right) latency per batch size of each model (`candidates`: name → report.json's
    latency_ms), the latency gates drawn on as red bars at their batch size (the legend says which failed)."""
    import matplotlib

    with matplotlib.rc_context(STYLE):
        figure, panels = _figure(8, 2.8, 2)
        for axes, stat in zip(panels, ("p50", "p99")):
            for name, by_size in candidates.items():
                sizes = sorted(by_size, key=int)
                axes.plot([int(b) for b in sizes], [by_size[b][stat] for b in sizes], marker="o", label=name,
                          color=CANDIDATES.get(name), linestyle="--" if name == "teacher" else "-")
            for gate, found in gates.items():
                key, _, size = gate.partition(":bs")
                if key == f"latency_{stat}_ms_max" and size:
                    axes.plot([int(size)], [found["limit"]], marker="_", markersize=22, markeredgewidth=2,
                              color="red", linestyle="none",
                              label=f"gate {found['limit']:g} ms at bs {size}" + ("" if found["passed"] else " FAILED"))
            axes.set(title=f"{stat} latency", xlabel="batch size", ylabel="ms")
            _log(axes, "x", "y")
            sizes = sorted({int(b) for by_size in candidates.values() for b in by_size})
            axes.set_xticks(sizes, [str(b) for b in sizes])
            axes.grid(alpha=0.3)
            axes.legend()
        return _svg(figure)


def search_front(trials: list[dict], objective: list[str], front: list[dict] | None) -> str:
    """A single-objective campaign: each trial's value and the best so far; a Pareto search: every complete trial
    in the objectives' plane, the front drawn over them."""
    import matplotlib

    with matplotlib.rc_context(STYLE):
        figure, (axes,) = _figure(4.5, 3)
        if front is None:
            numbers, values = [t["number"] for t in trials], [t["values"][0] for t in trials]
            best = [max(values[:i + 1]) for i in range(len(values))]  # val_accuracy is maximized
            axes.plot(numbers, values, "o", color=STUDENT, label="trial")
            axes.plot(numbers, best, "-", color="red", label="best so far")
            axes.set(title="optimization history", xlabel="trial", ylabel=objective[0])
        else:
            x, y = objective[0], objective[1]
            axes.plot([t["values"][0] for t in trials], [t["values"][1] for t in trials], "o", color="#bbbbbb",
                      label="trial")
            on_front = sorted(front, key=lambda t: t["values"][x])
            axes.plot([t["values"][x] for t in on_front], [t["values"][y] for t in on_front], "o-", color="red",
                      label="Pareto front")
            axes.set(title="Pareto front", xlabel=x, ylabel=y)
        axes.grid(alpha=0.3)
        axes.legend()
        return _svg(figure)


def importances(values: dict[str, float]) -> str:
    """The parameters' importances for val_accuracy (Optuna's fANOVA), largest on top."""
    import matplotlib

    names = sorted(values, key=values.get)
    with matplotlib.rc_context(STYLE):
        figure, (axes,) = _figure(4.5, 0.6 + 0.25 * len(names))
        axes.barh(names, [values[n] for n in names], color=STUDENT)
        axes.set(title="parameter importances (val_accuracy)", xlabel="importance")
        axes.grid(axis="x", alpha=0.3)
        return _svg(figure)


def _floats(values: list) -> list[float]:
    """None (an epoch or class without a value) as NaN, which matplotlib leaves out."""
    return [float("nan") if v is None else v for v in values]
