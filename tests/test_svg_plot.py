"""kdpipe.svg_plot, the SVG renderer of report.html's figures, and kdpipe.figures drawn with it: well-formed SVG,
ticks at nice values, gaps where data are missing, every data string escaped, the heatmap's raster true to the
matrix (a 1000-class one as one raster, drawn with no plotting library imported). Data shaped as report.json
holds them."""

from __future__ import annotations

import base64
import io
import math
import random
import re
import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
from PIL import Image

from kdpipe import figures
from kdpipe.svg_plot import Panel, figure, limits, ticks

NS = "{http://www.w3.org/2000/svg}"
HOSTILE = '<script>&"'


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    assert root.tag == f"{NS}svg"
    width, height = float(root.get("width")), float(root.get("height"))
    assert root.get("viewBox") == f"0 0 {width:g} {height:g}"
    return root


def texts(root: ET.Element) -> list[str]:
    return [t.text for t in root.iter(f"{NS}text")]


def history(epochs: int, **columns) -> dict:
    return {"epoch": list(range(1, epochs + 1)), **columns}


def curves() -> dict:
    return {"teacher": history(30, train_loss=[1 / e for e in range(1, 31)], val_accuracy=[0.9] * 30),
            "student": history(30, train_loss=[2 / e for e in range(1, 31)],
                               train_kd=[0.3 / e ** 2 for e in range(1, 31)],
                               val_accuracy=[min(0.97, 0.1 * e) for e in range(1, 31)])}


def test_log_ticks_at_decades():
    assert [label for _, label in ticks(0.01, 100, True)] == ["0.01", "0.1", "1", "10", "100"]
    assert [label for _, label in ticks(0.5, 2e4, True)] == ["1", "10", "100", "1000", "1e+04"]
    many = ticks(1e-9, 1e9, True)  # every other decade when there are too many
    assert 2 <= len(many) <= 7 and all(math.log10(v) == round(math.log10(v)) for v, _ in many)


def test_a_log_axis_over_less_than_a_decade_still_has_two_ticks():
    assert [label for _, label in ticks(0.15, 0.6, True)] == ["0.2", "0.5"]
    ends = ticks(0.0096, 0.012, True)  # no decade, no 2 or 5 × 10^k: its ends
    assert [v for v, _ in ends] == [0.0096, 0.012]


def test_linear_ticks_are_nice_and_without_float_noise():
    assert [label for _, label in ticks(0, 0.97, False)] == ["0", "0.2", "0.4", "0.6", "0.8"]
    assert [label for _, label in ticks(-0.3, 0.3, False)] == ["-0.3", "-0.2", "-0.1", "0", "0.1", "0.2", "0.3"]
    randomly = random.Random(0)
    for _ in range(500):
        lo = randomly.uniform(-1e3, 1e3) * 10 ** randomly.randint(-6, 3)
        hi = lo + randomly.uniform(1e-3, 1e3) * 10 ** randomly.randint(-6, 3)
        found = ticks(lo, hi, False)
        assert 3 <= len(found) <= 7, (lo, hi, found)
        values, labels = [v for v, _ in found], [label for _, label in found]
        step = values[1] - values[0]
        mantissa = step / 10 ** math.floor(math.log10(step))
        assert min(abs(mantissa - m) for m in (1, 2, 5, 10)) < 1e-4, (lo, hi, found)
        assert all(lo - 1e-9 * abs(lo) <= v <= hi + 1e-9 * abs(hi) for v in values)
        assert len(set(labels)) == len(labels) and all(float(t) == pytest.approx(v) for v, t in found), found
        assert all(len(t) <= 14 and "000000" not in t.split("e")[0].split(".")[-1] for t in labels), found


