"""validate: onnxruntime accuracy on the test split, latency per batch size, INT8 vs FP32, and the gates.

Every model of the run (FP32 student, INT8 student, teacher) is loaded with the
same session settings from the pipeline file and timed the same way, so their
ratios are honest. The gates apply to the delivered model (`export.deliver`).
With `validate.runtimes: [onnxruntime, openvino]` every model is measured in
OpenVINO too, and the delivered one gets the same gates there, plus its
agreement with onnxruntime; onnxruntime's measurements choose what is delivered.
"""

from __future__ import annotations

import platform
from dataclasses import astuple
from pathlib import Path

import numpy as np

from kdpipe import __version__
from kdpipe.cache_store import load_json, store_json
from kdpipe.chance import ChanceLevel
from kdpipe.fingerprint import fingerprint, sha256_file
from kdpipe.deploy import inputs_for, measure_model, session_settings
from kdpipe.results import ExportResult, Gate, Stage, ValidateResult
from kdpipe.onnx_runtime import available_providers, configured_session, import_ort, predict, resolve_providers
from kdpipe.openvino_runtime import DEVICE, CannotRun, import_openvino, measure_openvino

MB = 1e6


def latency_limits(limit, batch_sizes: list[int]) -> dict[int, float]:
    """A number applies to the smallest batch size; a mapping names its batch sizes."""
    if limit is None:
        return {}
    if isinstance(limit, dict):
        return {int(b): float(v) for b, v in limit.items()}
    return {min(batch_sizes): float(limit)}


def teacher_content(ctx, cfg) -> dict:
    """What the teacher's onnxruntime measurement depends on: its ONNX bytes, the test data and every setting that
    changes what is measured, on this machine."""
    path = ctx.results[ExportResult].teacher_onnx_path
    return {"onnx_sha256": sha256_file(path), "data": ctx.data.fingerprint, "batch_sizes": cfg.batch_sizes,
            "providers": resolve_providers(cfg.providers), **session_settings(cfg), "host": platform.node(),
            "onnxruntime": import_ort().__version__, "kdpipe": __version__}


def cached_teacher(ctx, content: dict, measure, what: str) -> dict:
    """`measure()`, a measurement of the frozen teacher, cached by `content`: reruns and campaign workers pay for it
    once. An onnxruntime measurement's entry holds the test predictions too; one written before it did is measured
    again."""
    path = ctx.results[ExportResult].teacher_onnx_path
    entry = ctx.cache_dir / "teacher-validate" / f"{fingerprint(content)}.json"
    cached = load_json(entry, lambda line: ctx.progress.info(f"  {line}"))
    if cached is not None and content.get("runtime") is None and "predictions" not in cached:
        ctx.progress.info(f"  {what}: cache entry {entry} holds no test predictions; measuring again")
        cached = None
    if cached is not None:
        ctx.progress.info(f"  {what} from cache {entry}")
        found = {k: np.asarray(v) for k, v in cached.pop("predictions", {}).items()}
        return {**cached, "path": str(path), "latency_ms": {int(b): v for b, v in cached["latency_ms"].items()},
                **({"predictions": found} if found else {}), "cached": True}
    measured = measure()
    kept = {k: v.tolist() for k, v in measured.get("predictions", {}).items()}
    store_json(entry, {**{k: v for k, v in as_report(measured).items() if k != "path"},
                       **({"predictions": kept} if kept else {})})
    return {**measured, "cached": False}


def measure_teacher(ctx, cfg, x_test: np.ndarray, y_test: np.ndarray) -> dict:
    """measure_model for the frozen teacher, cached by content (teacher_content)."""
    path = ctx.results[ExportResult].teacher_onnx_path
    return cached_teacher(ctx, teacher_content(ctx, cfg), lambda: measure_model(path, cfg, x_test, y_test),
                          "teacher accuracy and latency")


def measure_teacher_openvino(ctx, cfg, x_test: np.ndarray, y_test: np.ndarray) -> dict:
    """measure_openvino for the frozen teacher, cached by what its onnxruntime measurement is (teacher_content,
    the parity compares with it) and the OpenVINO build. Its onnxruntime measurement may come from the cache,
    without logits: the parity's reference logits are computed here, in a session with validate's settings."""
    path = ctx.results[ExportResult].teacher_onnx_path
    content = {**teacher_content(ctx, cfg), "runtime": "openvino", "openvino": import_openvino().get_version()}
    measure = lambda: measure_openvino(path, cfg, x_test, y_test, predict(configured_session(path, cfg), x_test))  # noqa: E731
    return cached_teacher(ctx, content, measure, "teacher's OpenVINO accuracy and latency")


