"""report.html: rendered for a run from report.json's data (learning curves, confusion matrices, disagreements,
latency with its gates, the search's front and importances), self-contained, checked in headless Chromium; a page
that cannot be drawn never fails the run."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pytest

from conftest import FAST, LENIENT, PIPELINES, cli, read_report, sets

DIGITS = PIPELINES / "digits.yaml"
SEARCH = PIPELINES / "digits-search.yaml"
# What the test copy of a page adds: the count of images the browser could not decode, and of inline SVGs drawn.
PROBE = ("<script>addEventListener('load', () => {const b = document.body;"
         "b.dataset.broken = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).length;"
         "b.dataset.svgs = [...document.querySelectorAll('svg')].filter(s => s.getBBox().width > 0).length;})"
         "</script></body>")


def check_in_browser(page: Path) -> None:
    """Open `page` in headless Chromium: no console error, every <img> decoded, every inline <svg> drawn; its
    screenshot is written beside it (report.png for report.html)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    html = page.read_text()
    probe = page.with_name(f"{page.stem}.probe.html")  # the page itself runs no script; its test copy does
    probe.write_text(html.replace("</body>", PROBE))
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={page.parent / '.chromium'}",
             "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000"]
    dom = subprocess.run([*flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    shot = page.with_suffix(".png")
    seen = subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1280,4000", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    probe.unlink()
    shutil.rmtree(page.parent / ".chromium", ignore_errors=True)
    for run in (dom, seen):
        errors = [line for line in run.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
        assert not errors, errors
    marks = re.search(r'<body data-broken="(\d+)" data-svgs="(\d+)"', dom.stdout)
    assert marks, dom.stdout[:500] + dom.stderr[-2000:]
    assert int(marks[1]) == 0 and int(marks[2]) == html.count("<svg ") > 0, marks.groups()
    assert shot.stat().st_size > 10_000, seen.stderr[-2000:]


def self_contained(html: str) -> None:
    """No script, no stylesheet or image fetched from anywhere: every picture inline."""
    assert "<script" not in html and "<link" not in html
    assert not re.search(r'(src|href)="(?!data:|#)', html)


def predicted(onnx: str, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0].argmax(1)


def test_report_html_of_the_default_pipeline(workdir):
    from kdpipe.deploy import inputs_for
    from kdpipe.prepare import prepare

    result = cli("run", DIGITS, *sets(*FAST, *LENIENT))
    assert result.exit_code == 0, result.stderr
    report = read_report(result.stdout)
    run_dir = Path(report["run_dir"])
    page = run_dir / "report.html"
    html = page.read_text()
    self_contained(html)
    # What rendering took is recorded, not bounded here: benchmarks/startup.py prints it beside the run's stages.
    assert set(report["report_html"]) == {"path", "seconds", "cpu_seconds"}
    assert report["report_html"]["path"] == str(page)

    # Learning curves: every distill epoch, and the teacher's (trained here or recorded with its cache entry).
    assert report["distill"]["history"]["student"]["epoch"] == list(range(1, 7))
    assert len(report["distill"]["history"]["student"]["val_accuracy"]) == 6
    assert report["teacher"]["history"]["teacher"]["epoch"] == list(range(1, 9))
    assert "training loss parts" in html and "validation accuracy" in html

    # Confusion matrices over the whole test split; per-class accuracy, weighted by class size, is the accuracy.
    found = report["evaluation"]
    for model in ("student", "teacher"):
        confusion = np.array(found[model]["confusion"])
        assert confusion.sum() == report["data"]["test"] == found["test_samples"]
        support = confusion.sum(1)
        weighted = sum(a * n for a, n in zip(found[model]["per_class_accuracy"], support)) / support.sum()
        assert weighted == pytest.approx(report[model]["onnx"]["accuracy"] if model == "teacher"
                                         else report["student"]["accuracy"])

    # The disagreements, recomputed with onnxruntime from the delivered model and the teacher's ONNX file.
    data = prepare(run_dir / "pipeline.yaml", []).data
    student = predicted(report["onnx"]["path"], inputs_for(Path(report["onnx"]["path"]), data))
    teacher = predicted(report["teacher"]["onnx"]["path"], inputs_for(Path(report["teacher"]["onnx"]["path"]), data))
    y = data.y_test.numpy()
    assert found["disagreement_count"] == int((student != teacher).sum())
    assert len(found["disagreements"]) == min(16, found["disagreement_count"])
    for d in found["disagreements"]:
        assert (d["student"], d["teacher"], d["label"]) == (student[d["index"]], teacher[d["index"]], y[d["index"]])
        assert d["student"] != d["teacher"]
    assert html.count('<img class=thumb') == len(found["disagreements"])  # digits are images: thumbnails

    # Latency of each candidate (FP32, INT8) with the latency gate on.
    assert "p50 latency" in html and "gate 5 ms at bs 1" in html

    client = mlflow.MlflowClient(report["mlflow"]["tracking_uri"])
    assert "report.html" in [a.path for a in client.list_artifacts(report["mlflow"]["run_id"])]
    check_in_browser(page)


def test_report_html_of_a_search_campaign(workdir):
    quick = [*FAST, "validate.gates.accuracy_min=0.1", "validate.gates.max_accuracy_drop_vs_teacher=0.9",
             "distill.epochs=2", "search.sampler=random", "search.pruner=none", "search.trials=4",
             "search.objective=[val_accuracy, latency_p50]"]
    result = cli("run", SEARCH, *sets(*quick))
    assert result.exit_code == 0, result.stderr
    report = read_report(result.stdout)
    found = report["search"]
    assert len(found["trials"]) == found["n_complete"] == 4
    assert found["pareto_front"] and ("param_importances" in found)
    page = Path(report["run_dir"]) / "report.html"
    html = page.read_text()
    self_contained(html)
    assert "Pareto front" in html
    assert "parameter importances" in html if found["param_importances"] else "Parameter importances:" in html
    check_in_browser(page)


def test_a_stopped_run_says_what_is_missing_and_a_page_that_cannot_be_written_never_fails_the_run(workdir):
    result = cli("run", DIGITS, *sets(*FAST, *LENIENT, "export.quantize=none", "export.deliver=fp32"),
                 "--until", "distill")
    assert result.exit_code == 0, result.stderr
    report = read_report(result.stdout)
    run_dir = Path(report["run_dir"])
    html = (run_dir / "report.html").read_text()
    assert "The run stopped after distill, before validate." in html and "training loss parts" in html

    # A directory where the page goes: the resumed run passes, says why there is no page, and records it.
    (run_dir / "report.html").unlink()
    (run_dir / "report.html").mkdir()
    result = cli("run", "--resume", run_dir)
    assert result.exit_code == 0, result.stderr
    [warning] = [line for line in result.stderr.splitlines() if "report.html" in line]
    assert warning.startswith("warning: report.html not written: IsADirectoryError"), warning
    report = read_report(result.stdout)
    assert report["status"] == "passed" and report["report_html"]["error"].startswith("IsADirectoryError")