def test_limits_pad_by_5_percent_keep_fixed_ends_and_survive_no_data():
    assert limits([0, 10], False, (None, None)) == pytest.approx((-0.5, 10.5))
    assert limits([0, 10], False, (0, None)) == pytest.approx((0, 10.5))
    assert limits([0.01, 100], True, (None, None)) == pytest.approx((10 ** -2.2, 10 ** 2.2))
    assert limits([None, math.nan, -1, 0], True, (None, None)) == pytest.approx((10 ** -0.05, 10 ** 1.05))
    assert limits([], False, (0, 1.05)) == (0, 1.05)
    assert limits([3, 3], False, (None, None))[0] < 3 < limits([3, 3], False, (None, None))[1]


def test_a_figure_is_one_svg_with_a_clip_path_per_panel():
    root = parse(figures.learning_curves(curves()))
    clips = [c.get("id") for c in root.iter(f"{NS}clipPath")]
    assert len(clips) == len(set(clips)) == 2
    used = {g.get("clip-path") for g in root.iter(f"{NS}g") if g.get("clip-path")}
    assert used == {f"url(#{c})" for c in clips}
    for text in root.iter(f"{NS}text"):
        assert 9 <= float(text.get("font-size")) <= 12
    assert root.get("font-family") == "sans-serif"
    other = parse(figures.learning_curves({"student": curves()["student"]}))
    assert not set(clips) & {c.get("id") for c in other.iter(f"{NS}clipPath")}  # two figures on one page


def test_learning_curves_titles_legend_and_log_ticks():
    svg = figures.learning_curves(curves())
    words = texts(parse(svg))
    assert {"training loss parts", "validation accuracy", "epoch"} <= set(words)
    assert {"teacher loss", "student loss", "student kd", "teacher", "student"} <= set(words)
    assert {"0.001", "0.01", "0.1", "1"} <= set(words)  # the loss panel's decades
    assert figures.STUDENT in svg and figures.TEACHER in svg


def test_a_missing_or_non_positive_value_splits_the_line():
    root = parse(figures.learning_curves({"student": history(6, train_loss=[1, 0.5, None, 0.3, 0, 0.2],
                                                             val_accuracy=[0.5, 0.6, math.nan, 0.8, 0.85, 0.9])}))
    lines = [p.get("points").split() for p in root.iter(f"{NS}polyline")]
    assert sorted(map(len, lines)) == [2, 2, 3]  # loss: 1..0.5 and 0.3 alone (no line), val: 2 and 3 points
    dots = [c for c in root.iter(f"{NS}circle") if c.get("r") == "2.2"]
    assert len(dots) == 5 + 1  # the accuracy's, its legend's


def test_peers_get_their_own_colours():
    svg = figures.learning_curves({f"peer{k}": history(3, train_loss=[1, 0.5, 0.2], val_accuracy=[0.2, 0.4, 0.5])
                                   for k in range(3)})
    colours = {p.get("stroke") for p in parse(svg).iter(f"{NS}polyline")}
    assert len(colours) == 3 and not colours & {figures.STUDENT, figures.TEACHER}


def test_data_strings_are_escaped():
    classes = [HOSTILE, "b&b", "c"]
    matrix = [[3, 1, 0], [0, 2, 0], [1, 0, 4]]
    svg = figures.confusion_matrices({f"student {HOSTILE}": matrix}, classes)
    assert "<script" not in svg
    words = texts(parse(svg))
    assert f"student {HOSTILE}: confusion matrix" in words and words.count(HOSTILE) == 2 and "b&b" in words
    bars = figures.per_class_accuracy({HOSTILE: [0.5, 1.0, None]}, classes)
    assert "<script" not in bars and HOSTILE in texts(parse(bars))
    parse(figures.importances({HOSTILE: 0.3, "lr": 0.7}))
    parse(figures.search_front([{"number": 0, "values": [0.5, 2.0]}], [HOSTILE, "b&b"],
                               [{"trial": 0, "values": {HOSTILE: 0.5, "b&b": 2.0}}]))


def heatmap_pngs(svg: str) -> list[Image.Image]:
    """The rasters of a figure's heatmaps, decoded."""
    out = []
    for image in parse(svg).iter(f"{NS}image"):
        href = image.get("href")
        assert href.startswith("data:image/png;base64,") and image.get("preserveAspectRatio") == "none"
        out.append(Image.open(io.BytesIO(base64.b64decode(href.split(",", 1)[1]))).convert("RGB"))
    return out