def gates_for(model: dict, teacher: dict | None, cfg,
              chance: ChanceLevel) -> list[tuple[str, float | None, float, bool]]:
    """(name, value, limit, passed) for every configured gate that validate owns, on one measured model."""
    gates = cfg.gates
    out = []
    acc = model["accuracy"]
    if gates.above_chance is not None:
        out.append(astuple(chance.gate("above_chance", acc, gates.above_chance)))
    if gates.accuracy_min is not None:
        out.append(("accuracy_min", acc, gates.accuracy_min, acc >= gates.accuracy_min))
    if gates.max_accuracy_drop_vs_teacher is not None and teacher is not None:
        drop = teacher["accuracy"] - acc
        out.append(("max_accuracy_drop_vs_teacher", drop, gates.max_accuracy_drop_vs_teacher,
                    drop <= gates.max_accuracy_drop_vs_teacher))
    for key, stat in (("latency_p50_ms_max", "p50"), ("latency_p99_ms_max", "p99")):
        for b, limit in latency_limits(getattr(gates, key), cfg.batch_sizes).items():
            value = model["latency_ms"][b][stat]
            out.append((f"{key}:bs{b}", value, limit, value <= limit))
    if teacher is not None:
        for b, limit in latency_limits(gates.speedup_vs_teacher_min, cfg.batch_sizes).items():
            value = teacher["latency_ms"][b]["p50"] / model["latency_ms"][b]["p50"]
            out.append((f"speedup_vs_teacher_min:bs{b}", value, limit, value >= limit))
    if gates.size_mb_max is not None:
        size = model["size_bytes"] / MB
        out.append(("size_mb_max", size, gates.size_mb_max, size <= gates.size_mb_max))
    if cfg.require_provider and "providers_used" in model:  # onnxruntime's providers; OpenVINO has none
        fallback = [p for p in resolve_providers(cfg.providers) if p not in model["providers_used"]]
        out.append(("require_provider", len(fallback), 0, not fallback))
    return out


LABELS = {"int8": "INT8", "qat": "QAT INT8"}  # how the reasons name each INT8 candidate


def choose_delivery(deliver: str, fp32: dict, int8: dict | None, int8_gates, max_drop: float,
                    qat: dict | None = None, qat_gates=()) -> tuple[str, str]:
    """('fp32' | 'int8' | 'qat', why). `int8` is the post-training model, `qat` the quantization-aware one (when
    built); `deliver: int8` means the QAT model when there is one. `best` takes an INT8 model only when it passes
    every gate, loses at most `max_drop` accuracy and is faster than FP32 at every batch size; of two such, the more
    accurate (the faster at the smallest batch size on a tie)."""
    if deliver != "best":
        if deliver == "int8" and qat is not None:
            return "qat", "export.deliver is int8 and export.quantize is qat"
        return deliver, f"export.deliver is {deliver}"
    candidates = {name: (model, gates) for name, model, gates in (("int8", int8, int8_gates), ("qat", qat, qat_gates))
                  if model is not None}
    refusals, qualified = [], []
    for name, (model, gates) in candidates.items():
        label = LABELS[name]
        drop = fp32["accuracy"] - model["accuracy"]
        slower = [b for b in fp32["latency_ms"] if model["latency_ms"][b]["p50"] >= fp32["latency_ms"][b]["p50"]]
        failed = [gate for gate, _, _, passed in gates if not passed]
        if failed:
            refusals.append(f"{label} fails gate {', '.join(failed)}")
        elif drop > max_drop:
            refusals.append(f"{label} loses {drop:.4f} accuracy, more than int8_max_accuracy_drop {max_drop}")
        elif slower:
            refusals.append(f"{label} is not faster than FP32 at batch size {', '.join(map(str, slower))} (p50)")
        else:
            qualified.append(name)
    if not qualified:
        return "fp32", "; ".join(refusals)
    smallest = min(fp32["latency_ms"])
    best = max(qualified, key=lambda n: (candidates[n][0]["accuracy"], -candidates[n][0]["latency_ms"][smallest]["p50"]))
    others = [f"preferred to {LABELS[n]}" for n in qualified if n != best] + refusals
    return best, (f"{LABELS[best]} passes every gate, is faster at every batch size and within the accuracy limit"
                  + "".join(f"; {o}" for o in others))


