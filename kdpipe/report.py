"""report.json and ledger.json, both rendered here from the run's own fields and the stages' results."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from kdpipe.results import Results, SearchResult
from kdpipe.versions import versions

LEDGER_LAYOUT = 2  # ledger.json with `results`; the earlier layout kept the report and artifacts instead


def new_report(pipeline, run_dir: Path, run_id: str, data, device, tracking) -> dict[str, Any]:
    """The run's own part of report.json, before any stage: what it runs, on what, and where it is tracked."""
    return {
        "status": "running",
        "name": pipeline.name,
        "run_id": run_id,
        "run_dir": str(run_dir),
        "method": {"name": pipeline.distill.method, "params": pipeline.distill.params.model_dump(mode="json")},
        "data": {"source": pipeline.data.source, **data.sizes(), "num_classes": data.num_classes,
                 "provenance": data.provenance},
        "device": str(device),
        "versions": versions(),
        "stage_seconds": {},
        "mlflow": {"tracking_uri": tracking.tracking_uri, "experiment": tracking.experiment, "run_id": None,
                   "model_name": None, "model_version": None, "alias": None},
    }


def render_report(base: dict[str, Any], results: Results, **ending: Any) -> dict[str, Any]:
    """report.json: the run's part, each result's part merged in run order (a later stage adds to an earlier one's
    keys: validate measures the models export wrote), the gates, and how the run ended (`ending`)."""
    report = copy.deepcopy(base)
    for result in results:
        _merge(report, result.report)
    search = results.get(SearchResult)
    if search is not None:  # the method the search chose is the one distilled
        report["method"] = {"name": search.method, "params": search.params}
    report["gates"] = {g.name: g.as_dict() for g in results.gates}
    report.update(ending)
    return report


def number_or_na(value: float | None, spec: str = ".6g") -> str:
    """A report's optional number as every view of a run shows it (console, gates.md, report.html, compare):
    formatted with `spec`, or "n/a" where it was not measured."""
    return "n/a" if value is None else format(value, spec)


def render_gates_markdown(report: dict[str, Any]) -> str:
    """gates.md: how the run ended, the delivered model and every gate as a Markdown table, for a CI job's summary
    or a merge-request comment (docs/tutorials/ci.md)."""
    student, teacher = report.get("student") or {}, report.get("teacher") or {}
    lines = [f"## kdpipe {report['name']}: {report['status']}", ""]
    if "accuracy" in student:
        vs_teacher = f" (teacher {teacher['accuracy']:.4f})" if "accuracy" in teacher else ""
        onnx = report.get("onnx") or {}
        precision = "FP32" if onnx.get("quantization", "none") == "none" else f"INT8, {onnx['quantization']}"
        delivered = f", delivered {Path(onnx['path']).name} ({precision})" if onnx else ""
        lines += [f"student test accuracy {student['accuracy']:.4f}{vs_teacher}{delivered}", ""]
    lines += ["| gate | value | limit | result |", "|---|---:|---:|---|"]
    for name, gate in report["gates"].items():
        lines.append(f"| {name} | {number_or_na(gate['value'])} | {gate['limit']:.6g} | {'passed' if gate['passed'] else '**FAILED**'} |")
    return "\n".join(lines) + "\n"


def _merge(into: dict[str, Any], part: dict[str, Any]) -> None:
    for key, value in part.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


def render_ledger(record: dict[str, Any], base: dict[str, Any], results: Results, stages: dict[type, str]) -> dict:
    """ledger.json: `record` (finished stages, digests, MLflow run, cache), the run's part of the report and each
    finished stage's result (`stages`: result type → stage name)."""
    return {**record, "layout": LEDGER_LAYOUT, "report": base,
            "results": {stages[type(r)]: r.to_json() for r in results}}
