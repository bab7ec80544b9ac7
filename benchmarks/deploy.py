"""Deployment latency, measured side by side in one process on the same real test inputs:

  student ONNX vs student PyTorch eager at batch 1 and 64 (target: ONNX ≤ 0.5× eager at batch 1),
  teacher ONNX vs student ONNX (the compression speed-up), INT8 vs FP32 student ONNX.

Runs the pipeline once (in a temporary directory with its own MLflow store) to get trained models, then times
every model the same way: warm-up, then `--runs` single calls, p50/p99 and throughput.

    .venv/bin/python benchmarks/deploy.py                       # the default pipeline
    .venv/bin/python benchmarks/deploy.py --set distill.epochs=5 --runs 500
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

from kdpipe.onnx_runtime import configured_session, latency_stats, predict, tile_batch, time_calls
from kdpipe.runner import prepare, run_pipeline

ROOT = Path(__file__).resolve().parent.parent
BATCH_SIZES = (1, 64)


def eager_latency(model: torch.nn.Module, x, batch_size: int, warmup: int, runs: int) -> dict:
    batch = torch.from_numpy(tile_batch(x, batch_size))
    model.eval()
    with torch.inference_mode():
        return latency_stats(time_calls(lambda: model(batch), warmup, runs), batch_size)


def onnx_latency(sess, x, batch_size: int, warmup: int, runs: int) -> dict:
    batch = tile_batch(x, batch_size)
    name = sess.get_inputs()[0].name
    return latency_stats(time_calls(lambda: sess.run(None, {name: batch}), warmup, runs), batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", type=Path, default=ROOT / "pipelines" / "digits.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="pipeline override key=value")
    parser.add_argument("--runs", type=int, default=300, help="timed calls per model and batch size")
    parser.add_argument("--warmup", type=int, default=30)
    args = parser.parse_args()

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


if __name__ == "__main__":
    main()
