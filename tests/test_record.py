"""A run's record (RUN_DIR/pipeline.yaml, also the MLflow artifact) is a pipeline file that loads to the same
pipeline, and `--resume` checks that the record and the data are still those the run started with."""

from __future__ import annotations

import json
import math
import shutil
import signal
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import numpy as np
import pytest
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from conftest import (FAST, LENIENT, ONE_THREAD, PIPELINES, cli, read_report, read_until, run_process, sets, start_run,
                      write_pipeline)
from kdpipe.config import DistillBase, Int8Budget, ModelConfig, RegisterConfig, StudentConfig, TeacherConfig
from kdpipe.config_data import DataConfig, Normalization
from kdpipe.data.sources import DEFAULT_SOURCE
from kdpipe.errors import InputError
from kdpipe.pipeline import DEFAULT_METHOD, Pipeline, load_pipeline, resolve_file_paths, validate_pipeline
from kdpipe.resume import check_resumed, run_record
from kdpipe.runner import prepare

# --- write → load → write over every schema field ----------------------------------------------------------
#
# Every field of every section (each method's params included) gets each value the generator draws from its type
# and bounds: the limits, every choice, null, strings YAML would misread. Each value is validated on its own; the
# accepted ones are then given together in a few pipelines (Batch), whose records must load and be written again
# unchanged. Every field must have an accepted value, so a section the generator cannot reach fails the test
# instead of passing unexercised.

BASE = {"name": "record", "teacher": {"model": {"arch": "mlp"}}, "student": {"model": {"arch": "mlp"}}}
MINIMAL = {ModelConfig: {"arch": "mlp"}, TeacherConfig: {"model": {"arch": "mlp"}},
           StudentConfig: {"model": {"arch": "mlp"}}, RegisterConfig: {"model_name": "m"},
           Normalization: {"mean": [0.5], "std": [0.25]}, Int8Budget: {"max_accuracy_drop": 0.01}}
# Strings YAML reads as another type (bool, null, number, date, mapping, comment) unless the record quotes them.
TRICKY = ["yes", "off", "null", "~", "1.5", "0x1F", "2024-01-01", "a: b", "#x", "", "plain"]


def _known_values(tmp: Path) -> dict[tuple[str, str], list]:
    """(model, key) -> the values to give, where the type alone says too little (paths that must exist, names the
    validators know, the search space's own little language)."""
    (tmp / "factory.py").write_text("def make(**kwargs): ...\n")
    (tmp / "hf-model").mkdir()
    file = str(tmp / "factory.py")
    return {
        ("ModelConfig", "arch"): ["mlp", "cnn", "timm:resnet18", f"hf:{tmp / 'hf-model'}"],
        ("ModelConfig", "entrypoint"): ["pkg.module:make", f"{file}:make", "module:make"],
        ("DistillBase", "device"): ["auto", "cpu", "cuda:1"],
        ("ValidateConfig", "providers"): ["auto", ["CPUExecutionProvider"]],
        # openvino is refused where the extra is not installed; onnxruntime alone is the default, left out of the record
        ("ValidateConfig", "runtimes"): [["onnxruntime"], ["openvino", "onnxruntime"]],
        ("SearchConfig", "storage"): [None, f"sqlite:///{tmp / 's.db'}", "postgresql://user:secret@db.example/kd",
                                      str(tmp / "j.log")],
        ("SearchConfig", "space"): ["auto", {"temperature": {"low": 1.0, "high": 8.0, "log": True}},
                                    {"alpha": {"choices": [0.5, 0.9]}}, {"temperature": "auto"},
                                    {"method": {"choices": ["kd", "none"]}}],
        ("RegisterConfig", "alias"): ["champion", "Prod_2"],
        ("Pipeline", "name"): ["record", "a.b-c_1"],
    }


