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


def test_an_unmeasured_gate_reads_n_a_in_every_view_of_a_run(capsys):
    """The console table, gates.md, report.html's summary and compare's table format a report's optional numbers
    with one helper: a gate a runtime could not measure is "n/a" in each, a measured one the same digits."""
    import io

    from kdpipe.compare import markdown_table
    from kdpipe.html_report import _summary
    from kdpipe.progress import Progress
    from kdpipe.report import render_gates_markdown
    from kdpipe.results import Gate

    gates = [Gate("openvino/runtime_agreement_min", None, 0.99, False), Gate("accuracy_min", 0.9861111, 0.9, True)]
    report = {"name": "digits", "run_id": "r1", "status": "failed", "student": {"accuracy": 0.9861111},
              "teacher": {}, "gates": {g.name: g.as_dict() for g in gates}}
    console = io.StringIO()
    Progress(console).gate_table(gates)
    markdown, page = render_gates_markdown(report), _summary(report)
    assert "runtime_agreement_min           n/a" in console.getvalue() and "0.986111" in console.getvalue()
    assert "| openvino/runtime_agreement_min | n/a | 0.99 | **FAILED** |" in markdown
    assert "| accuracy_min | 0.986111 | 0.9 | passed |" in markdown
    assert "<td>n/a</td><td class=n>0.99</td>" in page and "<td class=n>0.986111</td>" in page
    assert "| 0.9861 | n/a |" in markdown_table([report])
