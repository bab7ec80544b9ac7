"""`kdpipe compare RUN_DIR…`: compare.html with each run's figures side by side, and a Markdown table on stdout
with one row per run; a directory that is not a run's exits 2 naming it."""

from __future__ import annotations

from pathlib import Path

from conftest import FAST, LENIENT, PIPELINES, cli, read_report, sets
from test_report_html import check_in_browser, self_contained

DIGITS = PIPELINES / "digits.yaml"


def test_compare_two_methods(workdir):
    reports = []
    # A distillation and the baseline without a teacher's help (whose parameters are none of kd's).
    for method in (["distill.method=kd"], ["distill.method=none", "distill.params={}"]):
        result = cli("run", DIGITS, *sets(*FAST, *LENIENT, *method, "export.quantize=none", "export.deliver=fp32"))
        assert result.exit_code == 0, result.stderr
        reports.append(read_report(result.stdout))
    runs = [Path(r["run_dir"]) for r in reports]
    result = cli("compare", *runs, "--out", workdir / "compare.html")
    assert result.exit_code == 0, result.stderr
    table = result.stdout.strip().splitlines()
    assert table[0].startswith("| run | method | status | student acc | teacher acc | delivered | p50 bs1 (ms) |")
    assert len(table) == 2 + len(reports)
    for line, report in zip(table[2:], reports):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:6] == [report["run_id"], report["method"]["name"], "passed", f"{report['student']['accuracy']:.4f}",
                             f"{report['teacher']['accuracy']:.4f}", "student.onnx (fp32)"]
    html = (workdir / "compare.html").read_text()
    self_contained(html)
    assert all(r["run_id"] in html for r in reports) and html.count("training loss parts") == 2
    check_in_browser(workdir / "compare.html")


def test_a_directory_without_report_json_exits_2_naming_it(workdir):
    (workdir / "empty").mkdir()
    result = cli("compare", workdir / "empty")
    assert result.exit_code == 2
    assert result.stderr.strip() == f"no report.json in {workdir / 'empty'}: not a kdpipe run directory"
    assert not (workdir / "compare.html").exists()
