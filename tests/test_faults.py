"""Fault cases as one table, each run through a real `python -m kdpipe` process.

To add a case, add a row to CHECK_FAULTS (fast: `kdpipe check`, run in parallel) or RUN_FAULTS (a real
`kdpipe run`, seconds each). A row says what the pipeline file is (edits to pipelines/digits.yaml, or the
whole file), the extra CLI arguments, the exit code, a regex for the line that says what happened (the first
stderr line; for a run that got past loading, whose progress comes first, the last one), and what the run
leaves behind: nothing at all, or a report.json with a given status (and, optionally, more checks on it).
No row may print a traceback; every exit-2 row prints exactly one line.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import FAST, LENIENT, PIPELINES, read_report, run_process, sets, tracked_nothing, write_pipeline

DIGITS = PIPELINES / "digits.yaml"
TEACHER_CACHE_SETTINGS = ["teacher.train.epochs=8"]  # the session's cached teacher (conftest FAST)
CROP_FLIP = [{"random_crop": {"padding": 1}}, "hflip"]


def alias_bomb() -> str:
    """'Billion laughs': nine levels of nine aliases, 9^9 values once expanded, aliased into `seed`."""
    levels = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    return "\n".join(levels) + "\n" + DIGITS.read_text().replace("seed: 0\n", "seed: *l8\n")


@dataclass(frozen=True)
class Fault:
    name: str
    edits: dict = field(default_factory=dict)  # dotted key -> value in pipelines/digits.yaml (None deletes the key)
    text: str | bytes | None = None  # the whole pipeline file instead of edits
    args: tuple[str, ...] = ()  # extra CLI arguments
    exit_code: int = 2
    line: str = ""  # regex (re.search) for the first stderr line (the last after a run started); {file}: the file's path
    leaves: str = "nothing"  # nothing: no run directory, no MLflow store; or the report.json status: passed / failed
    env: dict = field(default_factory=dict)  # extra environment for the process
    report: Callable[[dict, Path], None] | None = None  # more checks on report.json (and the working directory)

    def write(self, path: Path) -> Path:
        if self.text is not None:
            path.write_bytes(self.text if isinstance(self.text, bytes) else self.text.encode())
            return path
        return write_pipeline(path, DIGITS, **self.edits)


CHECK_FAULTS = [
    Fault("binary file", text=b"name: digits\x00\x01\x02\xff\n", line=r"^{file}: expected YAML text, got a binary file"),
    Fault("not UTF-8", text="name: caf\xe9\n".encode("latin-1"), line=r"^{file}: expected UTF-8 text, got byte 0xe9"),
    Fault("100k-deep nesting", text="name: " + "[" * 100_000 + "]" * 100_000 + "\n",
          line=r"^{file}: line 1, column \d+: nesting deeper than 64 levels"),
    Fault("alias bomb into seed", text=alias_bomb(), line=r"^{file}: line \d+, column \d+: more than 100000 values"),
    Fault("recursive alias", text="name: digits\nstudent: &s {model: *s}\n", line=r"^{file}: .*recursive"),
    Fault("file over 1 MiB", text=DIGITS.read_text() + "#" * (1 << 20) + "\n", line=r"^{file}: expected a YAML pipeline file of at most"),
    Fault("seed 1e20", edits={"seed": 10**20}, line=r"^{file}: seed: expected a value < 4294967296, got 100000000000000000000$"),
    Fault("width 1e6", edits={"student.model.width": 10**6}, line=r"^{file}: student.model.width: expected a value ≤ 16384"),
    Fault("threads 1e11", edits={"validate.threads": 10**11}, line=r"^{file}: validate.threads: expected a value ≤ 1024"),
    Fault("integer beyond 64 bits", edits={"teacher.model.kwargs": {"scale": 10**30}},
          line=r"^{file}: teacher.model.kwargs.scale: expected an integer that fits in 64 bits"),
    Fault("temperature inf", edits={"distill.params.temperature": float("inf")},
          line=r"^{file}: distill.params.temperature: expected a finite number, got inf$"),
    Fault("temperature 'inf' as a string", args=("--set", 'distill.params.temperature="inf"'),
          line=r"^{file}: distill.params.temperature: expected a finite number, got inf$"),
    Fault("lr inf", edits={"distill.optimizer.lr": float("inf")}, line=r"^{file}: distill.optimizer.lr: expected a finite number"),
    Fault("NaN where any float goes", edits={"student.model.kwargs": {"dropout": float("nan")}},
          line=r"^{file}: student.model.kwargs.dropout: expected a finite number, got nan$"),
    Fault("NaN under a bound", edits={"distill.params.alpha": float("nan")}, line=r"^{file}: distill.params.alpha: expected a value"),
    # In the file, not in --set: onnxruntime 1.30 segfaults on import when one argument is ~55,000 characters long.
    Fault("a huge value is not echoed whole", edits={"seed": [123456789] * 5000},
          line=r"^{file}: seed: expected an integer, got \[123456789, .{0,80}\.\.\.$"),
    Fault("budget_s 0", edits={"validate.budget_s": 0}, line=r"^{file}: validate.budget_s: expected a value > 0"),
    Fault("fewer than 5 timed runs", edits={"validate.runs": 3}, line=r"^{file}: validate.runs: expected a value ≥ 5"),
    Fault("CUDA required but absent", edits={"validate.providers": ["CUDAExecutionProvider"], "validate.require_provider": True},
          line=r"^{file}: validate.providers: CUDAExecutionProvider is not available in this onnxruntime and "
                     r"require_provider is true"),
    Fault("CUDA listed but absent: a warning, then ok", exit_code=0,
          edits={"validate.providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]},
          line=r"^{file}: warning: validate.providers: CUDAExecutionProvider is not available in this onnxruntime"),
    # Digits' ~1150 training images × 10^6 views need ~160 GB: more than any machine the tests run on has free.
    Fault("teacher_views 1e6", edits={"data.augment": CROP_FLIP, "distill.teacher_views": 10**6},
          line=r"^{file}: distill.teacher_views: expected at most \d+ views of the 1169 training images on this "
               r"machine, got 1000000: they need about \d+ GB \(augmentation parameters and the teacher's top-10 soft "
               r"labels\), all held in memory while the teacher pass makes them, and \S+ has [\d.]+ GB free$"),
    # at reads teacher features, so its teacher runs online on the augmented batch and no views are recorded.
    Fault("teacher_views 1e6 where the teacher runs online: ok", exit_code=0,
          edits={"data.augment": CROP_FLIP, "distill.method": "at", "distill.params": {},
                 "distill.teacher_views": 10**6}, line=r"^$"),
    Fault("random_crop padding 1e5", edits={"data.augment": [{"random_crop": {"padding": 100_000}}]},
          line=r"^{file}: data.augment.0.random_crop.padding: expected at most 7 for 8×8 images \(less than their "
               r"smaller side, so that every crop keeps part of the image\), got 100000$"),
    # Registry names MLflow refuses (or that break models:/ URIs): refused at check, not after training.
    Fault("alias latest", edits={"register.alias": "Latest"},
          line=r"^{file}: register.alias: 'latest' \(in any case\) is reserved by MLflow for a model's newest version, "
               r"got 'Latest'$"),
    Fault("alias v3", edits={"register.alias": "v3"},
          line=r"^{file}: register.alias: v followed by digits is reserved by MLflow for version numbers \(@v3 is "
               r"version 3\), got 'v3'$"),
    Fault("model name with /", edits={"register.model_name": "team/digits"},
          line=r"^{file}: register.model_name: '/' cannot be in a registered model name: MLflow refuses it "
               r"\(models:/NAME/VERSION\), got 'team/digits'$"),
    # YAML a parser takes but that does not say what was meant: a key given twice, a boolean where a number belongs.
    Fault("a key given twice at the top", text=DIGITS.read_text() + "seed: 3\n",
          line=r"^{file}: seed: line 24, column 1: given twice in one mapping \(first at line 4, column 1\); YAML "
               r"would silently keep the last$"),
    Fault("a key given twice in a section", text=DIGITS.read_text().replace("  epochs: 30\n", "  epochs: 30\n  epochs: 3\n"),
          line=r"^{file}: distill.epochs: line 16, column 3: given twice in one mapping \(first at line 15, column 3\)"),
    Fault("a key given twice in a --set value", args=("--set", "distill.optimizer={lr: 0.1, lr: 0.2}"),
          line=r"^{file}: distill.optimizer.lr: --set distill.optimizer: line 1, column 11: given twice in one mapping "
               r"\(first at line 1, column 2\)"),
    Fault("epochs true via --set", args=("--set", "distill.epochs=true"),
          line=r"^{file}: distill.epochs: expected an integer, not a boolean, got True$"),
    Fault("temperature true in the file", edits={"distill.params.temperature": True},
          line=r"^{file}: distill.params.temperature: expected a number, not a boolean, got True$"),
    Fault("a boolean in a list of batch sizes", edits={"validate.batch_sizes": [1, True]},
          line=r"^{file}: validate.batch_sizes.1: expected an integer, not a boolean, got True$"),
    Fault("a boolean as a search bound", edits={"search": {"trials": 2, "space": {"temperature": {"low": True, "high": 8.0}}}},
          line=r"^{file}: search.space.temperature.low: expected a number, not a boolean, got True$"),
    Fault("a boolean among a numeric parameter's choices",
          edits={"search": {"trials": 2, "space": {"temperature": {"choices": [True, 4.0]}}}},
          line=r"^{file}: search.space.temperature: True is not a valid temperature for method 'kd': expected a number, "
               r"not a boolean$"),
    Fault("cache directory under a file", env={"KDPIPE_CACHE_DIR": "/dev/null/kdpipe-cache"},
          line=r"^{file}: KDPIPE_CACHE_DIR: cannot write to the cache directory /dev/null/kdpipe-cache: /dev/null is not a "
               r"folder$"),
]

# Breaks onnxruntime's quantization pre-processing inside the kdpipe process: torch 2.11 exports a Range node on
# which symbolic shape inference asserts (issue 13.9); torch 2.13 here does not, so the third-party failure is
# injected where it happens. KDPIPE_TEST_BREAK: "symbolic" fails only symbolic shape inference, "all" every try.
BREAK_QUANT_PRE_PROCESS = '''
import os
import onnxruntime.quantization.shape_inference as shape_inference
real = shape_inference.quant_pre_process
def quant_pre_process(*args, skip_symbolic_shape=False, **kwargs):
    if os.environ["KDPIPE_TEST_BREAK"] == "all" or not skip_symbolic_shape:
        raise AssertionError()
    return real(*args, skip_symbolic_shape=skip_symbolic_shape, **kwargs)
shape_inference.quant_pre_process = quant_pre_process
'''


def int8_rebuilt_without_symbolic_shapes(report: dict, workdir: Path) -> None:
    quant = report["quantization"]
    assert quant["built"] and quant["pre_process"].startswith("ONNX shape inference only"), quant
    assert Path(quant["int8"]["path"]).is_file() and quant["int8"]["accuracy"] > 0.5


def fp32_shipped_after_int8_failed(report: dict, workdir: Path) -> None:
    from mlflow.tracking import MlflowClient

    quant = report["quantization"]
    assert quant["built"] is False and quant["delivered"] == "fp32" and quant["path"] is None, quant
    assert quant["reason"].startswith("INT8 build failed: pre-processing failed") and "AssertionError" in quant["error"]
    assert report["onnx"]["precision"] == "fp32" and not (Path(report["run_dir"]) / "student.int8.onnx").exists()
    tags = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").get_run(report["mlflow"]["run_id"]).data.tags
    assert tags["kdpipe.int8"] == "failed" and "AssertionError" in tags["kdpipe.int8_error"]


RUN = sets(*FAST, *LENIENT)
RUN_FAULTS = [
    Fault("seed 1e20 in a run: nothing trained", args=("--set", f"seed={10**20}"),
          line=r"^{file}: seed: expected a value < 4294967296"),
    Fault("threads 1e11 in a run: nothing trained", args=("--set", f"validate.threads={10**11}"),
          line=r"^{file}: validate.threads: expected a value ≤ 1024"),
    Fault("teacher_views 1e6 in a run: nothing trained", edits={"data.augment": CROP_FLIP},
          args=("--set", "distill.teacher_views=1000000"), line=r"^{file}: distill.teacher_views: expected at most"),
    Fault("epochs true in a run: nothing trained", args=("--set", "distill.epochs=true"),
          line=r"^{file}: distill.epochs: expected an integer, not a boolean"),
    Fault("cache directory under a file in a run: nothing trained", env={"KDPIPE_CACHE_DIR": "/dev/null/kdpipe-cache"},
          line=r"^{file}: KDPIPE_CACHE_DIR: cannot write to the cache directory /dev/null/kdpipe-cache"),
    Fault("INT8: symbolic shape inference asserts, retried without it", args=tuple(RUN), exit_code=0,
          env={"KDPIPE_TEST_BREAK": "symbolic"}, line=r"^status passed: student accuracy", leaves="passed",
          report=int8_rebuilt_without_symbolic_shapes),
    Fault("INT8 cannot be built, deliver best: FP32 ships", args=tuple(RUN), exit_code=0,
          env={"KDPIPE_TEST_BREAK": "all"}, line=r"^status passed: student accuracy", leaves="passed",
          report=fp32_shipped_after_int8_failed),
    Fault("INT8 cannot be built, deliver int8: the run fails", args=(*RUN, "--set", "export.deliver=int8"), exit_code=3,
          env={"KDPIPE_TEST_BREAK": "all"}, leaves="failed",
          line=r"^error: stage 'export' failed: QuantizationFailed: pre-processing failed, with and without "
                     r"symbolic shape inference: AssertionError; AssertionError$"),
]


def assert_outcome(fault: Fault, path: Path, proc: subprocess.CompletedProcess, workdir: Path) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == fault.exit_code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    said = (lines[0] if fault.leaves == "nothing" else lines[-1]) if lines else ""
    assert re.search(fault.line.replace("{file}", re.escape(str(path))), said), said[:500]
    if fault.exit_code == 2:
        assert len(lines) == 1 and proc.stdout == "", proc.stderr[-3000:]
    if fault.leaves == "nothing":
        assert not (workdir / "runs").exists() and tracked_nothing(workdir)
    else:
        report = read_report(proc.stdout if fault.exit_code != 3 else _report_path_of_failed_run(workdir))
        assert report["status"] == fault.leaves, report.get("error")
        if fault.report:
            fault.report(report, workdir)


def _report_path_of_failed_run(workdir: Path) -> str:
    """A run that failed at run time prints no path; its one run directory holds the report."""
    [report] = (workdir / "runs").glob("*/*/report.json")
    return str(report)


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    """Every CHECK_FAULTS row through `python -m kdpipe check`, two processes at a time (2 cores)."""
    root = tmp_path_factory.mktemp("faults")

    def check(index_fault):
        index, fault = index_fault
        workdir = root / f"case{index}"
        workdir.mkdir()
        path = fault.write(workdir / "pipeline.yaml")
        proc = run_process("check", path, *fault.args, env=fault.env, cwd=workdir)
        return path, proc, workdir

    with ThreadPoolExecutor(2) as pool:
        return dict(zip([f.name for f in CHECK_FAULTS], pool.map(check, enumerate(CHECK_FAULTS))))


@pytest.mark.parametrize("fault", CHECK_FAULTS, ids=[f.name for f in CHECK_FAULTS])
def test_check_fault(fault, checked):
    path, proc, workdir = checked[fault.name]
    assert_outcome(fault, path, proc, workdir)
    assert len(proc.stderr) < 1000  # no unbounded echo (an unbounded alias expansion runs past the timeout)


@pytest.mark.parametrize("fault", RUN_FAULTS, ids=[f.name for f in RUN_FAULTS])
def test_run_fault(fault, workdir):
    path = fault.write(workdir / "pipeline.yaml")
    env = dict(fault.env)
    if "KDPIPE_TEST_BREAK" in env:
        shim = workdir / "shim"
        shim.mkdir()
        (shim / "sitecustomize.py").write_text(BREAK_QUANT_PRE_PROCESS)
        env["PYTHONPATH"] = os.pathsep.join([str(shim), *filter(None, [os.environ.get("PYTHONPATH")])])
    proc = run_process("run", path, "--runs-dir", workdir / "runs", *fault.args, env=env, cwd=workdir)
    assert_outcome(fault, path, proc, workdir)


def test_temporary_files_never_write_through_a_planted_symlink(tmp_path):
    """In a shared cache anyone may plant links: neither the entry's name nor a temporary name is written through."""
    from kdpipe.atomic import save_torch, write_json

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    cache = tmp_path / "cache"
    cache.mkdir()
    for name in ("entry.json", "entry.pt"):
        for planted in (f"{name}.{os.getpid()}.tmp", f".{name}.tmp", name):  # predictable temporaries and the entry
            (cache / planted).symlink_to(victim)
    write_json(cache / "entry.json", {"ok": True})
    save_torch({"ok": True}, cache / "entry.pt")
    assert victim.read_text() == "precious\n"
    assert not (cache / "entry.json").is_symlink() and (cache / "entry.json").read_text().strip().endswith("}")
    assert not (cache / "entry.pt").is_symlink()
    assert {p.name for p in cache.iterdir() if not p.is_symlink()} == {"entry.json", "entry.pt"}  # no temporaries left