def quantization_of(delivered: str, mode: str) -> str:
    """The delivered model's quantization (none, dynamic, static, qat), as its registry tag and ONNX metadata say."""
    if delivered == "fp32":
        return "none"
    return "static" if delivered == "int8" and mode == "qat" else mode


def side_by_side(quantization: dict, fp32: dict, int8: dict | None, qat: dict) -> dict:
    """FP32, PTQ static and QAT INT8 in one table: accuracy, size, p50 per batch size, and each INT8 model's
    prediction parity against its own PyTorch model (static: the FP32 student; QAT: its fake-quantized model)."""
    parity = quantization.get("parity", {})
    rows = {"fp32": (fp32, None), "static": (int8, parity.get("int8")), "qat": (qat, quantization["qat"]["parity"])}
    return {name: {"accuracy": model["accuracy"], "size_bytes": model["size_bytes"],
                   "p50_ms": {str(b): v["p50"] for b, v in model["latency_ms"].items()}, "parity": model_parity}
            for name, (model, model_parity) in rows.items() if model is not None}


def as_report(model: dict) -> dict:
    """A measured model as report.json holds it: its per-sample predictions go to `evaluation` only, its logits
    nowhere."""
    return {**{k: v for k, v in model.items() if k not in ("predictions", "logits")},
            "latency_ms": {str(b): v for b, v in model["latency_ms"].items()}}


DISAGREEMENTS_SHOWN = 16


def evaluation(y: np.ndarray, classes: list[str], student: dict, teacher: dict | None) -> dict:
    """report.json's `evaluation`, from the onnxruntime test predictions (kdpipe.deploy.predictions) of the
    delivered student and of the teacher: each one's confusion matrix (rows: true class, columns: predicted) and
    per-class accuracy (None for a class the test split lacks), and the test samples where the two predict
    different classes, the DISAGREEMENTS_SHOWN most telling first: ranked by the confidence of the model that is
    right (a confident right answer the other missed), then those both get wrong, by the larger confidence."""
    def scored(predicted: np.ndarray) -> dict:
        confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
        np.add.at(confusion, (y, predicted), 1)
        support = confusion.sum(1)
        return {"confusion": confusion.tolist(),
                "per_class_accuracy": [float(confusion[c, c] / n) if n else None for c, n in enumerate(support)]}

    out = {"classes": classes, "test_samples": len(y), "student": scored(student["predictions"]["predicted"])}
    if teacher is None:
        return out
    s, t = student["predictions"], teacher["predictions"]
    out["teacher"] = scored(t["predicted"])
    differ = np.flatnonzero(s["predicted"] != t["predicted"])
    right = np.where(t["predicted"] == y, t["confidence"], np.where(s["predicted"] == y, s["confidence"],
                                                                   np.maximum(s["confidence"], t["confidence"]) - 1))
    ranked = differ[np.argsort(-right[differ], kind="stable")][:DISAGREEMENTS_SHOWN]
    out["disagreement_count"] = len(differ)
    out["disagreements"] = [{"index": int(i), "label": int(y[i]), "student": int(s["predicted"][i]),
                             "teacher": int(t["predicted"][i]), "student_confidence": float(s["confidence"][i]),
                             "teacher_confidence": float(t["confidence"][i])} for i in ranked]
    return out


def model_metrics(model: dict) -> dict[str, float]:
    """The MLflow metrics of the delivered model's measurement."""
    return {"student/test_accuracy": model["accuracy"],
            **{f"latency_ms/p50_bs{b}": v["p50"] for b, v in model["latency_ms"].items()},
            **{f"latency_ms/p99_bs{b}": v["p99"] for b, v in model["latency_ms"].items()},
            **{f"throughput/bs{b}": v["throughput"] for b, v in model["latency_ms"].items()}}


