"""Registry policy: which model versions get which alias (mlflow.yaml, `registry:`).

Every model that passes its gates becomes a new version carrying the candidate
alias. An alias such as `champion` moves to a version only when that version
passed every gate and beats the alias's current holder on the primary metric
by at least `min_improvement`, so a worse model never replaces a better one.
`kdpipe promote` applies the same check; `--force` overrides it and leaves a
tag on the version saying so. Aliases only: the deprecated registry stages are
never used.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from kdpipe.errors import InputError

TAG = "kdpipe."
GATES_PASSED = TAG + "gates_passed"
HIGHER_IS_BETTER = {"test_accuracy": True, "latency_p50_ms": False, "size_mb": False}
# Floating-point slack so that an improvement of exactly min_improvement counts.
EPSILON = 1e-12


class RegistryPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    candidate_alias: str = Field("candidate", pattern=r"^[A-Za-z_][A-Za-z0-9_\-]*$",
                                 description="alias every passing version gets (the newest one holds it)")
    primary_metric: Literal["test_accuracy", "latency_p50_ms", "size_mb"] = Field(
        "test_accuracy", description="what a version must improve to take the champion alias; "
                                     "latency_p50_ms is at the smallest validated batch size")
    min_improvement: float = Field(0.0, ge=0.0, description="in the metric's own unit; ties never move the alias")


def metric_tag(metric: str) -> str:
    return f"{TAG}metric.{metric}"


def metrics_of(report: dict) -> dict[str, float]:
    """The metrics a version is compared on, from a run's report."""
    smallest = min(report["latency_ms"], key=int)
    return {"test_accuracy": report["student"]["accuracy"],
            "latency_p50_ms": report["latency_ms"][smallest]["p50"],
            "size_mb": report["onnx"]["size_bytes"] / 1e6}


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


def version_tags(report: dict, gates: list, pipeline_name: str, resolved_file: Path, pipeline_file: Path) -> dict[str, str]:
    """Tags that let a version be judged (and promoted) later without its run directory."""
    tags = {
        GATES_PASSED: str(all(g.passed for g in gates)).lower(),
        TAG + "pipeline": pipeline_name,
        TAG + "pipeline_sha256": hashlib.sha256(resolved_file.read_bytes()).hexdigest(),
        TAG + "git_commit": git_commit(pipeline_file.resolve().parent),
        TAG + "method": report["method"]["name"],
        TAG + "precision": report["onnx"].get("precision", "fp32"),
        TAG + "run_dir": report["run_dir"],
    }
    tags.update({f"{TAG}gate.{g.name}": json.dumps(g.as_dict()) for g in gates})
    tags.update({metric_tag(k): repr(float(v)) for k, v in metrics_of(report).items()})
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
    current = holder.version if holder is not None else None
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
    """Move `alias` to `version` when `judge` allows it, or when forced (recorded in a tag on the version)."""
    verdict = judge(client, policy, model_name, version, alias)
    if verdict.allowed:
        if verdict.current != str(version):
            client.set_registered_model_alias(model_name, alias, str(version))
        return verdict
    if force:
        client.set_registered_model_alias(model_name, alias, str(version))
        client.set_model_version_tag(model_name, str(version), f"{TAG}forced.{alias}", json.dumps({
            "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "replaced_version": verdict.current, "overridden_check": verdict.reason}))
        return Verdict(True, f"forced: {verdict.reason}", verdict.current)
    return verdict
