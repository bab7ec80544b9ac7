"""`kdpipe compare RUN_DIR…`: several runs (methods, seeds) from their report.json files, as compare.html (each
figure of report.html side by side) and as a Markdown table for a CI comment."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdpipe.errors import InputError
from kdpipe.report import number_or_na


def read_reports(run_dirs: list[Path]) -> list[dict[str, Any]]:
    """Each run directory's report.json; InputError (exit 2) naming the first that has none or an unreadable one."""
    reports = []
    for run_dir in run_dirs:
        path = Path(run_dir) / "report.json"
        try:
            reports.append(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise InputError("", f"no report.json in {run_dir}: not a kdpipe run directory") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError("", f"{path} cannot be read as a report: {exc}") from None
    return reports


def markdown_table(reports: list[dict[str, Any]]) -> str:
    """One row per run: run id, method, status, student and teacher test accuracy, the delivered model, its p50
    latency at each batch size any run measured, and its size."""
    sizes = sorted({int(b) for r in reports for b in r.get("latency_ms") or {}})
    head = ["run", "method", "status", "student acc", "teacher acc", "delivered", *[f"p50 bs{b} (ms)" for b in sizes],
            "size (kB)"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * 2 + "---|" + "---:|" * (len(sizes) + 1)]
    for report in reports:
        student, teacher = report.get("student") or {}, report.get("teacher") or {}
        onnx, latency = report.get("onnx") or {}, report.get("latency_ms") or {}
        delivered = f"{Path(onnx['path']).name} ({onnx.get('precision')})" if onnx.get("path") else "n/a"
        cells = [report["run_id"], (report.get("method") or {}).get("name", "n/a"), report["status"],
                 number_or_na(student.get("accuracy"), ".4f"), number_or_na(teacher.get("accuracy"), ".4f"), delivered,
                 *[number_or_na((latency.get(str(b)) or {}).get("p50"), ".4g") for b in sizes],
                 number_or_na(onnx["size_bytes"] / 1e3 if "size_bytes" in onnx else None, ".1f")]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