class Validate(Stage):
    name = "validate"
    needs = (ExportResult,)
    produces = ValidateResult
    main_rank_only = True
    for_given_model = True

    def run(self, ctx) -> ValidateResult:
        cfg = ctx.pipeline.validation
        export = ctx.results[ExportResult]
        requested = resolve_providers(cfg.providers)
        _, dropped = available_providers(requested)
        x_test = inputs_for(export.onnx_path, ctx.data)
        y_test = ctx.data.y_test.cpu().numpy()
        chance = ChanceLevel.of(ctx.data.y_test)

        on_both = "openvino" in cfg.runtimes  # OpenVINO's parity compares with each student's onnxruntime logits
        fp32 = measure_model(export.onnx_path, cfg, x_test, y_test, keep_logits=on_both)
        fallback = [p for p in requested if p not in fp32["providers_used"]]
        for p in fallback:
            why = "not available in this onnxruntime" if p in dropped else "could not be initialized"
            ctx.progress.info(f"  warning: {p} was requested but is {why}; running on {', '.join(fp32['providers_used'])}")
        report: dict = {}
        teacher = None
        if export.teacher_onnx_path is not None:
            teacher = measure_teacher(ctx, cfg, x_test, y_test)
            report["teacher"] = {"onnx": as_report(teacher)}
        delivered, students = "fp32", {"fp32": fp32}
        if export.int8_onnx_path is not None or export.qat_onnx_path is not None:
            delivered, students, report["quantization"] = deliver(ctx, export, fp32, teacher, chance, x_test, y_test,
                                                                  keep_logits=on_both)
        measured = students[delivered]
        path = Path(measured["path"])
        quantization = quantization_of(delivered, ctx.pipeline.export.quantize)
        report["student"] = {"accuracy": measured["accuracy"], "chance_rate": chance.rate}
        report["onnx"] = {"path": measured["path"], "size_bytes": measured["size_bytes"],
                          "precision": "fp32" if delivered == "fp32" else "int8", "quantization": quantization}
        ctx.tracker.set_tags({"kdpipe.quantization": quantization})
        report["latency_ms"] = {str(b): v for b, v in measured["latency_ms"].items()}
        classes = ctx.data.provenance.get("classes") or [str(c) for c in range(ctx.data.num_classes)]
        report["evaluation"] = {**evaluation(y_test, classes, measured, teacher), "student_model": delivered}
        if teacher is not None:
            report["speedup_vs_teacher"] = {str(b): teacher["latency_ms"][b]["p50"] / measured["latency_ms"][b]["p50"]
                                            for b in cfg.batch_sizes}
        report["validate"] = {
            "providers_requested": cfg.providers, "providers_resolved": requested,
            "providers_used": measured["providers_used"], "providers_dropped": dropped, "provider_fallback": fallback,
            "io_binding": any(v["io_binding"] for v in measured["latency_ms"].values()),
            "session": session_settings(cfg),
        }
        ctx.tracker.log_metrics(model_metrics(measured))
        gates = [Gate(*g) for g in gates_for(measured, teacher, cfg, chance)]
        for gate in gates:
            if gate.name == "above_chance" and not gate.passed:
                ctx.progress.info(f"  above_chance: {chance.verdict('student', measured['accuracy'], gate.limit)}")
        if on_both:
            section, openvino_gates = on_openvino(ctx, export, students, delivered, chance, x_test, y_test)
            report["runtimes"] = {"openvino": section}
            gates += openvino_gates
        return ValidateResult(report=report, gates=tuple(gates), onnx_path=path, accuracy=measured["accuracy"],
                              latency_ms=report["latency_ms"], size_bytes=measured["size_bytes"],
                              precision=report["onnx"]["precision"], quantization=quantization,
                              providers_used=measured["providers_used"])


