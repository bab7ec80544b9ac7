"""report.html (one run) and compare.html (several side by side), rendered from report.json alone (figures from
kdpipe.figures), so that `kdpipe compare` renders old runs from their run directories. Self-contained: inline SVG,
thumbnails as data: PNGs, inline CSS; no JavaScript and no URL outside the page. Every string from a run is
escaped. docs/report.md describes the figures and where their data come from.
"""

from __future__ import annotations

import base64
import io
import time
from html import escape
from pathlib import Path
from typing import Any

from kdpipe import figures
from kdpipe.report import number_or_na

CSS = """body{font-family:sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{font-size:1.4em}h2{font-size:1.15em;border-bottom:1px solid #ccc;margin-top:1.6em}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left}
td.n{text-align:right}.failed{color:#b00;font-weight:bold}.passed{color:#070}.missing{color:#777;font-style:italic}
svg{max-width:100%;height:auto}img.thumb{width:48px;height:48px;image-rendering:pixelated;border:1px solid #ccc}
.runs{display:grid;gap:1em;grid-template-columns:repeat(var(--runs),minmax(0,1fr))}.run{min-width:0;overflow-x:auto}
.run .runs{grid-template-columns:minmax(0,1fr)}"""  # within a run's column of a comparison: one above the other


def render_report(report: dict[str, Any], thumbnails: list[str] | None = None) -> str:
    """report.html for one run's report.json; `thumbnails`: the disagreement samples' images as data: URIs (from
    `thumbnails`), in the order of evaluation.disagreements."""
    body = "".join(f"<h2>{title}</h2>{html}" for title, html in sections(report, thumbnails).items())
    return _page(f"kdpipe {report['name']}: {report['status']}", _summary(report) + body)


def render_compare(reports: list[dict[str, Any]]) -> str:
    """compare.html: each section's figures of every run side by side, one column per run (no thumbnails)."""
    return _page(f"kdpipe compare: {len(reports)} runs", _side_by_side(reports))


def render_seeds(parent: dict[str, Any], seeds: list[dict[str, Any]]) -> str:
    """A multi-seed run's report.html: the parent's summary (its gates on the mean over seeds), then each seed's
    run side by side as `kdpipe compare` shows them."""
    found = parent.get("seeds") or {}
    registered = found.get("registered") or {}
    said = (f"<p>Accuracies and gates above: the mean over seeds {escape(', '.join(map(str, found.get('seeds', []))))}"
            f". Registered: {escape(str(registered.get('seed')))} ({escape(str(registered.get('why', '')))}).</p>")
    return _page(f"kdpipe {parent['name']}: {parent['status']}", _summary(parent) + said + _side_by_side(seeds))


def _side_by_side(reports: list[dict[str, Any]]) -> str:
    columns = [sections(r) for r in reports]
    head = "".join(f"<div class=run>{_summary(r)}</div>" for r in reports)
    body = f'<div class=runs style="--runs:{len(reports)}">{head}</div>'
    for title in columns[0]:
        cells = "".join(f"<div class=run>{c[title]}</div>" for c in columns)
        body += f'<h2>{title}</h2><div class=runs style="--runs:{len(reports)}">{cells}</div>'
    return body


def write_report(report: dict[str, Any], path: Path, data=None) -> dict[str, Any]:
    """write_page of report.html for one run, thumbnails from `data` (kdpipe.data.Splits, the run's test split)
    where it holds images."""
    def render() -> str:
        shown = [d["index"] for d in (report.get("evaluation") or {}).get("disagreements", [])]
        return render_report(report, thumbnails(data, shown) if data is not None and shown else None)

    return write_page(path, render)


def write_page(path: Path, render) -> dict[str, Any]:
    """Write the page `render()` returns into `path` (atomically). Returns report.json's `report_html`: the path,
    the wall seconds it took and the CPU seconds this thread spent on it (what it costs, whatever else shares the
    machine); or the error that kept it from being written, since a page is a view of a run and never decides it."""
    from kdpipe.atomic import atomic_write

    start, cpu = time.perf_counter(), time.thread_time()
    try:
        page = render()
        with atomic_write(path) as tmp:
            tmp.write_text(page, encoding="utf-8")
    except Exception as exc:  # noqa: BLE001 - whatever kept the page from being drawn or written
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"path": str(path), "seconds": round(time.perf_counter() - start, 3),
            "cpu_seconds": round(time.thread_time() - cpu, 3)}


def thumbnails(data, indices: list[int]) -> list[str] | None:
    """The test samples at `indices` as small PNG data: URIs, for image data (C×H×W, 1 or 3 channels), else None.
    Drawn from the stored samples as scaled to [0, 1] before normalization, each stretched to its own range."""
    import numpy as np
    from PIL import Image

    shape = data.input_shape
    if len(shape) != 3 or shape[0] not in (1, 3):
        return None
    images = data.conversion.unit(data.stored_test[indices]).cpu().numpy()
    out = []
    for image in images:
        low, high = image.min(), image.max()
        pixels = np.round(255 * (image - low) / ((high - low) or 1)).astype(np.uint8).transpose(1, 2, 0)
        picture = Image.fromarray(pixels[:, :, 0] if shape[0] == 1 else pixels)
        picture.thumbnail((64, 64))
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        out.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"))
    return out


