r"""FP32 vs post-training static INT8 vs quantization-aware distillation (QAT) INT8, over several seeds.

Each seed runs the whole pipeline once with `export.quantize: qat` (which builds the static PTQ model as well),
so the three models come from the same distilled student and are validated by the same onnxruntime sessions:
test accuracy (mean ± std over seeds), size, and p50 latency at batch 1 and 64 (median over seeds).

    .venv/bin/python benchmarks/quantize.py                                   # the default benchmark student
    .venv/bin/python benchmarks/quantize.py --seeds 0 1 2 --set export.qat_epochs=5
    # the 32×32 RGB digits folder, as in docs/tutorials/qat.md:
    .venv/bin/python benchmarks/quantize.py --data folder --student '{arch: mobilenetv2}' \
        --set 'teacher.model={arch: mlp, width: 256, depth: 2}' --set distill.epochs=10
    # a timm student that static PTQ loses accuracy on (the LCNet table of docs/tutorials/qat.md):
    .venv/bin/python benchmarks/quantize.py --data folder --student "{arch: 'timm:lcnet_050'}" \
        --set 'teacher.model={arch: mlp, width: 256, depth: 2}' --set distill.epochs=60 --set export.qat_epochs=10
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import onnxruntime
import torch

from kdpipe.runner import run_pipeline

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("fp32", "static", "qat")
# The smallest of the students tried (4 and 8 channels): few channels leave the least redundancy to absorb the
# rounding of weights and per-tensor 8-bit activations (static PTQ still lost only 0.09 points on it, see
# docs/tutorials/qat.md).
STUDENT = "{arch: cnn, width: 4, depth: 2}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", type=Path, default=ROOT / "pipelines" / "digits.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data", choices=["digits", "folder"], default="digits",
                        help="digits: the pipeline's data; folder: the 1,797 digits written as 64×64 RGB JPEG class "
                             "folders (benchmarks/data.py) and read at 32×32")
    parser.add_argument("--student", default=STUDENT, help="the student.model mapping, in YAML flow style")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="pipeline override key=value")
    args = parser.parse_args()

    # Every model is measured whatever the gates say; nothing is registered.
    overrides = [f"student.model={args.student}", "export.quantize=qat", "export.deliver=fp32", "register=null", "validate.gates={}",
                 *args.overrides]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        if args.data == "folder":
            sys.path.insert(0, str(Path(__file__).parent))
            from data import write_images  # benchmarks/data.py

            folder = write_images(Path(tmp) / "digits", 1797)
            overrides = ["data.source=imagefolder", f"data.path={folder}", "data.image_size=32", *overrides]
        shown = " ".join(overrides).replace(f"data.path={Path(tmp) / 'digits'}", "data.path=<digits folder>")
        for seed in args.seeds:
            _, report = run_pipeline(args.pipeline, [*overrides, f"seed={seed}"], Path(tmp) / "runs")
            compared = report["quantization"]["compared"]
            rows.append(compared)
            print(f"seed {seed}: " + "  ".join(f"{m} {compared[m]['accuracy']:.4f}" for m in MODELS), flush=True)

    print(f"\n{args.pipeline.name} with {shown}; {len(args.seeds)} seeds; torch {torch.__version__}, "
          f"onnxruntime {onnxruntime.__version__}, {os.cpu_count()} CPU cores")
    print(f"{'model':<8} {'test accuracy %':>16} {'vs FP32':>8} {'size KB':>8} {'p50 ms bs1':>11} {'p50 ms bs64':>12} "
          f"{'parity':>7}")
    fp32_mean = statistics.mean(r["fp32"]["accuracy"] for r in rows) * 100
    for m in MODELS:
        acc = [r[m]["accuracy"] * 100 for r in rows]
        mean, std = statistics.mean(acc), statistics.stdev(acc) if len(acc) > 1 else 0.0
        p50 = {b: statistics.median(r[m]["p50_ms"][b] for r in rows) for b in ("1", "64")}
        parity = [r[m]["parity"]["agreement"] for r in rows if r[m]["parity"]]
        shown = f"{min(parity) * 100:.1f}%" if parity else "—"
        print(f"{m:<8} {mean:>9.2f} ± {std:4.2f} {mean - fp32_mean:>+8.2f} {rows[0][m]['size_bytes'] / 1e3:>8.1f} "
              f"{p50['1']:>11.4f} {p50['64']:>12.4f} {shown:>7}")
    print("parity: the lowest share (over seeds) of validation samples whose predicted class matches the model's own "
          "PyTorch model (static: the FP32 student; qat: its fake-quantized model)")


if __name__ == "__main__":
    main()
