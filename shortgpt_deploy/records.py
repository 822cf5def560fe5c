"""The records a run folder holds that a stage measures and the report reads back: `EvalResult` (eval.json),
`RunRecord` (bench/runs.json, one per planned run) and `BenchSummary` (bench/summary.json). Plain data with no
import of the package (nor of torch), so that run.py loads them for the report while evaluate.py and bench.py,
which measure them, write them through run.RunDir.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RunRecord:
    repeat: int
    variant: str
    level: str
    status: str = "pending"  # ok | requests_failed | failed | timeout | server_died | server_failed | skipped
    result_file: str | None = None
    duration_s: float | None = None
    load_1min: float | None = None  # at the end of the run: high values flag a machine shared with other work
    message: str = ""
    seed: int | None = None  # of its prompts: the workload's seed + the run's (repeat, level) index

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunRecord:
        """An entry of any version: repeat, variant and level required (a KeyError), unknown keys dropped."""
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**(known | {"repeat": d["repeat"], "variant": d["variant"], "level": d["level"]}))


# The fields finish() adds to summarize()'s; absent (None) in summaries written by hand or by early versions.
_OPTIONAL = ("workload", "ttft_ideal_ratio", "tokenizer", "sources", "dtypes", "provenance", "restart", "server_starts")


@dataclass
class BenchSummary:
    """bench/summary.json: the first variant is the baseline of every ratio. `variants[v][level]` is a cell
    (repeats, median metrics, tokens/s range and ratio to the baseline) and stays a dict: the tables and plots
    (serving_tables.py, plots.py) read the summary as `to_dict()`, the layout of summary.json."""

    baseline: str
    levels: list[str]
    flops_per_token: dict[str, int | None]
    ideal_ratio: dict[str, float | None]  # baseline FLOPs ÷ the variant's: the tokens/s ratio if time followed FLOPs
    variants: dict[str, dict[str, dict[str, Any]]]
    workload: dict[str, Any] | None = None  # bench.Workload as JSON
    ttft_ideal_ratio: dict[str, float | None] | None = None  # baseline ÷ variant prefill FLOPs per prompt token
    tokenizer: str | None = None
    sources: dict[str, str] | None = None  # variant → model folder or endpoint URL
    # variant → the --dtype its vLLM server was started with (None: an endpoint, or a server that never started);
    # absent from summaries written before it was recorded.
    dtypes: dict[str, str | None] | None = None
    provenance: dict[str, Any] | None = None
    restart: str | None = None  # per_repeat | once: whether the servers were started again for each repeat
    server_starts: dict[str, int] | None = None  # variant → vLLM servers started for it (an endpoint: 0)

    def to_dict(self) -> dict[str, Any]:
        """summary.json's object, its keys in the order bench has always written them."""
        return {k: v for k, v in asdict(self).items() if v is not None or k not in _OPTIONAL}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchSummary:
        """A summary.json of any version: summarize()'s fields required (a KeyError), the others may be absent;
        unknown keys (schema_version) are dropped."""
        if not isinstance(d.get("variants"), dict):
            raise TypeError("a summary's `variants` is an object of variant → level → cell")
        required = {k: d[k] for k in ("baseline", "levels", "flops_per_token", "ideal_ratio", "variants")}
        return cls(**required, **{k: d.get(k) for k in _OPTIONAL})


@dataclass
class EvalResult:
    """What the eval stage measured: the content of eval.json (`to_dict`), in the layout earlier versions wrote,
    so that the report and old run folders read it unchanged. Optional parts are left out of the JSON when empty:
    prompted perplexity (only with a gen variant), the generation probe, task accuracy, and the run's `models`
    and `provenance` (the eval stage adds them; analyses do not)."""

    text: str
    context_len: int
    stride: int
    max_tokens: int
    greedy_prompts: int
    greedy_tokens: int
    dtype: str
    perplexity: dict[str, dict[str, Any]]  # variant → Perplexity.to_dict(); none for a gen variant
    agreement: list[dict[str, Any]]  # Agreement.to_dict() per (variant, reference)
    greedy_tokens_by_variant: dict[str, list[list[int]]]
    prompted_perplexity: dict[str, dict[str, Any]] = field(default_factory=dict)  # with a gen variant: every one
    gen_variants: list[str] = field(default_factory=list)
    generation: dict[str, dict[str, float]] | None = None
    tasks: list[str] = field(default_factory=list)
    limit: int | None = None
    accuracy: dict[str, dict[str, Any]] = field(default_factory=dict)  # variant → run_tasks' result
    retention_pct: dict[str, float] = field(default_factory=dict)
    models: dict[str, str] | None = None
    provenance: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        settings = ("text", "context_len", "stride", "max_tokens", "greedy_prompts", "greedy_tokens", "dtype")
        out: dict[str, Any] = {k: getattr(self, k) for k in settings}
        out |= {"perplexity": self.perplexity, "agreement": self.agreement}
        out["greedy_tokens_by_variant"] = self.greedy_tokens_by_variant
        if self.prompted_perplexity:
            out |= {"prompted_perplexity": self.prompted_perplexity, "gen_variants": self.gen_variants}
        if self.generation is not None:
            out["generation"] = self.generation
        if self.tasks:
            out |= {"tasks": self.tasks, "limit": self.limit, "accuracy": self.accuracy}
            out["retention_pct"] = self.retention_pct
        out |= {k: v for k, v in (("models", self.models), ("provenance", self.provenance)) if v is not None}
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalResult:
        """The inverse of to_dict, for an eval.json of any version: the text, window and perplexities are
        required (a KeyError); the optional parts, and the greedy settings and dtype that early files lack, take
        empty values; unknown keys (schema_version) are dropped."""
        fields = {k: d[k] for k in cls.__dataclass_fields__ if d.get(k) is not None}
        early = {"greedy_prompts": 0, "greedy_tokens": 0, "dtype": "", "agreement": [], "greedy_tokens_by_variant": {}}
        required = {k: d[k] for k in ("text", "context_len", "stride", "max_tokens", "perplexity")}
        return cls(**(early | fields | required))