def sections(report: dict[str, Any], thumbnails: list[str] | None = None) -> dict[str, str]:
    """Section title → its HTML: its figures, or a line saying why they are missing."""
    return {"Learning curves": _curves(report), "Test predictions": _evaluation(report),
            "Where student and teacher disagree": _disagreements(report, thumbnails),
            "Latency per batch size": _latency(report), "Search": _search(report)}


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{CSS}</style></head><body>{body}</body></html>\n")


def _missing(why: str) -> str:
    return f"<p class=missing>{escape(why)}</p>"


def _not_run(report: dict[str, Any], stage: str) -> str:
    """Why a stage's figures are missing."""
    if report["status"] == "stopped":
        return f"The run stopped after {report.get('stopped_after')}, before {stage}."
    if report.get("failed_stage"):
        return f"The run ended in stage {report['failed_stage']} ({report['status']}), before {stage} finished."
    return f"Stage {stage} recorded nothing for this figure."


def _table(head: list[str], rows: list[list[str]]) -> str:
    """A table of already escaped cells; a cell starting with '#' is right-aligned (a number)."""
    cell = lambda c: f"<td class=n>{c[1:]}</td>" if c.startswith("#") else f"<td>{c}</td>"  # noqa: E731
    return ("<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(map(cell, row)) + "</tr>" for row in rows) + "</table>")


def _summary(report: dict[str, Any]) -> str:
    status = report["status"] + (f" after {report['stopped_after']}" if report.get("stopped_after") else "")
    student, teacher = report.get("student") or {}, report.get("teacher") or {}
    onnx, data = report.get("onnx") or {}, report.get("data") or {}

    def number(value, spec=".4f"):  # "#" marks a cell _table aligns right
        return number_or_na(value, spec) if value is None else "#" + number_or_na(value, spec)

    facts = [("run", report["run_id"]), ("status", status), ("method", (report.get("method") or {}).get("name")),
             ("data", f"{data.get('source')}: train {data.get('train')}, val {data.get('val')}, test {data.get('test')}, "
                      f"{data.get('num_classes')} classes"),
             ("delivered model", f"{Path(onnx['path']).name} ({onnx.get('precision')}, {onnx.get('size_bytes')} bytes)"
              if onnx.get("path") else None)]
    rows = [[escape(k), escape(str(v))] for k, v in facts if v is not None]
    rows += [["student test accuracy", number(student.get("accuracy"))],
             ["teacher test accuracy", number(teacher.get("accuracy"))]]
    if report.get("error"):
        rows.append(["error", f"<span class=failed>{escape(str(report['error']))}</span>"])
    gates = [[escape(name), number(g["value"], ".6g"), number(g["limit"], ".6g"),
              "<span class=passed>passed</span>" if g["passed"] else "<span class=failed>FAILED</span>"]
             for name, g in (report.get("gates") or {}).items()]
    css = "failed" if report["status"] in ("failed", "killed") else "passed"
    return (f"<h1>kdpipe {escape(report['name'])}: <span class={css}>{escape(status)}</span></h1>"
            + _table(["", ""], rows) + (_table(["gate", "value", "limit", "result"], gates) if gates else ""))


def _curves(report: dict[str, Any]) -> str:
    teacher = report.get("teacher") or {}
    distilled = (report.get("distill") or {}).get("history") or {}
    histories = {**(teacher.get("history") or {}), **distilled}
    said, fine_tuned = "", (((report.get("quantization") or {}).get("qat") or {}).get("history") or {})
    if fine_tuned:  # the QAT epochs continue the student's curves after its last distillation epoch
        after = max((max(c["epoch"]) for c in distilled.values() if c.get("epoch")), default=0)
        histories.update({name: {**columns, "epoch": [after + e for e in columns["epoch"]]}
                          for name, columns in fine_tuned.items()})
        said = f"<p>Quantization-aware fine-tuning (qat): epochs {after + 1} on, after the distillation's.</p>"
    notes = []
    source = str(teacher.get("source", ""))
    if teacher.get("history") and source.startswith("cache"):
        notes.append("The teacher came from the cache: its curves are those recorded when it was trained.")
    elif report.get("teacher") is None and "teacher" in report:
        notes.append("The pipeline has no teacher.")
    elif source.startswith("checkpoint"):
        notes.append(f"The teacher was loaded from a {source}: no training curve.")
    elif source.startswith("cache"):
        notes.append("The teacher came from a cache entry made before kdpipe kept its curves: no training curve.")
    if not (report.get("distill") or {}).get("history"):
        reused = (report.get("search") or {}).get("reused_checkpoint")
        notes.append("The student is the search's best trial, reused: its curves are in that trial's MLflow run."
                     if reused else _not_run(report, "distill"))
    figure = figures.learning_curves(histories) if histories else ""
    return figure + said + "".join(_missing(n) for n in notes)


def _evaluation(report: dict[str, Any]) -> str:
    found = report.get("evaluation")
    if not found:
        return _missing(_not_run(report, "validate"))
    models = {f"student ({found.get('student_model', 'delivered')})": found["student"]}
    if "teacher" in found:
        models["teacher"] = found["teacher"]
    classes = found["classes"]
    if len(classes) <= TABLE_CLASSES:
        tables = "".join(f"<div class=run>{_confusion_table(name, m, classes)}</div>" for name, m in models.items())
        return f'<div class=runs style="--runs:{len(models)}">{tables}</div>'
    return (figures.confusion_matrices({name: m["confusion"] for name, m in models.items()}, classes)
            + figures.per_class_accuracy({name.split(" ")[0]: m["per_class_accuracy"] for name, m in models.items()},
                                         classes))


TABLE_CLASSES = 20  # up to this many classes a confusion matrix is a table: exact counts, and no figure to draw


def _confusion_table(name: str, model: dict[str, Any], classes: list[str]) -> str:
    """One model's confusion matrix as a table shaded by count (rows: true class), its per-class accuracy last."""
    top = max(max(row) for row in model["confusion"]) or 1

    def cell(n: int) -> str:
        ink = ";color:#fff" if n > top / 2 else ""
        return f'<td class=n style="background:rgba(31,119,180,{n / top:.2f}){ink}">{n or ""}</td>'

    rows = "".join(
        f"<tr><th>{escape(label)}</th>{''.join(map(cell, row))}"
        f"<td class=n>{'n/a' if accuracy is None else f'{accuracy:.3f}'}</td></tr>"
        for label, row, accuracy in zip(classes, model["confusion"], model["per_class_accuracy"]))
    head = ("<tr><th>true \\ predicted</th>" + "".join(f"<th>{escape(c)}</th>" for c in classes)
            + "<th>accuracy</th></tr>")
    return f"<p>{escape(name)}: confusion matrix and accuracy per class</p><table>{head}{rows}</table>"


def _disagreements(report: dict[str, Any], thumbnails: list[str] | None) -> str:
    found = report.get("evaluation")
    if not found:
        return _missing(_not_run(report, "validate"))
    if "disagreements" not in found:
        return _missing("The pipeline has no teacher to disagree with.")
    classes = found["classes"]
    shown = found["disagreements"]
    intro = (f"<p>{found['disagreement_count']} of {found['test_samples']} test samples; the {len(shown)} shown are "
             "ranked by the confidence of the model that is right, then those both get wrong.</p>")
    if not shown:
        return intro
    rows = []
    for number, d in enumerate(shown):
        image = f'<img class=thumb alt="test sample {d["index"]}" src="{thumbnails[number]}">' if thumbnails else ""
        rows.append([image, f"#{d['index']}", escape(classes[d["label"]]),
                     escape(f"{classes[d['student']]} ({d['student_confidence']:.2f})"),
                     escape(f"{classes[d['teacher']]} ({d['teacher_confidence']:.2f})")])
    head = ["image" if thumbnails else "", "test sample", "label", "student (confidence)", "teacher (confidence)"]
    return intro + _table(head, rows)


def _latency(report: dict[str, Any]) -> str:
    quantization = report.get("quantization") or {}
    candidates = {name: quantization[name]["latency_ms"] for name in ("fp32", "int8", "qat")
                  if isinstance(quantization.get(name), dict) and "latency_ms" in quantization[name]}
    if not candidates and report.get("latency_ms"):
        candidates[(report.get("onnx") or {}).get("precision", "delivered")] = report["latency_ms"]
    if not candidates:
        return _missing(_not_run(report, "validate"))
    teacher = ((report.get("teacher") or {}).get("onnx") or {}).get("latency_ms")
    if teacher:
        candidates["teacher"] = teacher
    delivered = quantization.get("delivered")
    said = f"<p>Delivered: {escape(delivered.upper())}. {escape(quantization.get('reason', ''))}</p>" if delivered else ""
    return said + figures.latency(candidates, report.get("gates") or {})


def _search(report: dict[str, Any]) -> str:
    found = report.get("search")
    if not found:
        return _missing("Not a search campaign.")
    if "trials" not in found:
        return _missing(_not_run(report, "search") if "n_trials" not in found else
                        "Recorded by a kdpipe that kept no trials in report.json: see search/plots in the run directory.")
    html = ""
    if found["trials"]:
        multi = len(found["objective"]) > 1
        html += figures.search_front(found["trials"], found["objective"], found.get("pareto_front") if multi else None)
    if found.get("param_importances"):
        html += figures.importances(found["param_importances"])
    else:
        html += _missing(f"Parameter importances: {found.get('param_importances_skipped') or 'none recorded'}.")
    best = [[escape(str(k)), escape(str(v))] for k, v in (found.get("best_params") or {}).items()]
    return html + (f"<p>Best trial {escape(str(found.get('best_trial')))}:</p>" + _table(["parameter", "value"], best)
                   if best else "")