def test_the_heatmap_is_a_png_true_to_the_matrix():
    matrix = [[0, 1, 2, 3, 4], [5, 6, 70, 8, 9], [10, 11, 12, 13, 0]]
    panel = Panel(title="m")
    panel.heatmap(matrix)
    (picture,) = heatmap_pngs(figure([panel], 400, 300))
    assert picture.size == (5, 3)
    darkness = {(x, y): sum(picture.getpixel((x, y))) for x in range(5) for y in range(3)}
    assert min(darkness, key=darkness.get) == (2, 1)
    assert picture.getpixel((0, 0)) == (255, 255, 255)  # no count: white
    assert darkness[(3, 0)] > darkness[(3, 2)]  # more is darker


def test_confusion_counts_are_written_for_few_classes_only():
    few = figures.confusion_matrices({"student": [[5, 1], [0, 7]], "teacher": [[6, 0], [2, 5]]}, ["a", "b"])
    root = parse(few)
    words = set(texts(root))
    assert {"student: confusion matrix", "teacher: confusion matrix", "predicted class", "true class"} <= words
    counts = [t for t in root.iter(f"{NS}text") if t.text in {"5", "1", "7", "6", "2"}]
    assert sorted(t.text for t in counts) == ["1", "2", "5", "5", "6", "7"]  # zero cells stay empty
    assert all(t.get("fill") == "#fff" for t in counts if t.text in {"5", "6", "7"})  # white on the dark cells
    n = 30
    many = figures.confusion_matrices({"student": [[int(i == j) * 9 for j in range(n)] for i in range(n)]},
                                      [f"class{i}" for i in range(n)])
    words = texts(parse(many))
    assert "9" not in words and "class3" not in words
    assert [p.size for p in heatmap_pngs(many)] == [(n, n)]


def test_per_class_accuracy_bars():
    classes = [f"c{i}" for i in range(25)]
    svg = figures.per_class_accuracy({"student": [0.5] * 24 + [None], "teacher": [1.0] * 25}, classes)
    root = parse(svg)
    words = texts(root)
    assert {"test accuracy per class", "class", "student", "teacher", "c0", "c24", "1"} <= set(words)
    bars = [r for r in root.iter(f"{NS}rect") if r.get("fill") in (figures.STUDENT, figures.TEACHER)]
    assert len(bars) == 24 + 25 + 2  # the None is skipped; the legend's two swatches
    many = texts(parse(figures.per_class_accuracy({"student": [0.5] * 40}, [f"c{i}" for i in range(40)])))
    assert "c5" not in many and "20" in many  # over 30 classes: numbered ticks


def test_latency_with_its_gates():
    latency = {"fp32": {"1": {"p50": 0.01, "p99": 0.02, "p90": 0.015}, "64": {"p50": 0.08, "p99": 0.3}},
               "int8": {"1": {"p50": 0.015, "p99": 0.07}, "64": {"p50": 0.2, "p99": 0.35}},
               "teacher": {"1": {"p50": 0.02, "p99": 0.04}, "64": {"p50": 0.4, "p99": 0.8}}}
    gates = {"latency_p50_ms_max:bs1": {"value": 0.01, "limit": 5, "passed": True},
             "latency_p99_ms_max:bs64": {"value": 0.3, "limit": 0.25, "passed": False},
             "accuracy_min": {"value": 0.9, "limit": 0.8, "passed": True}}
    svg = figures.latency(latency, gates)
    root = parse(svg)
    words = texts(root)
    assert {"p50 latency", "p99 latency", "batch size", "ms", "fp32", "int8", "teacher"} <= set(words)
    assert "gate 5 ms at bs 1" in words and "gate 0.25 ms at bs 64 FAILED" in words
    assert words.count("1") >= 2 and words.count("64") == 2  # the batch sizes as x ticks
    red = [line for line in root.iter(f"{NS}line") if line.get("stroke") == "red"]
    assert len(red) == 4 and all(line.get("y1") == line.get("y2") for line in red)  # gates and their swatches
    dashed = [p for p in root.iter(f"{NS}polyline") if p.get("stroke") == figures.CANDIDATES["teacher"]]
    assert len(dashed) == 2 and all(p.get("stroke-dasharray") for p in dashed)
    assert parse(figures.latency({}, {})) is not None  # nothing measured: empty panels, no crash