def _contexts(tmp: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """(model, key) -> the keys a value of that key needs beside it to be valid at all."""
    return {
        ("ModelConfig", "entrypoint"): {"arch": None},
        ("ExportConfig", "deliver"): {"quantize": "static"},
        ("ExportConfig", "int8_budget"): {"quantize": "static"},
        ("SearchConfig", "objective"): {"pruner": "none"},
        ("KDParams", "ce_weight"): {"weights": "separate"},
        ("KDParams", "kd_weight"): {"weights": "separate"},
    }


# Leaf prefix -> keys of another section a value under it needs: a strong view is read by mlkd, and only by it.
CROSS_SECTION = {"data[digits].strong_augment.": {"distill": {"method": "mlkd"}},
                 "distill[mlkd]": {"data": {"strong_augment": ["cutout"]}}}


def _with_cross_section(leaf: str, raw: dict) -> dict:
    for prefix, needed in CROSS_SECTION.items():
        if leaf.startswith(prefix):
            raw = _merged(needed, raw)
    return raw


def _for_field(table: dict, model: type[BaseModel], key: str) -> Any:
    return next((table[(cls.__name__, key)] for cls in model.__mro__ if (cls.__name__, key) in table), None)


def _flat_metadata(metadata: list) -> list:
    return [m for item in metadata for m in (item.metadata if isinstance(item, FieldInfo) else [item])]


def _numbers(kind: type, metadata: list) -> list:
    bound = {name: getattr(m, name) for m in _flat_metadata(metadata) for name in ("gt", "ge", "lt", "le")
             if getattr(m, name, None) is not None}
    if kind is int:
        low = bound["ge"] if "ge" in bound else bound["gt"] + 1 if "gt" in bound else -7
        high = bound["le"] if "le" in bound else bound["lt"] - 1 if "lt" in bound else low + 1000
        return sorted({low, high, (low + high) // 2, low + 1 if low < high else low})
    low = bound["ge"] if "ge" in bound else math.nextafter(bound["gt"], math.inf) if "gt" in bound else -2.5
    high = bound["le"] if "le" in bound else math.nextafter(bound["lt"], -math.inf) if "lt" in bound else 1e300
    middle = low + (high - low) / 3 if high - low < 1e200 else 0.1 + max(low, 0.0)
    return [low, high, middle]


# A union member's tag key, the base class holding the keys every member shares, and the member exercising those.
TAGS = {"method": (DistillBase, DEFAULT_METHOD), "source": (DataConfig, DEFAULT_SOURCE)}


def _tag(model: type[BaseModel]) -> tuple[str, str] | None:
    for key in TAGS:
        field = model.model_fields.get(key)
        args = typing.get_args(field.annotation) if field is not None else ()
        if len(args) == 1:
            return key, args[0]
    return None


def schema_values(annotation: Any, metadata: list, path: str, env: dict) -> typing.Iterator[tuple[str, Any]]:
    """(leaf path, raw value) pairs for a value of type `annotation`: one leaf changed at a time inside models."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        yield from schema_values(args[0], [*metadata, *args[1:]], path, env)
    elif origin in (Union, types.UnionType):
        for arg in args:
            yield from schema_values(arg, metadata, path, env)
    elif annotation is type(None):
        yield path, None
    elif origin is Literal:
        yield from ((path, value) for value in args)
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield from model_values(annotation, path, env)
    elif origin is list:  # items are named by the list's key: [] alone may be refused (min_length)
        yield path, []
        for leaf, value in schema_values(args[0], [], path, env):
            yield leaf, [value]
            yield leaf, [value, value]
    elif origin is tuple:
        yield from ((leaf, [value] * len(args)) for leaf, value in schema_values(args[0], [], path, env))
    elif origin is dict:
        key = next(value for _, value in schema_values(args[0], [], path, env))
        yield path, {}
        yield from ((leaf, {key: value}) for leaf, value in schema_values(args[1], [], path, env))
    elif annotation is bool:
        yield from ((path, v) for v in (True, False))
    elif annotation in (int, float):
        yield from ((path, v) for v in _numbers(annotation, metadata))
    elif annotation is Path:
        yield path, env["file"]
    elif annotation is str:
        yield from ((path, v) for v in TRICKY)
    elif annotation is Any:
        yield from ((path, v) for v in (1, "x", [1, "y"], {"k": 2.5}, None))
    else:
        raise AssertionError(f"{path}: no values for type {annotation!r}; teach the generator this type")


def model_values(model: type[BaseModel], path: str, env: dict) -> typing.Iterator[tuple[str, dict]]:
    tag = _tag(model)
    base = {**MINIMAL.get(model, {}), **({tag[0]: tag[1]} if tag else {})}
    if "path" in model.model_fields and model.model_fields["path"].is_required():  # a data source's file
        base["path"] = env["file"]
    here = f"{path}[{tag[1]}]" if tag else path
    prefix = f"{here}." if here else ""
    yield here, base
    # exercised once, in the default member's (kd's, digits')
    shared = TAGS[tag[0]][0].model_fields if tag and tag[1] != TAGS[tag[0]][1] else {}
    for name, field in model.model_fields.items():
        if name in shared:
            continue
        key = field.alias or name
        context = _for_field(env["contexts"], model, key) or {}
        known = _for_field(env["known"], model, key)
        values = ((prefix + key, v) for v in known) if known is not None else \
            schema_values(field.annotation, list(field.metadata), prefix + key, env)
        for leaf, value in values:
            yield leaf, {**base, **context, key: value}


def record_problem(pipeline: Pipeline, folder: Path) -> str | None:
    """Write the pipeline's record, load it, write it again: None when the two records are the same text."""
    first = pipeline.record()
    (folder / "record.yaml").write_text(first)
    try:
        again = load_pipeline(folder / "record.yaml").record()
    except InputError as exc:
        return f"the record does not load: {exc.format(None)}"
    if again != first:
        changed = [line for line in again.splitlines() if line not in first.splitlines()]
        return f"the record changes when written again: {changed[:3]}"
    return None


def _leaves(value: Any, key: tuple = ()) -> dict[tuple, Any]:
    """{dotted key as a tuple: value} of the mappings in `value`; lists and empty mappings are values."""
    if isinstance(value, dict) and value:
        return {k: v for name, item in value.items() for k, v in _leaves(item, (*key, name)).items()}
    return {key: value}


def _merged(a: dict, b: dict) -> dict:
    both = {**a, **b}
    return {k: _merged(a[k], b[k]) if isinstance(a.get(k), dict) and isinstance(b.get(k), dict) else v
            for k, v in both.items()}


class Batch:
    """Variants given together in one pipeline, so that a few records cover them all: a variant joins only where
    none of its keys is already given another value (each keeps its exact value) and the union still validates."""

    def __init__(self, folder: Path):
        self.raw, self.given, self.prefixes, self.leaves, self.folder = {}, {}, set(), [], folder

    def join(self, leaf: str, raw: dict) -> bool:
        given = _leaves(raw)
        if any(self.given.get(k, v) != v or k in self.prefixes or any(k[:i] in self.given for i in range(len(k)))
               for k, v in given.items()):
            return False
        merged = _merged(self.raw, raw)
        try:
            validate(_merged(BASE, merged), self.folder)
        except InputError:
            return False
        self.raw, self.leaves = merged, [*self.leaves, leaf]
        self.given.update(given)
        self.prefixes.update(k[:i] for k in given for i in range(1, len(k)))
        return True


def validate(raw: dict, folder: Path) -> Pipeline:
    # The given file is loaded from its data: YAML's reading of it is not what is tested here, the record's is.
    return validate_pipeline(resolve_file_paths(raw, folder, "the test's folder"))


def test_every_schema_field_survives_write_load_write(tmp_path):
    env = {"known": _known_values(tmp_path), "contexts": _contexts(tmp_path), "file": str(tmp_path / "factory.py")}
    leaves, refusals, batches = set(), {}, []
    for leaf, raw in model_values(Pipeline, "", env):
        leaves.add(leaf)
        raw = _with_cross_section(leaf, raw)
        try:
            validate({**BASE, **raw}, tmp_path)
        except InputError as exc:
            refusals.setdefault(leaf, exc.format(None))
            continue
        if not any(batch.join(leaf, raw) for batch in batches):
            batches.append(Batch(tmp_path))
            assert batches[-1].join(leaf, raw), (leaf, raw)
    problems = {tuple(batch.leaves): record_problem(validate(_merged(BASE, batch.raw), tmp_path), tmp_path)
                for batch in batches}
    broken = [f"{problem} (a pipeline giving {', '.join(given)})" for given, problem in problems.items() if problem]
    assert not broken, "\n".join(broken)
    accepted = {leaf for batch in batches for leaf in batch.leaves}
    never = sorted(leaves - accepted)
    assert not never, "no generated value was valid for: " + "; ".join(f"{leaf} ({refusals[leaf]})" for leaf in never)
    assert any(".params." in leaf for leaf in accepted) and any("augment.random_crop" in leaf for leaf in accepted)


@pytest.mark.parametrize("overrides", [[], [*FAST, *LENIENT]], ids=["as-is", "fast"])
@pytest.mark.parametrize("file", sorted(PIPELINES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_pipeline_file_survives_write_load_write(file, overrides, tmp_path):
    if yaml.safe_load(file.read_text()).get("teacher") is None:  # FAST sets the teacher's epochs
        overrides = [o for o in overrides if not o.startswith("teacher.")]
    assert record_problem(load_pipeline(file, overrides), tmp_path) is None


# --- a run's record loads, and --resume checks what it resumes ----------------------------------------------

# A few epochs and cheap validation: these runs are about the record and resuming, not about accuracy.
QUICK = [*FAST, *LENIENT, "distill.epochs=3", "export.quantize=none", "export.deliver=fp32",
         "validate.batch_sizes=[1]", "validate.runs=5", "validate.warmup=0"]
AUGMENT = [{"random_crop": {"padding": 1}}, "hflip"]
# Flipped 8×8 digits and 3 epochs make a weak student: the accuracy gates are off, the chance gate stays.
AUGMENTED = [*QUICK, "validate.gates.accuracy_min=null", "validate.gates.max_accuracy_drop_vs_teacher=null"]


def only_run(workdir: Path) -> Path:
    (run_dir,) = [p.parent for p in (workdir / "runs").glob("*/*/ledger.json")]
    return run_dir


def digits_npz(path: Path) -> Path:
    """scikit-learn's digits as an npz that gives its own train, val and test splits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = (digits.images / 16.0).astype(np.float32)[:, None], digits.target
    parts = {"": slice(0, 1200), "_val": slice(1200, 1500), "_test": slice(1500, None)}  # x, y: the training split
    np.savez(path, **{kind + split: values[part] for split, part in parts.items()
                      for kind, values in (("x", x), ("y", y))})
    return path


def digit_folder(root: Path, digits_by_class: dict[str, int]) -> Path:
    """An image folder with train/val/test splits of 8×8 PNGs of the given scikit-learn digits."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for name, digit in digits_by_class.items():
        for k, i in enumerate(np.flatnonzero(digits.target == digit)[:60]):
            path = root / ("train", "train", "train", "val", "test")[k % 5] / name / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).save(path)
    return root


def assert_refused(result, run_dir: Path, key: str, *fragments: str) -> None:
    """Exit 2 with one line naming the run directory and `key`, before any work."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{run_dir}: {key}: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_the_record_of_data_that_gives_its_splits_passes_check(workdir):
    file = write_pipeline(workdir / "npz.yaml", data={"source": "npz", "path": str(digits_npz(workdir / "d.npz"))})
    (workdir / "record.yaml").write_text(prepare(file, []).pipeline.record())
    result = cli("check", workdir / "record.yaml")
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_an_augmented_run_stopped_after_distill_resumes_to_the_end(workdir):
    file = write_pipeline(workdir / "aug.yaml", **{"data.augment": AUGMENT})
    stopped = run_process("run", file, *sets(*AUGMENTED), "--until", "distill", env=ONE_THREAD)
    assert stopped.returncode == 0, stopped.stderr
    run_dir = only_run(workdir)
    checked = run_process("check", run_dir / "pipeline.yaml")
    assert checked.returncode == 0, checked.stderr

    ledger = (run_dir / "ledger.json").read_text()
    earlier = run_process("run", "--resume", run_dir, "--until", "teacher")
    assert_refused(earlier, run_dir, "--until", "already finished stage 'distill'")
    assert (run_dir / "ledger.json").read_text() == ledger
    assert json.loads((run_dir / "report.json").read_text())["stopped_after"] == "distill"

    resumed = run_process("run", "--resume", run_dir, env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr
    report = read_report(resumed.stdout)
    assert report["status"] == "passed" and report["resumed"] == 1
    assert "[distill]" not in resumed.stderr and "[export]" in resumed.stderr


@pytest.mark.slow
def test_an_augmented_run_killed_by_sigterm_resumes_with_the_command_it_printed(workdir):
    file = write_pipeline(workdir / "aug.yaml", **{"data.augment": AUGMENT})
    proc = start_run("run", file, *sets(*AUGMENTED, "distill.epochs=6"))
    read_until(proc, "student epoch 2/")
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, rest
    command = rest.strip().splitlines()[-1].split("continue with: ")[-1].split()
    assert command[:3] == ["kdpipe", "run", "--resume"], rest

    resumed = run_process(*command[1:], env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr
    report = read_report(resumed.stdout)
    assert report["status"] == "passed" and report["resumed"] == 1
    assert "student epoch 1/" not in resumed.stderr and "student epoch 6/6" in resumed.stderr


def test_a_run_on_data_that_gives_its_val_split_resumes(workdir):
    file = write_pipeline(workdir / "npz.yaml", data={"source": "npz", "path": str(digits_npz(workdir / "d.npz"))})
    stopped = run_process("run", file, *sets(*QUICK), "--until", "teacher", env=ONE_THREAD)
    assert stopped.returncode == 0, stopped.stderr
    resumed = run_process("run", "--resume", only_run(workdir), "--until", "distill", env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr
    assert read_report(resumed.stdout)["stopped_after"] == "distill"


def test_a_run_stopped_after_its_search_resumes_from_the_record_the_search_wrote(workdir):
    searched = cli("run", PIPELINES / "digits-search.yaml", "--until", "search",
                   *sets(*QUICK, "search.space=auto", "search.trials=2"))
    assert searched.exit_code == 0, searched.stderr
    run_dir = only_run(workdir)
    best = read_report(searched.stdout)["search"]["best_params"]  # the drawn ones: kd's conditional ones may not be
    recorded = yaml.safe_load((run_dir / "pipeline.yaml").read_text())["distill"]["params"]
    assert {k: recorded[k] for k in best} == best
    resumed = cli("run", "--resume", run_dir, "--until", "distill")
    assert resumed.exit_code == 0, resumed.stderr
    assert read_report(resumed.stdout)["method"]["params"] == recorded


def test_resuming_an_edited_record_is_refused_naming_what_changed(workdir):
    stopped = run_process("run", PIPELINES / "digits.yaml", *sets(*QUICK), "--until", "teacher", env=ONE_THREAD)
    assert stopped.returncode == 0, stopped.stderr
    run_dir = only_run(workdir)
    record = run_dir / "pipeline.yaml"
    edited = yaml.safe_load(record.read_text())
    edited["distill"]["epochs"], edited["distill"]["params"]["temperature"] = 99, 20.0
    record.write_text(yaml.safe_dump(edited, sort_keys=False))
    ledger = (run_dir / "ledger.json").read_text()
    refused = run_process("run", "--resume", run_dir)
    assert_refused(refused, run_dir, "pipeline.yaml", "changed since the run started", "distill.epochs 3 → 99",
                   "distill.params.temperature 4.0 → 20.0")
    assert (run_dir / "ledger.json").read_text() == ledger and "stopped_after" in (run_dir / "report.json").read_text()


def test_a_run_an_earlier_kdpipe_started_is_refused_naming_the_settings_it_did_not_have(workdir):
    """A setting added since the run started is in this kdpipe's pipeline, not in the run's record: the refusal says
    so instead of asking the user to undo an edit they never made; an edit beside it is still named as one."""
    import json

    from kdpipe.fingerprint import fingerprint

    stopped = run_process("run", PIPELINES / "digits.yaml", *sets(*QUICK), "--until", "teacher", env=ONE_THREAD)
    assert stopped.returncode == 0, stopped.stderr
    run_dir = only_run(workdir)
    # The record and ledger the release before export.int8_weight_bits wrote: the same pipeline without that key.
    earlier = yaml.safe_load((run_dir / "pipeline.yaml").read_text())
    del earlier["export"]["int8_weight_bits"]
    (run_dir / "pipeline.yaml").write_text(yaml.safe_dump(earlier, sort_keys=False))
    ledger = json.loads((run_dir / "ledger.json").read_text())
    ledger.update(pipeline=earlier, pipeline_digest=fingerprint(earlier))
    (run_dir / "ledger.json").write_text(json.dumps(ledger))
    assert_refused(run_process("run", "--resume", run_dir), run_dir, "pipeline.yaml",
                   "the run was started by an earlier kdpipe, which had no export.int8_weight_bits (this one sets 7)",
                   "finish it with that kdpipe")

    earlier["distill"]["epochs"] = 99
    (run_dir / "pipeline.yaml").write_text(yaml.safe_dump(earlier, sort_keys=False))
    assert_refused(run_process("run", "--resume", run_dir), run_dir, "pipeline.yaml", "changed since the run started",
                   "distill.epochs 3 → 99", "export.int8_weight_bits None → 7")


def test_resuming_on_changed_data_is_refused_naming_what_changed(workdir):
    folder = digit_folder(workdir / "pets", {"one": 1, "seven": 7, "zero": 0})
    file = write_pipeline(workdir / "pets.yaml", data={"source": "imagefolder", "path": str(folder), "channels": 1,
                                                       "batch_size": 32})
    stopped = run_process("run", file, *sets(*QUICK), "--until", "teacher", env=ONE_THREAD)
    assert stopped.returncode == 0, stopped.stderr
    run_dir = only_run(workdir)

    digit_folder(folder, {"eight": 8})  # a class folder added to every split
    assert_refused(run_process("run", "--resume", run_dir), run_dir, "data.path", "the data changed since the run "
                   "started", "classes added: ['eight']")
    for split in ("train", "val", "test"):
        shutil.rmtree(folder / split / "eight")
    # The same files in number and name, other images in them.
    victims = sorted((folder / "train" / "zero").iterdir())[:3]
    for victim, other in zip(victims, sorted((folder / "train" / "one").iterdir())):
        shutil.copyfile(other, victim)
    assert_refused(run_process("run", "--resume", run_dir), run_dir, "data.path", "the same classes and split sizes",
                   "files replaced or modified")


def test_a_change_of_storage_alone_is_no_change_of_the_data(workdir, capsys):
    folder = digit_folder(workdir / "pets", {"one": 1, "zero": 0})

    def prepared(storage: str):
        data = {"source": "imagefolder", "path": str(folder), "channels": 1, "storage": storage}
        return prepare(write_pipeline(workdir / f"{storage}.yaml", data=data), [])

    streamed, held = prepared("stream"), prepared("memory")
    assert streamed.data.fingerprint != held.data.fingerprint  # pixels in memory, the files' identity when streamed
    # What storage: auto makes of a resume on a machine with less free memory than the run started on.
    ledger = {**run_record(streamed.pipeline, streamed.data), "data": run_record(held.pipeline, held.data)["data"]}
    check_resumed(ledger, streamed.pipeline, streamed.data, workdir)
    assert "note: the training data were held in memory when the run started and are streamed from their files " \
           "now, so only their classes and split sizes are compared (they match)" in capsys.readouterr().err
    sorted((folder / "train" / "one").iterdir())[0].unlink()
    stream = prepared("stream")
    with pytest.raises(InputError) as refused:
        check_resumed(ledger, stream.pipeline, stream.data, workdir)
    assert refused.value.key == "data.path" and "train split 72 → 71 samples" in refused.value.message


def test_a_ledger_from_before_the_digests_still_resumes(workdir):
    stopped = run_process("run", PIPELINES / "digits.yaml", *sets(*QUICK), "--until", "teacher", env=ONE_THREAD)
    assert stopped.returncode == 0, stopped.stderr
    run_dir = only_run(workdir)
    ledger = json.loads((run_dir / "ledger.json").read_text())
    for key in ("pipeline_digest", "pipeline", "data"):
        ledger.pop(key, None)
    (run_dir / "ledger.json").write_text(json.dumps(ledger))

    resumed = run_process("run", "--resume", run_dir, "--until", "distill", env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr
    notes = [line for line in resumed.stderr.splitlines() if "note:" in line]
    assert notes == [f"{run_dir}: note: ledger.json is from an earlier kdpipe, which kept no digests: pipeline.yaml "
                     "and the data are not compared with those the run started with"]
    assert "pipeline_digest" in json.loads((run_dir / "ledger.json").read_text())  # checked from the next resume on
