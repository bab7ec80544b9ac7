"""What the stages hand each other: one frozen result per stage, kept on `ctx.results` by its type.

A result holds what later stages read (paths, accuracy, the providers in use) as typed fields, the gates its stage
decided, and `report`: the stage's part of report.json, which `kdpipe.report` merges in run order. Results are kept
in ledger.json as `to_json` writes them and read back with `from_json` on --resume.
A stage declares the results it `needs` and the one it `produces`; the runner runs them in the order of
`kdpipe.stages.STAGES` and checks that every need was produced before.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Iterator, TypeVar


@dataclass(frozen=True)
class Gate:
    name: str
    value: float | None
    limit: float
    passed: bool

    def as_dict(self) -> dict[str, Any]:
        return {"value": self.value, "limit": self.limit, "passed": self.passed}


@dataclass(frozen=True, kw_only=True)
class StageResult:
    report: dict[str, Any] = field(default_factory=dict)  # report.json's top-level keys → this stage's part of them
    gates: tuple[Gate, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["gates"] = [asdict(g) for g in self.gates]
        return {k: str(v) if isinstance(v, Path) else v for k, v in out.items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]):
        """The result as `to_json` wrote it; a field it lacks keeps its default."""
        kwargs = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            if f.name == "gates":
                value = tuple(Gate(**g) for g in value)
            elif "Path" in str(f.type) and value is not None:
                value = Path(value)
            kwargs[f.name] = value
        return cls(**kwargs)


@dataclass(frozen=True, kw_only=True)
class TeacherResult(StageResult):
    accuracy: float | None = None  # test accuracy in PyTorch; None when the pipeline has no teacher


@dataclass(frozen=True, kw_only=True)
class SearchResult(StageResult):
    method: str
    params: dict[str, Any]
    student_checkpoint: Path | None = None  # the best trial's student, when distill may reuse it


@dataclass(frozen=True, kw_only=True)
class DistillResult(StageResult):
    accuracy_torch: float


@dataclass(frozen=True, kw_only=True)
class ExportResult(StageResult):
    onnx_path: Path  # the FP32 student, or the model `kdpipe validate` was given
    input: str | None = None  # the graph's input contract (float, uint8); None for a given model
    teacher_onnx_path: Path | None = None
    int8_onnx_path: Path | None = None
    qat_onnx_path: Path | None = None


@dataclass(frozen=True, kw_only=True)
class ValidateResult(StageResult):
    onnx_path: Path  # the delivered model
    accuracy: float
    latency_ms: dict[str, dict[str, Any]]  # batch size → p50, p99, throughput, io_binding
    size_bytes: int
    precision: str  # fp32 | int8
    quantization: str  # none | dynamic | static | qat
    providers_used: list[str]


@dataclass(frozen=True, kw_only=True)
class RegisterResult(StageResult):
    model_uri: str | None = None
    model_name: str | None = None
    version: str | None = None


R = TypeVar("R", bound=StageResult)


class Results:
    """The results of the stages run so far, one per type, in run order."""

    def __init__(self) -> None:
        self._held: dict[type[StageResult], StageResult] = {}

    def add(self, result: StageResult) -> None:
        self._held[type(result)] = result

    def __getitem__(self, kind: type[R]) -> R:
        try:
            return self._held[kind]  # type: ignore[return-value]
        except KeyError:
            raise LookupError(f"no {kind.__name__}: the stage producing it has not run") from None

    def get(self, kind: type[R]) -> R | None:
        return self._held.get(kind)  # type: ignore[return-value]

    def __iter__(self) -> Iterator[StageResult]:
        return iter(self._held.values())

    @property
    def gates(self) -> list[Gate]:
        return [g for result in self for g in result.gates]

    @property
    def gates_passed(self) -> bool:
        return all(g.passed for g in self.gates)


class Stage:
    """One step of a run. `run(ctx)` returns its `produces` result, reading only the results it `needs` (and, where
    it says so, `uses`: results of optional stages) from `ctx.results`; `restore(ctx, result)` rebuilds what the
    result does not hold (a trained model in memory) when --resume finds the stage finished, and returns the result
    to keep."""

    name: ClassVar[str]
    needs: ClassVar[tuple[type[StageResult], ...]] = ()
    uses: ClassVar[tuple[type[StageResult], ...]] = ()
    produces: ClassVar[type[StageResult]]
    main_rank_only: ClassVar[bool] = False  # under torchrun, ranks other than 0 skip it (they only train)
    for_given_model: ClassVar[bool] = False  # runs for `kdpipe validate MODEL.onnx` too

    def applies(self, pipeline) -> bool:
        return True

    def run(self, ctx) -> StageResult:
        raise NotImplementedError

    def restore(self, ctx, result: StageResult) -> StageResult:
        return result
