"""Deployment, measured side by side in one process on the same real test inputs. Two parts:

candidates: the student's deployable models, FP32, full static INT8, mixed INT8 (export.int8_budget: the nodes
  whose quantization costs the most validation accuracy kept in float) and QAT INT8, each on onnxruntime and on
  OpenVINO: test accuracy, p50/p90/p99 at batch 1 and 64, file size, and OpenVINO's agreement with onnxruntime.
  By default the student is tests/fixture_models.py's OutlierChannelCNN (the zoo CNN with one channel of its
  first block 1000× larger and the next convolution reading it 1000× weaker: the same function, an activation
  range per-tensor INT8 handles badly), built to show what the budget does; `--student` takes another.
latency: student ONNX vs student PyTorch eager at batch 1 and 64 (target: ONNX ≤ 0.5× eager at batch 1),
  teacher ONNX vs student ONNX (the compression speed-up), INT8 vs FP32 student ONNX.

Each part runs the pipeline once (in a temporary directory with its own MLflow store) to get trained models, then
times every model the same way: warm-up, then `--runs` single calls (validate's timing: kdpipe.onnx_runtime).

    .venv/bin/python benchmarks/deploy.py                       # both parts (OpenVINO: pip install 'kdpipe[openvino]')
    .venv/bin/python benchmarks/deploy.py --part candidates --student '{arch: cnn, width: 8, depth: 2}'
    .venv/bin/python benchmarks/deploy.py --part latency --set distill.epochs=5 --runs 500
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

from kdpipe.config import ValidateConfig
from kdpipe.deploy import build_ptq, calibration_batches, inputs_for, measure_model
from kdpipe.onnx_runtime import configured_session, latency_stats, predict, session, tile_batch, time_calls
from kdpipe.runner import prepare, run_pipeline

ROOT = Path(__file__).resolve().parent.parent
BATCH_SIZES = (1, 64)
OUTLIER_STUDENT = f"{{entrypoint: '{ROOT / 'tests' / 'fixture_models.py'}:outlier_cnn', kwargs: {{depth: 3}}}}"
CANDIDATES = {"fp32": "student.onnx", "static": "student.static.onnx", "mixed": "student.int8.onnx",
              "qat": "student.qat.onnx"}


def eager_latency(model: torch.nn.Module, x, batch_size: int, warmup: int, runs: int) -> dict:
    batch = torch.from_numpy(tile_batch(x, batch_size))
    model.eval()
    with torch.inference_mode():
        return latency_stats(time_calls(lambda: model(batch), warmup, runs), batch_size)


def onnx_latency(sess, x, batch_size: int, warmup: int, runs: int) -> dict:
    batch = tile_batch(x, batch_size)
    name = sess.get_inputs()[0].name
    return latency_stats(time_calls(lambda: sess.run(None, {name: batch}), warmup, runs), batch_size)


def candidates(args) -> None:
    """FP32, static, mixed and QAT INT8 × onnxruntime and OpenVINO, from one run of the pipeline."""
    from kdpipe.openvino_runtime import CannotRun, import_openvino, measure_openvino

    try:
        with_openvino = bool(import_openvino())
    except RuntimeError:
        with_openvino = False
    # The run builds the QAT model and, as its static comparison, the mixed one within a one-point budget; the
    # full static model is built here from the same FP32 graph and calibration by the run's own deploy path.
    overrides = [*args.overrides, f"student.model={args.student}", "export.quantize=qat", "export.deliver=fp32",
                 f"export.int8_budget={{max_accuracy_drop: {args.budget}}}", "register=null", "validate.gates={}"]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        _, report = run_pipeline(args.pipeline, overrides, Path(tmp) / "runs")
        run_dir = Path(report["run_dir"])
        prepared = prepare(run_dir / "pipeline.yaml", [])
        pipeline, data = prepared.pipeline, prepared.data
        export = pipeline.export
        build_ptq(run_dir / CANDIDATES["fp32"], run_dir / CANDIDATES["static"], "static",
                  calibration_batches(data, export, pipeline.data.batch_size, pipeline.seed, export.input), export)
        cfg = ValidateConfig(batch_sizes=list(BATCH_SIZES), warmup=args.warmup, runs=args.runs,
                             budget_s=args.budget_s, threads=pipeline.validation.threads)
        y = data.y_test.cpu().numpy()
        rows = []
        for name, file in CANDIDATES.items():
            path = run_dir / file
            x = inputs_for(path, data)
            measured = {"onnxruntime": measure_model(path, cfg, x, y)}
            if with_openvino:
                try:
                    measured["openvino"] = measure_openvino(path, cfg, x, y, predict(session(path), x))
                except CannotRun as exc:  # a graph OpenVINO cannot compile is a finding, not the end of the table
                    measured["openvino"] = {"error": str(exc)}
            rows += [(name, runtime, m) for runtime, m in measured.items()]
        budget = report["quantization"]["budget"]

    print(f"pipeline {args.pipeline.name}, student {args.student}; torch {torch.__version__}; "
          f"{args.runs} timed calls after {args.warmup} warm-up, at most {args.budget_s} s per model and batch size"
          f"{'' if with_openvino else '; OpenVINO not installed (pip install kdpipe[openvino])'}")
    print(f"mixed: export.int8_budget {args.budget}: validation accuracy drop {budget['drop_before']:.4f} in full "
          f"static INT8 → {budget['drop_after']:.4f} with {', '.join(budget['excluded_nodes']) or 'no node'} in float")
    header = f"{'model':<8}{'runtime':<13}{'accuracy %':>11}{'size KB':>9}"
    header += "".join(f"{'p' + q + ' bs' + str(b):>11}" for b in BATCH_SIZES for q in ("50", "90", "99"))
    print(header + f"{'agrees w/ ORT':>15}")
    for name, runtime, m in rows:
        if "error" in m:
            print(f"{name:<8}{runtime:<13}cannot run it: {m['error']}")
            continue
        line = f"{name:<8}{runtime:<13}{100 * m['accuracy']:>11.2f}{m['size_bytes'] / 1e3:>9.1f}"
        line += "".join(f"{m['latency_ms'][b]['p' + q]:>11.4f}" for b in BATCH_SIZES for q in ("50", "90", "99"))
        parity = m.get("parity_vs_onnxruntime")
        print(line + (f"{100 * parity['agreement']:>14.2f}%" if parity else f"{'—':>15}"))


def latency(args) -> None:
    # The benchmark compares INT8 with FP32 whatever the pipeline says; gates must not stop it.
    overrides = [*args.overrides, "export.quantize=static", "export.deliver=fp32", "register=null",
                 "validate.gates={}"]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        _, report = run_pipeline(args.pipeline, overrides, Path(tmp) / "runs")
        run_dir = Path(report["run_dir"])
        prepared = prepare(args.pipeline, overrides)
        student, teacher = prepared.student, prepared.teacher
        if teacher is None:
            raise SystemExit("the benchmark compares against the teacher: the pipeline needs a teacher section")
        student.load_state_dict(torch.load(run_dir / "student.pt", weights_only=True)["student"])
        teacher.load_state_dict(torch.load(run_dir / "teacher.pt", weights_only=True))
        cfg = prepared.pipeline.validation
        sessions = {name: configured_session(run_dir / f"{name}.onnx", cfg)
                    for name in ("student", "student.int8", "teacher")}
        x = prepared.data.x_test.numpy()
        y = prepared.data.y_test.numpy()
        sizes = {name: (run_dir / f"{name}.onnx").stat().st_size for name in sessions}
        accuracy = {name: float((predict(sess, x).argmax(1) == y).mean()) for name, sess in sessions.items()}

        lat: dict[tuple[str, int], dict] = {}
        for b in BATCH_SIZES:
            lat["student eager", b] = eager_latency(student, x, b, args.warmup, args.runs)
            lat["student onnx fp32", b] = onnx_latency(sessions["student"], x, b, args.warmup, args.runs)
            lat["student onnx int8", b] = onnx_latency(sessions["student.int8"], x, b, args.warmup, args.runs)
            lat["teacher onnx fp32", b] = onnx_latency(sessions["teacher"], x, b, args.warmup, args.runs)
            lat["teacher eager", b] = eager_latency(teacher, x, b, args.warmup, args.runs)

    print(f"pipeline {args.pipeline.name}; torch {torch.__version__} threads {torch.get_num_threads()}; "
          f"onnxruntime providers {sessions['student'].get_providers()}, intra-op threads {cfg.threads or 'default'}; "
          f"{args.runs} timed calls after {args.warmup} warm-up")
    print(f"{'model':<20}{'batch':>6}{'p50 ms':>10}{'p99 ms':>10}{'samples/s':>12}")
    for (name, b), s in lat.items():
        print(f"{name:<20}{b:>6}{s['p50']:>10.4f}{s['p99']:>10.4f}{s['throughput']:>12.0f}")

    def ratio(a: str, b: str, batch: int) -> float:
        return lat[a, batch]["p50"] / lat[b, batch]["p50"]

    print("\nratios of p50 latency")
    for b in BATCH_SIZES:
        onnx_vs_eager = ratio("student onnx fp32", "student eager", b)
        target = f"  (target ≤ 0.5: {'met' if onnx_vs_eager <= 0.5 else 'NOT met'})" if b == 1 else ""
        print(f"  batch {b:>2}: student ONNX / student eager   = {onnx_vs_eager:.3f}{target}")
        print(f"  batch {b:>2}: teacher ONNX / student ONNX    = {ratio('teacher onnx fp32', 'student onnx fp32', b):.2f}×"
              " speed-up from compression")
        print(f"  batch {b:>2}: student INT8 / student FP32    = {ratio('student onnx int8', 'student onnx fp32', b):.3f}"
              f"  ({'INT8 faster' if ratio('student onnx int8', 'student onnx fp32', b) < 1 else 'INT8 slower'})")
    print(f"\naccuracy  FP32 {accuracy['student']:.4f}  INT8 {accuracy['student.int8']:.4f}  teacher {accuracy['teacher']:.4f}")
    print(f"size      FP32 {sizes['student']} B  INT8 {sizes['student.int8']} B "
          f"({sizes['student.int8'] / sizes['student']:.2f}×)  teacher {sizes['teacher']} B")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["all", "candidates", "latency"], default="all")
    parser.add_argument("--pipeline", type=Path, default=ROOT / "pipelines" / "digits.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="pipeline override key=value")
    parser.add_argument("--student", default=OUTLIER_STUDENT, help="candidates: the student.model to deploy")
    parser.add_argument("--budget", type=float, default=0.01, help="candidates: export.int8_budget.max_accuracy_drop")
    parser.add_argument("--runs", type=int, default=300, help="timed calls per model and batch size")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--budget-s", type=float, default=10.0, help="candidates: seconds per model and batch size")
    args = parser.parse_args()
    if args.part in ("all", "candidates"):
        candidates(args)
    if args.part in ("all", "latency"):
        latency(args)


if __name__ == "__main__":
    main()
