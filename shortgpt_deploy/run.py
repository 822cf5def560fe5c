"""THE run folder: where each artifact lives, how it is read and written, the typed manifest and StageStatus.

Every stage, the report, the analyses and the CLI reach a run folder through `RunDir`; nobody else joins a
run-folder path or parses a status string. Each artifact loads as the type its stage made (LayerScores,
LayerPlan, BudgetResult, RepairResult, QuantizedVariant per variant, EvalResult, BenchSummary and RunRecord);
the analyses stay JSON objects (their layouts are analyze_plots' business). What run.py writes carries
`schema_version` (SCHEMA_VERSION) first, except bench/runs.json, a list as earlier reports read it; what it
reads may lack it, because run folders from earlier versions exist (runs/), and those still load. A file that
is damaged, foreign or from a newer version is a RunFolderError naming the file and the fix.

    recipe.yaml  manifest.json  scores.json  plan.json  budget.json  bi.png   (score and prune)
    pruned/  gen/  repaired/  repair.json  dense-gptq/ ...  quantize.json     (the checkpoints and how made)
    eval.json  bench/{summary,runs}.json  report.md  plots/  logs/<stage>.log  <analysis>.json/.png
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from .errors import ShortGPTError
from .files import atomic_write_text
from .manifest import git_revision, machine, package_versions

if TYPE_CHECKING:
    from .budget import BudgetResult
    from .importance import LayerScores
    from .plan import LayerPlan
    from .quantize import QuantizedVariant
    from .records import BenchSummary, EvalResult, RunRecord
    from .repair import RepairResult

T = TypeVar("T")

SCHEMA_VERSION = 1
# The analyses `analyze RUN_DIR --what ...` can write into a run folder (analyze.py runs them; the report lists
# them): here so that the report finds their files without importing the analyses.
ANALYSES = ("single-layer", "ratio-sweep", "metrics", "orthogonality", "heads")


class RunFolderError(ShortGPTError):
    """A folder that is not a run folder, or an artifact in it that cannot be read."""


# ---------------------------------------------------------------------------------------------- stage status
State = Literal["complete", "failed", "skipped", "not run", "interrupted"]
_STATES: tuple[State, ...] = ("complete", "failed", "skipped", "not run", "interrupted")


@dataclass(frozen=True)
class StageStatus:
    """What became of one stage. `servable`: for a stage that makes checkpoints, whether this machine's vLLM can
    serve them (False: made for quality only, e.g. GPTQ for a GPU on an AVX2-only CPU); None where it does not
    apply."""

    state: State
    note: str = ""
    servable: bool | None = None

    @property
    def ok(self) -> bool:
        return self.state == "complete"

    def text(self) -> str:
        """One line for people (the report's stage table, the console), as earlier versions wrote it."""
        if not self.note:
            return self.state
        return f"{self.state} ({self.note})" if self.state == "complete" else f"{self.state}: {self.note}"

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "note": self.note} | ({} if self.servable is None else {"servable": self.servable})

    @classmethod
    def from_json(cls, value: str | dict[str, Any]) -> StageStatus:
        """A manifest's entry: the dict written now, or the string of earlier versions ("failed: why",
        "complete (note)", "skipped (dry run)"), parsed here and nowhere else."""
        if isinstance(value, dict):
            return cls(value["state"], value.get("note", ""), value.get("servable"))
        state = next((s for s in _STATES if value.startswith(s)), None)
        if state is None:
            return cls("not run", value)
        rest = value[len(state) :].strip()
        note = rest[1:].strip() if rest.startswith(":") else rest.removeprefix("(").removesuffix(")")
        # before the servable flag existed, a quantize stage said "quality only" in its note
        return cls(state, note, False if "quality only" in note else None)


# ---------------------------------------------------------------------------------------------- the manifest
@dataclass
class Manifest:
    """Provenance and progress of a run: command, versions, machine, timings, seeds, variants, stage statuses."""

    command: list[str] = field(default_factory=lambda: list(sys.argv))
    started_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    packages: dict[str, str] = field(default_factory=package_versions)
    git_revision: str | None = field(default_factory=git_revision)
    machine: dict[str, Any] = field(default_factory=machine)
    seeds: dict[str, int] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, str] = field(default_factory=dict)  # checkpoint name → folder (relative: in the run folder)
    stages: dict[str, StageStatus] = field(default_factory=dict)
    status: str = "running"
    schema_version: int = SCHEMA_VERSION

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings_s[stage] = round(time.perf_counter() - start, 3)

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"stages": {k: s.to_json() for k, s in self.stages.items()}}

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Manifest:
        """A manifest.json of any version: fields it lacks take empty values, not this machine's (it was not
        built here), and unknown ones are dropped."""
        known = {k: d[k] for k in cls.__dataclass_fields__ if d.get(k) is not None}  # a null field: its default
        known.setdefault("schema_version", 0)  # written before schema versions
        defaults = {"command": [], "started_at": "", "packages": {}, "git_revision": None, "machine": {},
                    "status": "unknown"}  # fmt: skip
        stages = {k: StageStatus.from_json(v) for k, v in (d.get("stages") or {}).items()}
        return cls(**(defaults | known | {"stages": stages, "variants": d.get("variants") or {}}))