def test_search_front_and_importances():
    trials = [{"number": i, "values": [0.5 + 0.05 * i, 3.0 - i]} for i in range(5)]
    single = texts(parse(figures.search_front(trials, ["val_accuracy"], None)))
    assert {"optimization history", "trial", "best so far", "val_accuracy"} <= set(single)
    front = [{"trial": i, "values": {"val_accuracy": 0.5 + 0.05 * i, "latency_p50": 3.0 - i}} for i in (4, 1)]
    multi = parse(figures.search_front(trials, ["val_accuracy", "latency_p50"], front))
    assert {"Pareto front", "trial", "val_accuracy", "latency_p50"} <= set(texts(multi))
    grey = [c for c in multi.iter(f"{NS}circle") if c.get("fill") == "#bbbbbb"]
    assert len(grey) == 5 + 1  # and the legend's
    root = parse(figures.importances({"alpha": 0.1, "lr": 0.6, "temperature": 0.3}))
    assert "parameter importances (val_accuracy)" in texts(root)
    height = {t.text: float(t.get("y")) for t in root.iter(f"{NS}text")}
    assert height["lr"] < height["temperature"] < height["alpha"]  # the largest on top


def test_the_legend_avoids_the_data():
    panel = Panel(title="t")
    panel.line(range(10), [10] * 10, "#000", "along the top")
    panel.line([0], [0], "#000", "one at the bottom left", "", "o")
    root = parse(figure([panel], 400, 300))
    frame, legend = [r for r in root.iter(f"{NS}rect") if r.get("fill") in ("none", "#fff") and r.get("stroke")]
    middle = [float(frame.get(k)) + float(frame.get(size)) / 2 for k, size in (("x", "width"), ("y", "height"))]
    assert float(legend.get("x")) > middle[0] and float(legend.get("y")) > middle[1]  # lower right: free


def test_empty_data_does_not_crash():
    parse(figures.learning_curves({"student": {"epoch": [], "train_loss": [], "val_accuracy": []}}))
    parse(figures.per_class_accuracy({"student": [None, None]}, ["a", "b"]))
    parse(figure([Panel(title="nothing", xlog=True, ylog=True)], 300, 200))


def test_a_1000_class_page_is_two_rasters_and_draws_without_a_plotting_library():
    """A page's figures cost milliseconds because no plotting library is imported (matplotlib's import alone took
    most of a second) and a confusion matrix's million cells are one PNG each, not a million SVG elements.
    benchmarks/startup.py prints what report.html takes in a run."""
    code = """
import json, random, sys
from kdpipe import figures
n = 1000
randomly = random.Random(0)
matrix = [[40 if i == j else int(randomly.random() < 0.02) for j in range(n)] for i in range(n)]
classes = [f"class{i}" for i in range(n)]
svg = figures.confusion_matrices({"student (int8)": matrix, "teacher": matrix}, classes)
svg += figures.per_class_accuracy({"student": [0.9] * n, "teacher": [0.95] * n}, classes)
svg += figures.latency({"fp32": {"1": {"p50": 0.01, "p99": 0.02}, "64": {"p50": 0.2, "p99": 0.3}}}, {})
plotting = sorted(m for m in sys.modules if m.split(".")[0] in ("matplotlib", "plotly"))
print(json.dumps({"svg": svg, "plotting": plotting}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    found = json.loads(done.stdout)
    assert found["plotting"] == []
    first = re.search(r"<svg .*?</svg>", found["svg"])[0]
    assert [p.size for p in heatmap_pngs(first)] == [(1000, 1000)] * 2
    assert first.count("<rect") < 10 and first.count("<text") < 50  # frames, titles and ticks; no cell of its own
