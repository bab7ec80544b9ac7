"""Registry policy: which model versions get which alias (mlflow.yaml, `registry:`).

Every model that passes its gates becomes a new version carrying the candidate
alias. An alias such as `champion` moves to a version only when that version
passed every gate and beats the alias's current holder on the primary metric
by at least `min_improvement`, so a worse model never replaces a better one.
`kdpipe promote` applies the same check; `--force` overrides it and leaves a
tag on the version saying so. Aliases only: the deprecated registry stages are
never used.

Promotion is a compare-and-set that never demotes, even when runs promote at
once. MLflow has no atomic compare-and-set on aliases, so a promoter that read
an older holder could overwrite a better version set in between. Two guards:

- a store on this machine (sqlite file, file store) is locked with a lock file
  beside it around read-and-set, so promotions there are serial;
- on any store (an MLflow server, PostgreSQL), a promoter that judged its
  version better first tags it as a claimant of the alias, then sets the
  alias, then re-reads: the alias must sit on the best claimant (or a holder
  at least as good), else it moves it there and re-reads again. Every claim
  is written before its own alias write, so the last promoter to write sees
  every claimant that ever wrote, and the alias ends on the best of them.
  `--force` withdraws the other versions' claims, so its choice stays.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import Field

from kdpipe.config import RegistryAlias, Strict
from kdpipe.errors import InputError
from kdpipe.locks import file_lock
from kdpipe.results import ExportResult, Gate, ValidateResult

TAG = "kdpipe."
GATES_PASSED = TAG + "gates_passed"
HIGHER_IS_BETTER = {"test_accuracy": True, "latency_p50_ms": False, "size_mb": False}
# Floating-point slack so that an improvement of exactly min_improvement counts.
EPSILON = 1e-12


class RegistryPolicy(Strict):
    candidate_alias: RegistryAlias = Field("candidate", description="alias every passing version gets (the newest "
                                                                    "one holds it)")
    primary_metric: Literal["test_accuracy", "latency_p50_ms", "size_mb"] = Field(
        "test_accuracy", description="what a version must improve to take the champion alias; "
                                     "latency_p50_ms is at the smallest validated batch size")
    min_improvement: float = Field(0.0, ge=0.0, description="in the metric's own unit; ties never move the alias")


def metric_tag(metric: str) -> str:
    return f"{TAG}metric.{metric}"


def claim_tag(alias: str) -> str:
    """Set on a version that beat the alias's holder and moved the alias to it."""
    return f"{TAG}claim.{alias}"


def metrics_of(validated: ValidateResult) -> dict[str, float]:
    """The metrics a version is compared on, from its validation."""
    smallest = min(validated.latency_ms, key=int)
    return {"test_accuracy": validated.accuracy,
            "latency_p50_ms": validated.latency_ms[smallest]["p50"],
            "size_mb": validated.size_bytes / 1e6}


def git_commit(directory: Path) -> str:
    """HEAD of the repository holding `directory`, with '+dirty' when tracked files differ from it."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return "none"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "none"
    return head.stdout.strip() + ("+dirty" if dirty else "")


def version_tags(validated: ValidateResult, exported: ExportResult, gates: list[Gate], pipeline, run_dir: Path,
                 pipeline_file: Path) -> dict[str, str]:
    """Tags that let a version be judged (and promoted) later without its run directory. `pipeline` is the run's
    resolved pipeline, recorded in RUN_DIR/pipeline.yaml."""
    tags = {
        GATES_PASSED: str(all(g.passed for g in gates)).lower(),
        TAG + "pipeline": pipeline.name,
        TAG + "pipeline_sha256": hashlib.sha256((Path(run_dir) / "pipeline.yaml").read_bytes()).hexdigest(),
        TAG + "git_commit": git_commit(pipeline_file.resolve().parent),
        TAG + "method": pipeline.distill.method,
        TAG + "precision": validated.precision,
        TAG + "quantization": validated.quantization,
        TAG + "run_dir": str(run_dir),
    }
    if exported.input:  # the input contract: what a caller of this version feeds it
        tags[TAG + "input"] = exported.input
    tags.update({f"{TAG}gate.{g.name}": json.dumps(g.as_dict()) for g in gates})
    tags.update({metric_tag(k): repr(float(v)) for k, v in metrics_of(validated).items()})
    return tags


@dataclass
class Verdict:
    allowed: bool
    reason: str
    current: str | None  # the version holding the alias before, if any


def alias_holder(client, model_name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None


def judge(client, policy: RegistryPolicy, model_name: str, version: str, alias: str) -> Verdict:
    """May `version` take `alias`? It must have passed every gate and beat the alias's holder by min_improvement."""
    from mlflow.exceptions import MlflowException

    try:
        candidate = client.get_model_version(model_name, str(version))
    except MlflowException:
        raise InputError("--version", f"model '{model_name}' has no version {version}") from None
    holder = alias_holder(client, model_name, alias)
    current = str(holder.version) if holder is not None else None  # the sqlite store gives an int
    if candidate.tags.get(GATES_PASSED) != "true":
        return Verdict(False, f"version {version} did not pass every gate (tag {GATES_PASSED})", current)
    metric = policy.primary_metric
    value = candidate.tags.get(metric_tag(metric))
    if value is None:
        return Verdict(False, f"version {version} has no {metric_tag(metric)} tag to compare", current)
    if holder is None:
        return Verdict(True, f"no version holds '{alias}' yet", None)
    if current == str(version):
        return Verdict(True, f"version {version} already holds '{alias}'", current)
    held = holder.tags.get(metric_tag(metric))
    if held is None:
        return Verdict(False, f"the current '{alias}' (version {current}) has no {metric_tag(metric)} tag to compare",
                       current)
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    improvement = sign * (float(value) - float(held))
    comparison = f"{metric} {float(value):.6g} vs {float(held):.6g} of version {current}"
    if improvement > 0 and improvement >= policy.min_improvement - EPSILON:
        return Verdict(True, f"{comparison}: better by {improvement:.6g} (min_improvement {policy.min_improvement})",
                       current)
    return Verdict(False, f"{comparison}: does not improve by min_improvement {policy.min_improvement}", current)