def deliver(ctx, export: ExportResult, fp32: dict, teacher: dict | None, chance: ChanceLevel, x_test: np.ndarray,
            y_test: np.ndarray, keep_logits: bool) -> tuple[str, dict[str, dict], dict]:
    """Measure the INT8 candidates and choose the model to deliver; returns (fp32 | int8 | qat, each student as
    measured by its name, report.json's quantization part)."""
    cfg = ctx.pipeline.validation
    quantization: dict = {}
    qat = int8 = None
    if export.qat_onnx_path is not None:
        qat = measure_model(export.qat_onnx_path, cfg, x_test, y_test, keep_logits=keep_logits)
        quantization["qat"] = as_report(qat)
    if export.int8_onnx_path is not None:
        int8 = measure_model(export.int8_onnx_path, cfg, x_test, y_test, keep_logits=keep_logits)
    delivered, reason = choose_delivery(ctx.pipeline.export.deliver, fp32, int8,
                                        gates_for(int8, teacher, cfg, chance) if int8 else (),
                                        ctx.pipeline.export.int8_max_accuracy_drop,
                                        qat, gates_for(qat, teacher, cfg, chance) if qat else ())
    if int8 is not None:
        quantization.update({
            "int8": as_report(int8),
            "accuracy_drop": fp32["accuracy"] - int8["accuracy"],
            "size_ratio": int8["size_bytes"] / fp32["size_bytes"],
            "speedup_by_batch_size": {str(b): fp32["latency_ms"][b]["p50"] / int8["latency_ms"][b]["p50"]
                                      for b in cfg.batch_sizes}})
    quantization.update({"fp32": as_report(fp32), "delivered": delivered, "reason": reason})
    if qat is not None:
        quantization["compared"] = side_by_side(export.report["quantization"], fp32, int8, qat)
    ctx.progress.info(f"  delivering {delivered.upper()}: {reason}")
    measured = {name: model for name, model in (("fp32", fp32), ("int8", int8), ("qat", qat)) if model is not None}
    return delivered, measured, quantization


def on_openvino(ctx, export: ExportResult, students: dict[str, dict], delivered: str, chance: ChanceLevel,
                x_test: np.ndarray, y_test: np.ndarray) -> tuple[dict, list[Gate]]:
    """Every model onnxruntime measured (`students` as measured, with their logits), measured in OpenVINO with its
    parity against onnxruntime's logits; returns report.json's runtimes.openvino and the gates on OpenVINO's
    measurement of the delivered model (gates_for's, and runtime_agreement_min), each named openvino/GATE."""
    cfg = ctx.pipeline.validation
    measures = {name: (lambda m=m: measure_openvino(Path(m["path"]), cfg, x_test, y_test, m["logits"]))
                for name, m in students.items()}
    if export.teacher_onnx_path is not None:
        measures["teacher"] = lambda: measure_teacher_openvino(ctx, cfg, x_test, y_test)
    models = {}
    for name, measure in measures.items():
        try:
            models[name] = measure()
        except CannotRun as exc:  # what this runtime cannot run is reported; the others are still measured
            models[name] = {"error": str(exc)}
            ctx.progress.info(f"  warning: openvino cannot run the {name} model: {exc}")
    shared = {"version": import_openvino().get_version(), "device": DEVICE}
    model = models[delivered]
    if "error" in model:  # the model that ships does not run here: that is the gate
        section = {**shared, "delivered": delivered, **models}
        return section, [Gate("openvino/runs_delivered_model", 0.0, 1.0, False)]
    teacher = models.get("teacher")
    gates = [Gate(f"openvino/{name}", *rest) for name, *rest in gates_for(
        model, teacher if teacher is not None and "error" not in teacher else None, cfg, chance)]
    parity = model["parity_vs_onnxruntime"]
    if cfg.gates.runtime_agreement_min is not None:
        limit = cfg.gates.runtime_agreement_min
        gates.append(Gate("openvino/runtime_agreement_min", parity["agreement"], limit, parity["agreement"] >= limit))
    ctx.tracker.log_metrics({f"openvino/{k}": v for k, v in model_metrics(model).items()}
                            | {"openvino/agreement": parity["agreement"], "openvino/max_abs_diff": parity["max_abs_diff"]})
    smallest = min(cfg.batch_sizes)
    ctx.progress.info(f"  openvino: {delivered.upper()} accuracy {model['accuracy']:.4f}, "
                      f"p50 {model['latency_ms'][smallest]['p50']:.4g} ms at batch size {smallest}, "
                      f"{parity['agreement']:.2%} of test predictions as onnxruntime's")
    per_model = ("version", "device", "settings", "runtime")  # the same for every model: once, beside them
    section = {**shared, "settings": model["settings"], "delivered": delivered,
               **{name: m if "error" in m else {k: v for k, v in as_report(m).items() if k not in per_model}
                  for name, m in models.items()}}
    return section, gates
