"""The run directory's record of itself as --resume reads it: ledger.json, RUN_DIR/pipeline.yaml, and the digests
that tell whether the record and the data are still those the run started with."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from kdpipe.atomic import atomic_write
from kdpipe.config_errors import shown
from kdpipe.data import Splits
from kdpipe.errors import InputError
from kdpipe.fingerprint import fingerprint
from kdpipe.pipeline import Pipeline, validate_pipeline
from kdpipe.tracking import flatten


def read_ledger(run_dir: Path) -> dict[str, Any]:
    """The stage ledger of a run directory, for --resume. InputError for one this kdpipe cannot continue: an earlier
    release's ledger kept its finished stages' outcomes in a report, not as the results the stages now read."""
    try:
        ledger = json.loads((Path(run_dir) / "ledger.json").read_text())
        if not isinstance(ledger.get("finished"), list) or not ledger.get("mlflow_run_id"):
            raise ValueError
    except (OSError, ValueError, AttributeError):
        raise InputError("--resume", f"{run_dir} is not a kdpipe run directory: no readable ledger.json") from None
    if ledger["finished"] and not isinstance(ledger.get("results"), dict):
        raise InputError("--resume", f"{run_dir} was written by an earlier kdpipe, whose ledger.json keeps no stage "
                                     f"results, so this kdpipe cannot resume it; start a new run with kdpipe run "
                                     f"{Path(run_dir) / 'pipeline.yaml'}")
    return ledger


def check_until(ledger: dict[str, Any], until: str | None, stages: list[str]) -> None:
    """A resumed run cannot stop before a stage it already finished (`stages` in run order): its report would
    contradict the ledger."""
    finished = [s for s in stages if s in ledger["finished"]]
    if until is not None and finished and stages.index(until) < stages.index(finished[-1]):
        raise InputError("--until", f"the run already finished stage '{finished[-1]}' (ledger.json), which comes "
                                    f"after '{until}'; resume with --until {finished[-1]} or a later stage, or without "
                                    "--until")


def run_record(pipeline: Pipeline, data: Splits) -> dict[str, Any]:
    """What the ledger keeps for --resume to compare: the resolved pipeline's digest (and the pipeline, to name a
    changed key) and the data's fingerprint (with its classes and split sizes, to say what changed)."""
    resolved = pipeline.resolved()
    return {"pipeline_digest": fingerprint(resolved), "pipeline": resolved,
            "data": {"fingerprint": data.fingerprint, "classes": data.provenance.get("classes") or data.num_classes,
                     "sizes": data.sizes(), "storage": data.provenance["storage"]}}


def write_record(run_dir: Path, pipeline: Pipeline) -> None:
    """RUN_DIR/pipeline.yaml in one step: a run killed while writing it leaves the previous record whole."""
    with atomic_write(Path(run_dir) / "pipeline.yaml") as tmp:
        tmp.write_text(pipeline.record())


def check_resumed(ledger: dict[str, Any], pipeline: Pipeline, data: Splits, run_dir: Path) -> dict[str, Any]:
    """InputError (exit 2, before any work) when RUN_DIR/pipeline.yaml or the data are not those the run started
    with: the finished stages' results would not belong to them, and the record would lie about the model.
    Returns the run's record now (`run_record`), which the ledger keeps from here on."""
    now = run_record(pipeline, data)
    if "pipeline_digest" not in ledger:
        print(f"{run_dir}: note: ledger.json is from an earlier kdpipe, which kept no digests: pipeline.yaml and the "
              "data are not compared with those the run started with", file=sys.stderr)
        return now
    if now["pipeline_digest"] != ledger["pipeline_digest"]:
        added = _keys_added_since(ledger["pipeline"], now["pipeline_digest"])
        if added:
            raise InputError("pipeline.yaml", f"the run was started by an earlier kdpipe, which had no {added}; "
                                              f"--resume continues a run as it began: finish it with that kdpipe, or "
                                              f"start a new run with kdpipe run {run_dir / 'pipeline.yaml'}")
        was, edited = flatten(ledger["pipeline"]), flatten(now["pipeline"])
        changed = [f"{key} {shown(was.get(key))} → {shown(edited.get(key))}"
                   for key in dict.fromkeys([*was, *edited]) if was.get(key) != edited.get(key)]
        listed = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise InputError("pipeline.yaml", f"changed since the run started ({listed}); --resume continues the run as it "
                                          f"began: undo the edit, or start a new run with kdpipe run "
                                          f"{run_dir / 'pipeline.yaml'}")
    _check_same_data(ledger["data"], now["data"], pipeline.data.input_key, run_dir)
    return now


def _keys_added_since(recorded: dict[str, Any], digest_now: str) -> str:
    """When the run's recorded pipeline differs from the one whose run_record digest is `digest_now` only by settings
    this kdpipe fills in and the one that started the run did not have (its record lacks them), those settings with
    their values, else ""."""
    try:
        upgraded = validate_pipeline(recorded).resolved()
    except InputError:  # a record this kdpipe refuses differs by more than added settings
        return ""
    if fingerprint(upgraded) != digest_now:
        return ""
    was = flatten(recorded)
    return ", ".join(f"{key} (this one sets {shown(value)})" for key, value in flatten(upgraded).items()
                     if key not in was)


def _check_same_data(was: dict[str, Any], now: dict[str, Any], key: str, run_dir: Path) -> None:
    if now["fingerprint"] == was["fingerprint"]:
        return
    changes = _data_changes(was, now)
    if not changes and was["storage"] != now["storage"]:
        # Training images held in memory are fingerprinted by their pixels, streamed ones by their files' identity,
        # so across a change of storage (storage: auto on a machine with other free memory) only these compare.
        held = {"memory": "held in memory", "stream": "streamed from their files"}
        print(f"{run_dir}: note: the training data were {held[was['storage']]} when the run started and are "
              f"{held[now['storage']]} now, so only their classes and split sizes are compared (they match)",
              file=sys.stderr)
        return
    shown = "; ".join(changes) or "the same classes and split sizes, other contents: files replaced or modified " \
                                  "(image files: their sizes or modification times differ)"
    raise InputError(key, f"the data changed since the run started ({shown}); --resume continues on the data the run "
                          "began with: put it back, or start a new run")


def _data_changes(was: dict[str, Any], now: dict[str, Any]) -> list[str]:
    changes = []
    if was["classes"] != now["classes"]:
        named = isinstance(was["classes"], list) and isinstance(now["classes"], list)
        added = [c for c in now["classes"] if c not in was["classes"]] if named else []
        gone = [c for c in was["classes"] if c not in now["classes"]] if named else []
        if added:
            changes.append(f"classes added: {shown(added)}")
        if gone:
            changes.append(f"classes removed: {shown(gone)}")
        if not (added or gone):
            changes.append(f"classes {shown(was['classes'])} → {shown(now['classes'])}")
    changes += [f"{split} split {was['sizes'].get(split)} → {size} samples" for split, size in now["sizes"].items()
                if was["sizes"].get(split) != size]
    return changes