def test_a_corrupt_cache_entry_is_removed_and_rebuilt(tmp_path):
    from kdpipe.cache_store import load_json, lookup, store, store_json

    warnings = []
    entry = tmp_path / "cache" / "entry.bin"
    assert not lookup(entry, warnings.append) and warnings == []  # absent: no warning
    store(entry, lambda tmp: tmp.write_bytes(b"good bytes"))
    assert lookup(entry, warnings.append) and warnings == []
    entry.write_bytes(b"bad bytes!")  # same size, other content
    assert not lookup(entry, warnings.append) and not entry.exists()
    assert warnings == [f"warning: cache entry {entry} is corrupt (sha256 does not match); removed, rebuilding it"]
    entry.write_bytes(b"no digest")
    entry.with_name("entry.bin.sha256").unlink()
    assert not lookup(entry, warnings.append) and "no recorded sha256" in warnings[-1]
    store_json(tmp_path / "cache" / "value.json", {"latency": [1, 2]})
    assert load_json(tmp_path / "cache" / "value.json", warnings.append) == {"latency": [1, 2]}


def test_a_run_rebuilds_corrupt_cached_teacher_and_teacher_onnx(workdir, monkeypatch):
    """Corrupt every cached teacher, teacher ONNX and teacher measurement: the next run warns, rebuilds, passes."""
    cache = workdir / "cache"
    monkeypatch.setenv("KDPIPE_CACHE_DIR", str(cache))
    args = ("run", DIGITS, "--runs-dir", workdir / "runs", *RUN, "--set", "export.quantize=none", "--set", "export.deliver=fp32")
    first = run_process(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    entries = [p for folder in ("teachers", "teacher-onnx", "teacher-validate") for p in (cache / folder).iterdir()
               if not p.name.endswith(".sha256")]
    assert len(entries) == 3
    for path in entries:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    second = run_process(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    for path in entries:
        assert f"warning: cache entry {path} is corrupt (sha256 does not match); removed, rebuilding it" in second.stderr
    report = read_report(second.stdout)
    assert report["teacher"]["source"] == "trained" and report["teacher"]["onnx"]["cached"] is False
    from kdpipe.cache_store import lookup

    assert all(lookup(path, pytest.fail) for path in entries)  # rebuilt whole, with their digests