def promote(client, policy: RegistryPolicy, model_name: str, version: str, alias: str, force: bool = False) -> Verdict:
    """Move `alias` to `version` when `judge` allows it, or when forced (recorded in a tag on the version).

    When a better version took the alias concurrently, the verdict says so and `allowed` is False.
    """
    version = str(version)
    with promotion_lock(client._registry_uri):  # MlflowClient keeps the URI it was built with; there is no getter
        verdict = judge(client, policy, model_name, version, alias)
        if verdict.allowed:
            if verdict.current == version:
                return verdict
            _test_hold(version)
            client.set_model_version_tag(model_name, version, claim_tag(alias), "true")
            client.set_registered_model_alias(model_name, alias, version)
            holder = settle(client, policy, model_name, alias)
            if holder != version:
                return Verdict(False, f"{verdict.reason}; but version {holder}, better, took '{alias}' at the same "
                                      f"time", holder)
            return verdict
        if force:
            client.set_registered_model_alias(model_name, alias, version)
            client.set_model_version_tag(model_name, version, f"{TAG}forced.{alias}", json.dumps({
                "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "replaced_version": verdict.current, "overridden_check": verdict.reason}))
            for other in _claimants(client, model_name, alias):
                if str(other.version) != version:
                    client.delete_model_version_tag(model_name, str(other.version), claim_tag(alias))
            return Verdict(True, f"forced: {verdict.reason}", verdict.current)
        return verdict


def settle(client, policy: RegistryPolicy, model_name: str, alias: str) -> str:
    """Put `alias` on the best claimant unless its holder is at least as good; repeat until a re-read needs no move.

    Returns the version left holding the alias.
    """
    metric = policy.primary_metric
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0

    def score(v) -> float:
        value = v.tags.get(metric_tag(metric))
        return -math.inf if value is None else sign * float(value)

    while True:
        holder = alias_holder(client, model_name, alias)
        contenders = ([holder] if holder is not None else []) + [
            v for v in _claimants(client, model_name, alias) if v.tags.get(GATES_PASSED) == "true"]
        best = max(contenders, key=score)  # the holder comes first, so a tie keeps it
        if holder is not None and str(best.version) == str(holder.version):
            return str(holder.version)
        client.set_registered_model_alias(model_name, alias, str(best.version))


def _claimants(client, model_name: str, alias: str) -> list:
    versions = client.search_model_versions(f"name='{model_name}'")
    return [v for v in versions if v.tags.get(claim_tag(alias)) == "true"]


@contextlib.contextmanager
def promotion_lock(store_uri: str):
    """Serialize promotions on a registry store this machine holds (sqlite or file store); elsewhere, no lock."""
    store = local_store_path(store_uri)
    if store is None:
        yield
        return
    with file_lock(store.with_name(store.name + ".promote.lock")):
        yield


def local_store_path(store_uri: str) -> Path | None:
    """The file or directory of a sqlite or file-store URI (or a bare path); None for servers and databases."""
    from urllib.parse import urlparse

    scheme = urlparse(store_uri).scheme
    if scheme == "sqlite":
        from sqlalchemy.engine import make_url

        database = make_url(store_uri).database
        return Path(database).resolve() if database not in (None, "", ":memory:") else None
    if scheme == "file":
        return Path(urlparse(store_uri).path).resolve()
    if scheme == "":
        return Path(store_uri).resolve()
    return None


def _test_hold(version: str) -> None:
    """Test hook: with KDPIPE_TEST_PROMOTE_HOLD=DIR, report having read (DIR/read-V) and wait for DIR/write-V, so a
    test can order concurrent promotions between their read and their write."""
    directory = os.environ.get("KDPIPE_TEST_PROMOTE_HOLD")
    if not directory:
        return
    Path(directory, f"read-{version}").touch()
    deadline = time.monotonic() + 120
    while not Path(directory, f"write-{version}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