# ---------------------------------------------------------------------------------------------- the folder
@dataclass(frozen=True)
class RunDir:
    """One run folder: every path of its layout, and typed load/save of each artifact (None when absent)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # paths: the only place that knows the layout
    recipe = property(lambda self: self.root / "recipe.yaml")
    manifest_path = property(lambda self: self.root / "manifest.json")
    scores_path = property(lambda self: self.root / "scores.json")
    plan_path = property(lambda self: self.root / "plan.json")
    budget_path = property(lambda self: self.root / "budget.json")
    scores_plot = property(lambda self: self.root / "bi.png")
    repair_path = property(lambda self: self.root / "repair.json")
    quantize_path = property(lambda self: self.root / "quantize.json")
    eval_path = property(lambda self: self.root / "eval.json")
    bench = property(lambda self: self.root / "bench")
    bench_summary_path = property(lambda self: self.root / "bench" / "summary.json")
    bench_runs_path = property(lambda self: self.root / "bench" / "runs.json")
    bench_logs = property(lambda self: self.root / "bench" / "logs")  # server and client output of each run
    bench_lock = property(lambda self: self.root / "bench" / ".lock")  # held while a benchmark writes bench/
    report = property(lambda self: self.root / "report.md")
    plots = property(lambda self: self.root / "plots")
    logs = property(lambda self: self.root / "logs")

    def log(self, stage: str) -> Path:
        return self.logs / f"{stage}.log"

    def checkpoint(self, folder: str) -> Path:
        """A variant's folder as the manifest names it (relative: in the run folder; absolute: as it is)."""
        return self.root / folder

    def analysis_paths(self, what: str) -> tuple[Path, Path]:
        stem = what.replace("-", "_")
        return self.root / f"{stem}.json", self.root / f"{stem}.png"

    def is_run_folder(self) -> bool:
        return self.manifest_path.is_file()

    def require(self) -> RunDir:
        """Self, or a RunFolderError naming the fix when the folder holds neither a manifest nor a plan."""
        if not self.manifest_path.is_file() and not self.plan_path.is_file():
            what = "does not exist" if not self.root.exists() else "has no manifest.json or plan.json"
            raise RunFolderError(
                f"{self.root} is not a run folder: it {what}; run `shortgpt-deploy build RECIPE` first, or give "
                "the folder it wrote (the recipe's output.dir)"
            )
        return self

    # artifacts
    def load_manifest(self) -> Manifest | None:
        data = read_json(self.manifest_path)
        return None if data is None else Manifest.from_json(data)

    def save_manifest(self, manifest: Manifest) -> None:
        manifest.save(self.manifest_path)

    def load_scores(self) -> LayerScores | None:
        from .importance import LayerScores

        return LayerScores.load(self.scores_path) if self.scores_path.is_file() else None

    def save_scores(self, scores: LayerScores) -> None:
        import math

        data = asdict(scores) | {"scores": [None if math.isnan(v) else v for v in scores.scores]}  # JSON: no NaN
        write_json(self.scores_path, data)

    def load_plan(self) -> LayerPlan | None:
        from .plan import LayerPlan

        return LayerPlan.load(self.plan_path) if self.plan_path.is_file() else None

    def save_plan(self, plan: LayerPlan) -> None:
        write_json(self.plan_path, plan.to_dict())

    def load_repair(self) -> RepairResult | None:
        from .repair import RepairResult

        data = read_json(self.repair_path)
        if data is None:
            return None
        try:
            return RepairResult.from_dict(data)
        except (KeyError, TypeError) as err:
            raise RunFolderError(f"{self.repair_path} is not a repair.json written by shortgpt-deploy: {err}") from None

    def save_repair(self, result: RepairResult) -> None:
        result.save(self.repair_path)  # versioned by RepairResult itself (its schema_version)

    def load_budget(self) -> BudgetResult | None:
        from .budget import BudgetResult

        return self._load_typed(self.budget_path, BudgetResult.from_dict, "the build (its prune.budget)")

    def save_budget(self, result: BudgetResult) -> None:
        write_json(self.budget_path, result.to_dict())

    def load_quantize(self) -> dict[str, QuantizedVariant]:
        """quantize.json: quantized variant → how it was made ({} when absent). Its schema_version sits beside
        the variants (so earlier readers still iterate the entries), and is skipped here."""
        from .quantize import QuantizedVariant

        def parse(data: dict[str, Any]) -> dict[str, QuantizedVariant]:
            return {k: QuantizedVariant.from_dict(v) for k, v in data.items() if k != "schema_version"}

        return self._load_typed(self.quantize_path, parse, "the quantize stage") or {}

    def save_quantize(self, variants: dict[str, QuantizedVariant]) -> None:
        write_json(self.quantize_path, {name: v.to_dict() for name, v in variants.items()})

    def load_eval(self) -> EvalResult | None:
        from .records import EvalResult

        return self._load_typed(self.eval_path, EvalResult.from_dict, "the eval stage")

    def save_eval(self, result: EvalResult) -> None:
        write_json(self.eval_path, result.to_dict())

    def load_bench_summary(self) -> BenchSummary | None:
        from .records import BenchSummary

        return self._load_typed(self.bench_summary_path, BenchSummary.from_dict, "the benchmark")

    def save_bench_summary(self, summary: BenchSummary) -> None:
        self.bench.mkdir(parents=True, exist_ok=True)
        write_json(self.bench_summary_path, summary.to_dict())

    def load_bench_runs(self) -> list[RunRecord]:
        """bench/runs.json: every planned run's status ([] when absent)."""
        from .records import RunRecord

        def parse(data: list[dict[str, Any]]) -> list[RunRecord]:
            if not isinstance(data, list):
                raise TypeError(f"a list of runs expected, not {type(data).__name__}")
            return [RunRecord.from_dict(r) for r in data]

        return self._load_typed(self.bench_runs_path, parse, "the benchmark") or []

    def save_bench_runs(self, records: list[RunRecord]) -> None:
        """A JSON list as earlier versions wrote it (their report reads it), so without schema_version."""
        self.bench.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.bench_runs_path, json.dumps([r.to_dict() for r in records], indent=2))

    def bench_result(self, name: str) -> Path:
        """One `vllm bench serve` result (`r{repeat}-{variant}-{level}`), as vLLM's client writes it."""
        return self.bench / f"{name}.json"

    def bench_log(self, name: str) -> Path:
        return self.bench_logs / f"{name}.log"

    def load_analysis(self, what: str) -> dict[str, Any] | None:
        """An analysis's JSON object (the analyses' own layouts, read by analyze_plots); a newer or foreign file
        is a RunFolderError."""
        path = self.analysis_paths(what)[0]

        def parse(data: dict[str, Any]) -> dict[str, Any]:
            if not isinstance(data, dict):
                raise TypeError(f"a JSON object expected, not {type(data).__name__}")
            return data

        return self._load_typed(path, parse, f"`shortgpt-deploy analyze RUN_DIR --what {what}`")

    def save_analysis(self, what: str, data: dict[str, Any]) -> tuple[Path, Path]:
        self.root.mkdir(parents=True, exist_ok=True)
        json_path, png_path = self.analysis_paths(what)
        write_json(json_path, data)
        return json_path, png_path

    def _load_typed(self, path: Path, parse: Callable[[Any], T], rerun: str) -> T | None:
        """`parse` of the JSON at `path` (None when absent); a damaged, foreign or newer file is a RunFolderError
        that names the file and the fix."""
        data = read_json(path)
        if data is None:
            return None
        fix = f"re-run {rerun} to rewrite it, or delete it"
        version = data.get("schema_version", 0) if isinstance(data, dict) else 0
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise RunFolderError(
                f"{path} has schema_version {version!r}, newer than this shortgpt-deploy reads ({SCHEMA_VERSION}): "
                f"upgrade shortgpt-deploy, or {fix}"
            )
        try:
            return parse(data)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise RunFolderError(f"{path} is not a file shortgpt-deploy wrote ({err!r}); {fix}") from None

    def variant_folders(self, manifest: Manifest | None = None) -> dict[str, Path]:
        """Variant name → checkpoint folder: the manifest's `variants`, else (older folders) the dense source,
        pruned/ and quantize.json's out_dir."""
        m = manifest or self.load_manifest() or Manifest.from_json({})
        found: dict[str, str] = {}
        if src := (m.inputs.get("checkpoint") or {}).get("path"):
            found["dense"] = src
        if (self.root / "pruned").is_dir():
            found["pruned"] = "pruned"
        found |= {name: q.out_dir for name, q in self.load_quantize().items() if q.out_dir}
        return {name: self.checkpoint(p) for name, p in (found | m.variants).items()}

    def model_path(self) -> str | None:
        """The recipe's model (the dense one) of a build's run folder."""
        m = self.load_manifest()
        return None if m is None else ((m.inputs.get("recipe") or {}).get("model") or {}).get("path")


def read_json(path: Path) -> Any:
    """A JSON artifact, None when absent; a damaged one is a RunFolderError naming the fix."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RunFolderError(f"cannot read {path}: {err}; re-run the stage that writes it, or delete it") from None


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Whole or not at all, with this version's schema_version first (readers ignore it)."""
    atomic_write_text(path, json.dumps({"schema_version": SCHEMA_VERSION} | data, indent=2) + "\n")
