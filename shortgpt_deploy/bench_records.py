"""What the serving benchmark leaves in bench/: `RunRecord` (runs.json, one per planned run) and `BenchSummary`
(summary.json). Plain data with no import of the package, so that run.py reads them for the report while
bench.py, which measures them, writes them through run.RunDir.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunRecord:
        """An entry of any version: repeat, variant and level required (a KeyError), unknown keys dropped."""
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**(known | {"repeat": d["repeat"], "variant": d["variant"], "level": d["level"]}))


# The fields finish() adds to summarize()'s; absent (None) in summaries written by hand or by early versions.
_OPTIONAL = ("workload", "ttft_ideal_ratio", "tokenizer", "sources", "provenance")


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
    provenance: dict[str, Any] | None = None

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
