"""export: torch → one self-contained ONNX file per model, parity-checked against PyTorch on validation inputs.

The student is exported and its parity is a gate; the teacher is exported too
(cached by content, it is frozen) so that validate measures both with the same
onnxruntime settings; with `export.quantize`, an INT8 student is built as well.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdpipe import __version__
from kdpipe.cache_store import lookup, store
from kdpipe.deploy import (build_ptq, calibration_batches, example_inputs, export_qat_graph, export_student_graph,
                           inputs_for)
from kdpipe.int8_budget import fit_budget
from kdpipe.models.adapter import for_export, graph_inputs, input_contract
from kdpipe.onnx_export import add_metadata, export_onnx, takes_uint8
from kdpipe.onnx_runtime import session, tile_batch
from kdpipe.quantize import QuantizationFailed
from kdpipe.inference import accuracy
from kdpipe.qat import QUANTIZATION_KEY, fine_tune, prediction_parity
from kdpipe.fingerprint import fingerprint
from kdpipe.results import ExportResult, Gate, Stage, TeacherResult

ODD_BATCH = 7  # an odd size that is neither 1 nor a power of two, to catch shape-specialized graphs


def parity(model: nn.Module, onnx_path: Path, x_val: torch.Tensor, batch_sizes: list[int]) -> dict[int, dict[str, float]]:
    """PyTorch vs onnxruntime logits per batch size, on real validation inputs (repeated when a batch needs more).

    max_abs_diff is the largest absolute logit difference; max_rel_diff divides each sample's largest difference
    by its largest absolute logit, which stays meaningful where single logits are near zero.
    """
    sess = session(onnx_path)
    name = sess.get_inputs()[0].name
    model = model.eval().cpu()
    x_all = x_val.cpu().numpy()
    diffs = {}
    for b in batch_sizes:
        x = tile_batch(x_all, b)
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        diff = np.abs(sess.run(None, {name: x})[0] - expected)
        scale = np.abs(expected).max(axis=1).clip(min=np.finfo(np.float32).tiny)
        diffs[b] = {"max_abs_diff": float(diff.max()), "max_rel_diff": float((diff.max(axis=1) / scale).max())}
    return diffs


def parity_batch_sizes(ctx) -> list[int]:
    """1, 2, an odd size, the largest validated batch and the whole validation split in one batch."""
    return sorted({1, 2, ODD_BATCH, max(ctx.pipeline.validation.batch_sizes), len(ctx.data.x_val)})


def export_teacher(ctx, example: torch.Tensor, graph_input: str) -> Path:
    """teacher.onnx in the run directory, from the cache when this exact teacher was exported before."""
    cfg = ctx.pipeline.export
    teacher = for_export(ctx.teacher.to("cpu"), ctx.data, graph_input)
    contract = input_contract(ctx.data, graph_input)  # a uint8 graph holds the normalization: part of the key
    key = fingerprint(teacher, 'onnx', cfg.opset, cfg.dynamic_batch, __version__, repr(teacher), sorted(contract.items()))
    cached = ctx.cache_dir / "teacher-onnx" / f"{key}.onnx"
    path = ctx.run_dir / "teacher.onnx"
    if not lookup(cached, lambda line: ctx.progress.info(f"  {line}")):
        store(cached, lambda tmp: export_onnx(teacher, example, tmp, cfg.opset, cfg.dynamic_batch, contract))
    shutil.copyfile(cached, path)
    return path


class Export(Stage):
    name = "export"
    needs = (TeacherResult,)
    produces = ExportResult
    main_rank_only = True
    for_given_model = True

    def run(self, ctx) -> ExportResult:
        cfg = ctx.pipeline.export
        given = ctx.given_onnx  # `kdpipe validate MODEL.onnx`: nothing to export or compare
        # The teacher's graph takes what the delivered (or given) model takes, so both are fed the same test inputs.
        graph_input = cfg.input if given is None else "uint8" if takes_uint8(given) else "float"
        x_val = graph_inputs(ctx.data, "val", graph_input).cpu()  # the stored uint8 images for `input: uint8`
        example = example_inputs(ctx.data, graph_input)
        batch_sizes = parity_batch_sizes(ctx) if cfg.dynamic_batch else [len(example)]
        if given is None:
            result = export_student(ctx, x_val, batch_sizes, graph_input)
        else:
            path = Path(given)
            result = ExportResult(onnx_path=path, report={"onnx": {
                "path": str(path), "opset": None, "size_bytes": path.stat().st_size, "dynamic_batch": None,
                "parity_max_abs_diff": None, "parity_max_rel_diff": None, "parity_by_batch_size": {}}})
        if ctx.teacher is not None:
            teacher_path = export_teacher(ctx, example, graph_input)
            teacher_diffs = parity(for_export(ctx.teacher, ctx.data, graph_input), teacher_path, x_val, batch_sizes)
            ctx.teacher.to(ctx.device)
            result = replace(result, teacher_onnx_path=teacher_path, report={**result.report, "teacher": {"onnx": {
                "path": str(teacher_path), "size_bytes": teacher_path.stat().st_size,
                "parity_max_abs_diff": max(d["max_abs_diff"] for d in teacher_diffs.values())}}})
        if cfg.quantize != "none" and given is None:
            result = export_int8(ctx, result, x_val, graph_input)
        return result


def export_student(ctx, x_val: torch.Tensor, batch_sizes: list[int], graph_input: str) -> ExportResult:
    """student.onnx, with its parity against PyTorch as the parity_atol gate."""
    cfg = ctx.pipeline.export
    path = ctx.run_dir / "student.onnx"
    student = ctx.student.to("cpu")
    contract = export_student_graph(student, ctx.data, cfg, path, graph_input)
    diffs = parity(for_export(student, ctx.data, graph_input), path, x_val, batch_sizes)
    ctx.student = student.to(ctx.device)
    worst_abs = max(d["max_abs_diff"] for d in diffs.values())
    atol = ctx.pipeline.validation.gates.parity_atol or cfg.atol
    report = {"onnx": {"path": str(path), "opset": cfg.opset, "size_bytes": path.stat().st_size,
                       "dynamic_batch": cfg.dynamic_batch, "input": contract["kdpipe.input"],
                       "parity_max_abs_diff": worst_abs,
                       "parity_max_rel_diff": max(d["max_rel_diff"] for d in diffs.values()),
                       "parity_by_batch_size": {str(b): d for b, d in diffs.items()}}}
    return ExportResult(onnx_path=path, input=contract["kdpipe.input"], report=report,
                        gates=(Gate("parity_atol", worst_abs, atol, worst_abs <= atol),))


def export_int8(ctx, result: ExportResult, x_val: torch.Tensor, graph_input: str) -> ExportResult:
    """student.int8.onnx (post-training quantization) and, with `quantize: qat`, student.qat.onnx."""
    cfg = ctx.pipeline.export
    int8_path = ctx.run_dir / "student.int8.onnx"
    ptq_mode = "static" if cfg.quantize == "qat" else cfg.quantize  # qat is compared with static PTQ
    batch_size, seed = ctx.pipeline.data.batch_size, ctx.pipeline.seed
    graph_calibration = (calibration_batches(ctx.data, cfg, batch_size, seed, graph_input) if ptq_mode == "static"
                         else None)
    quantization = {
        "mode": cfg.quantize, "path": str(int8_path), "deliver": cfg.deliver,
        "calibration_samples": sum(len(b) for b in graph_calibration) if graph_calibration else 0,
        "calibration_method": calibration_method(cfg) if graph_calibration else None,
        "weight_bits": cfg.int8_weight_bits}
    if cfg.quantize == "qat":
        quantization["qat"], qat_path = export_qat(ctx, calibration_batches(ctx.data, cfg, batch_size, seed), x_val,
                                                   graph_input)
        result = replace(result, qat_onnx_path=qat_path)
    result = replace(result, report={**result.report, "quantization": quantization})
    try:
        if cfg.int8_budget is None:
            pre_process = build_ptq(result.onnx_path, int8_path, ptq_mode, graph_calibration, cfg)
        else:
            quantization["budget"] = budget = build_within_budget(ctx, result.onnx_path, int8_path, graph_calibration)
            pre_process = budget["pre_process"]
    except QuantizationFailed as exc:
        if cfg.deliver == "int8" and cfg.quantize != "qat":
            raise  # the user asked for this INT8 model: the run fails (exit 3), one line naming the cause
        # INT8 is optional under `best`: the FP32 model ships and the report says why.
        quantization.update({"path": None, "built": False, "error": str(exc), "delivered": "fp32",
                             "reason": f"INT8 build failed: {exc}"})
        ctx.tracker.set_tags({"kdpipe.int8": "failed", "kdpipe.int8_error": str(exc)[:500]})
        ctx.progress.info(f"  warning: INT8 build failed, delivering FP32: {exc}")
        return result
    exported = for_export(ctx.student.to("cpu"), ctx.data, graph_input)
    quantization.update({"built": True, "pre_process": pre_process, "parity": {
        "int8": prediction_parity(exported, int8_path, x_val, "fp32 PyTorch student")}})
    ctx.student.to(ctx.device)
    budget = quantization.get("budget")
    if budget is not None and not budget["within_budget"] and cfg.deliver != "fp32":
        reason = (f"static INT8 loses {budget['drop_after']:.4f} validation accuracy with "
                  f"{len(budget['excluded_nodes'])} node(s) kept in float, over export.int8_budget's "
                  f"{budget['budget']['max_accuracy_drop']:g}")
        if cfg.deliver == "int8" and cfg.quantize != "qat":
            raise QuantizationFailed(reason)  # the user asked for this INT8 model: the run fails, as a failed build
        if cfg.deliver == "best":
            # Over budget, the static model is not a candidate: FP32 ships (or, with qat, the better of FP32 and QAT).
            quantization.update({"delivered": "fp32", "reason": reason})
            ctx.progress.info(f"  warning: {reason}; delivering FP32")
            return result
    return replace(result, int8_onnx_path=int8_path)


def build_within_budget(ctx, fp32_path: Path, int8_path: Path, calibration: list[np.ndarray]) -> dict:
    """Static INT8 within export.int8_budget (kdpipe.int8_budget), marked static like build_ptq's; returns
    report.json's quantization.budget, with how the graph was pre-processed. The nodes kept in float and the
    accuracy drops go to MLflow."""
    budget = fit_budget(fp32_path, int8_path, calibration, ctx.pipeline.export,
                        inputs_for(fp32_path, ctx.data, "val"), ctx.data.y_val.cpu().numpy(),
                        ctx.pipeline.validation)
    add_metadata(int8_path, {QUANTIZATION_KEY: "static"})
    ctx.tracker.set_tags({"kdpipe.int8_excluded_nodes": ",".join(budget["excluded_nodes"])})
    ctx.tracker.log_metrics({"int8_budget/drop_before": budget["drop_before"],
                             "int8_budget/drop_after": budget["drop_after"]})
    kept = ", ".join(budget["excluded_nodes"]) or "none"
    ctx.progress.info(f"  INT8 budget: validation accuracy drop {budget['drop_before']:.4f} → "
                      f"{budget['drop_after']:.4f}, kept in float: {kept}")
    return budget


def calibration_method(cfg) -> str:
    """How static quantization set the activation ranges, as the report says it (`percentile 99.9`)."""
    if cfg.calibration_method == "percentile":
        return f"percentile {cfg.calibration_percentile:g}"
    return cfg.calibration_method


def export_qat(ctx, calibration: list[np.ndarray], x_val: torch.Tensor, graph_input: str) -> tuple[dict, Path]:
    """The student fine-tuned fake-quantized against the teacher (kdpipe.qat), exported as QDQ ONNX and compared
    with its own fake-quantized PyTorch model on the validation split (`x_val`: as the graph takes it). Returns
    report.json's quantization.qat and the graph's path."""
    cfg = ctx.pipeline.export
    path = ctx.run_dir / "student.qat.onnx"
    history: dict = {}  # the fine-tuning's learning curves, which report.html draws after the distillation's
    fake_quantized, trainer = fine_tune(ctx.pipeline, ctx.student, ctx.teacher, ctx.data, calibration,
                                        ctx.trainer_options("qat"), ctx.log_epoch_into(history))
    export_qat_graph(fake_quantized, ctx.data, cfg, path, graph_input)
    x_test, y_test = ctx.data.x_test, ctx.data.y_test
    return {"path": str(path), "epochs": cfg.qat_epochs, "timing": trainer.timing_summary(), "history": history,
            "accuracy_torch": accuracy(fake_quantized, x_test.to(ctx.device), y_test.to(ctx.device)),
            "parity": prediction_parity(for_export(fake_quantized, ctx.data, graph_input), path, x_val,
                                        "fake-quantized PyTorch student")}, path
