"""The ShortGPT paper's analyses of a model, one function each, every layer removal done in memory.

- `metrics` (paper Fig. 8): every importance metric per layer from one scoring pass, each min–max normalised to
  [0, 1] so they share an axis, and the Spearman rank correlation of each with BI.
- `single-layer` (paper Fig. 3): each layer removed alone; held-out perplexity (and, with tasks, multiple-choice
  accuracy) per removed layer, beside that layer's BI.
- `ratio-sweep` (paper Fig. 5): held-out perplexity (and, with tasks, MC average accuracy) against the number of
  layers removed, for several removal orders (BI, the other metrics, iterative BI, Gromov et al.'s angular block,
  and `ppl_greedy` from greedy.py).
- `heads` (paper Fig. 6): each attention head ablated alone; held-out perplexity per head.
- `orthogonality` (paper Table 2): dense, pruned and their GPTQ checkpoints measured alike (orthogonality.py).

Layers are removed with `modeling.layers_removed` (exactly as surgery would, but nothing is written). Each
analysis writes DIR/<name>.json (settings, results, provenance) and DIR/<name>.png. The calibration text (orders
and greedy choices) and the held-out text (everything measured) must differ.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ShortGPTError
from .manifest import provenance
from .run import ANALYSES, RunDir

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .calibration import CalibrationSet
    from .evaluate import Perplexity
    from .importance import LayerScores
    from .recipe import CalibrationSpec
    from .tasks import LoadedTask

logger = logging.getLogger(__name__)

TASKS_AT = ("all", "25")
ORDERS = ("bi", "relative_magnitude", "sequential", "reverse", "angular", "iterative_bi", "ppl_greedy")
PROTECTION_NOTE = (
    "Protected layers are never removed by any order. sequential = ascending layer index among unprotected layers, "
    "reverse = descending among unprotected layers (the paper's Sequential starts at layer 0, which the default "
    "protection keeps); angular = the contiguous block of n layers (no protected layer inside) whose input and "
    "output are closest in angle, chosen afresh for each n, so its sets need not be nested."
)


class AnalysisError(ShortGPTError):
    """Analysis settings that cannot work."""


@dataclass(frozen=True)
class AnalysisSettings:
    """What an analysis measures on; the defaults keep each analysis of a 135M model to minutes on 2 cores."""

    calibration: CalibrationSpec  # orders: BI and the other metrics, iterative BI
    greedy_calibration: CalibrationSpec  # ppl_greedy's calibration perplexity (same text, smaller budget)
    heldout: str = "austen:persuasion"
    max_tokens: int = 2048
    context_len: int = 512
    stride: int = 512
    max_ratio: float = 0.5
    step: int = 2
    orders: tuple[str, ...] = ORDERS
    protect: tuple[int, ...] = (0, -1)
    tasks: tuple[str, ...] = ()  # multiple-choice tasks measured beside perplexity (tasks.py)
    limit: int | None = 100
    shots: int | None = None  # the task's default (MMLU 5, others 0)
    tasks_at: str = "all"  # ratio-sweep: MC at every sweep point ("all") or only at 0 and 25% ("25")
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not 0 < self.max_ratio < 1:
            raise AnalysisError(f"--max-ratio must be between 0 and 1 (exclusive), e.g. 0.5; got {self.max_ratio}")
        if self.step < 1:
            raise AnalysisError(f"--step must be at least 1 (layers between sweep points); got {self.step}")
        if self.tasks_at not in TASKS_AT:
            raise AnalysisError(f"--tasks-at must be one of {', '.join(TASKS_AT)}; got {self.tasks_at!r}")
        unknown = [o for o in self.orders if o not in ORDERS]
        if unknown or not self.orders:
            raise AnalysisError(f"unknown removal order {unknown or self.orders}; known: {', '.join(ORDERS)}")
        calibration = {self.calibration.source, self.calibration.offline, *map(str, self.calibration.files or [])}
        if self.heldout in calibration or f"offline:{self.heldout}" in calibration:
            raise AnalysisError(
                f"held-out text {self.heldout} is the calibration text: give --heldout another text, e.g. "
                "austen:persuasion, so that the orders are not measured on what chose them"
            )

    def heldout_settings(self) -> dict[str, Any]:
        return {
            "text": self.heldout,
            "max_tokens": self.max_tokens,
            "context_len": self.context_len,
            "stride": self.stride,
        }


def check_what(what: str) -> str:
    if what not in ANALYSES:
        raise AnalysisError(f"unknown analysis {what!r} for --what; known: {', '.join(ANALYSES)}")
    return what


def is_run_folder(model_spec: str) -> bool:
    return RunDir(Path(model_spec)).is_run_folder()


def model_of_run(model_spec: str) -> str:
    """A build's run folder stands for its recipe's model (the dense one); anything else is a model spec."""
    if not is_run_folder(model_spec):
        return model_spec
    path = RunDir(Path(model_spec)).model_path()
    if path is None:
        raise AnalysisError(f"{model_spec}/manifest.json names no recipe model; give the model itself instead")
    return path


def default_out_dir(model_spec: str) -> Path:
    """A build's run folder itself (so that its report shows the analysis), else runs/analysis-<model name>:
    offline:NAME → NAME, a folder or file → its name, org/name → name."""
    if is_run_folder(model_spec):
        return Path(model_spec)
    name = model_spec.split(":", 1)[1] if model_spec.startswith("offline:") else model_spec.rstrip("/")
    return Path("runs") / f"analysis-{Path(name).stem if name.endswith('.gguf') else Path(name).name}"


# ---------------------------------------------------------------------------------------------------- math
def min_max(values: list[float]) -> list[float]:
    """(v − min) / (max − min): min → 0, max → 1; a constant list maps to all zeros."""
    lo, hi = min(values), max(values)
    return [0.0 if hi == lo else (v - lo) / (hi - lo) for v in values]


def ranks(values: list[float]) -> list[float]:
    """1-based ranks; ties share the mean of the ranks they span (as scipy.stats.rankdata)."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float | None:
    """Pearson correlation of the ranks of a and b; None when either is constant (undefined)."""
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return None if var == 0 else cov / var


def sweep_grid(num_layers: int, removable: int, *, max_ratio: float, step: int) -> tuple[list[int], int]:
    """n = 0, step, 2·step, … ≤ max_ratio × layers (and ≤ removable), plus the 25% point; returns (grid, n25)."""
    n_max = min(math.floor(max_ratio * num_layers), removable)
    n25 = min(round(0.25 * num_layers), removable)
    return sorted(set(range(0, n_max + 1, step)) | {n25}), n25


# ------------------------------------------------------------------------------------------ the analyses
@dataclass
class Context:
    """A loaded model and what every analysis measures with; held-out perplexities are memoised by removed set."""

    model: PreTrainedModel | None  # None: the metrics are streamed from `streamed` (a checkpoint folder)
    tokenizer: PreTrainedTokenizerBase
    add_bos: bool
    settings: AnalysisSettings
    calibration: CalibrationSet
    greedy_calibration: CalibrationSet
    tasks: list[LoadedTask] = field(default_factory=list)
    progress: bool = True
    _heldout: list[int] | None = None
    _measured: dict[frozenset[int], dict[str, float]] = field(default_factory=dict)
    streamed: Path | None = None

    @property
    def num_layers(self) -> int:
        from .checkpoint import read_config_layers
        from .modeling import decoder_layers

        if self.model is None:
            assert self.streamed is not None
            return read_config_layers(self.streamed)
        return len(decoder_layers(self.model))

    def heldout_ids(self) -> list[int]:
        from .evaluate import heldout_token_ids

        if self._heldout is None:
            s = self.settings
            self._heldout = heldout_token_ids(self.tokenizer, s.heldout, max_tokens=s.max_tokens, add_bos=self.add_bos)
        return self._heldout

    def heldout_perplexity(self) -> Perplexity:
        """Held-out perplexity of the model as it stands (inside layers_removed or heads_removed)."""
        from .evaluate import perplexity

        s = self.settings
        return perplexity(
            self.model, self.heldout_ids(), context_len=s.context_len, stride=s.stride, text=s.heldout, progress=False
        )

    def measure(self, removed: set[int] | frozenset[int], *, tasks: bool = True) -> dict[str, Any]:
        """Held-out perplexity of the model with `removed` layers gone, and (if `tasks` and the settings name tasks)
        each task's acc/acc_norm and their averages `mc_acc`/`mc_acc_norm`."""
        from .modeling import layers_removed
        from .multiple_choice import run_tasks

        key = frozenset(removed)
        row = self._measured.setdefault(key, {})
        s = self.settings
        with layers_removed(self.model, key):
            if "perplexity" not in row:
                ppl = self.heldout_perplexity()
                row |= {"perplexity": ppl.perplexity, "nll_per_token": ppl.nll_per_token}
            if tasks and self.tasks and "mc_acc" not in row:
                got = run_tasks(
                    self.model,
                    self.tokenizer,
                    self.tasks,
                    batch_size=s.batch_size,
                    add_bos=self.add_bos,
                    progress=False,
                )
                row |= {
                    "tasks": {name: {k: r[k] for k in ("acc", "acc_norm")} for name, r in got["tasks"].items()},
                    "mc_acc": got["average"]["acc"],
                    "mc_acc_norm": got["average"]["acc_norm"],
                }
        return dict(row)

    def scores(self) -> LayerScores:
        """One scoring pass: every metric per layer, and the angular distance between every pair of boundaries."""
        from .importance import score_layers
        from .streaming import score_streamed

        if self.model is None:
            assert self.streamed is not None
            return score_streamed(self.streamed, self.calibration, metric="angular", progress=self.progress)
        return score_layers(self.model, self.calibration, metric="angular", progress=self.progress)


def metrics_analysis(ctx: Context) -> dict[str, Any]:
    """Paper Fig. 8: every metric per layer, raw and min–max normalised, and its Spearman correlation with BI."""
    raw = ctx.scores().all_metrics
    return {
        "num_layers": ctx.num_layers,
        "raw": raw,
        "normalised": {name: min_max(v) for name, v in raw.items()},
        "spearman_with_bi": {name: spearman(v, raw["bi"]) for name, v in raw.items()},
        "note": "sequential and reverse are positions, not measurements; angular is per layer (a block of one).",
    }


def single_layer_analysis(ctx: Context) -> dict[str, Any]:
    """Paper Fig. 3: each layer removed alone (protection does not apply: every layer is measured)."""
    from .runtime import tqdm

    bi = ctx.scores().all_metrics["bi"]
    dense = ctx.measure(frozenset())  # with the tasks, when given: every point is measured alike
    layers = [
        {"layer": i, "bi": bi[i], **ctx.measure({i})}
        for i in tqdm(range(ctx.num_layers), desc="single layer", unit="layer", disable=not ctx.progress)
    ]
    return {"num_layers": ctx.num_layers, "dense": dense, "layers": layers}


def heads_analysis(ctx: Context) -> dict[str, Any]:
    """Paper Fig. 6: each attention head ablated alone (modeling.heads_removed); held-out perplexity per head."""
    from .modeling import attention_heads, heads_removed
    from .runtime import tqdm

    num_heads, _ = attention_heads(ctx.model)
    dense = ctx.measure(frozenset(), tasks=False)["perplexity"]
    grid = [[0.0] * num_heads for _ in range(ctx.num_layers)]
    pairs = [(i, h) for i in range(ctx.num_layers) for h in range(num_heads)]
    for i, h in tqdm(pairs, desc="heads", unit="head", disable=not ctx.progress):
        with heads_removed(ctx.model, {(i, h)}):
            grid[i][h] = ctx.heldout_perplexity().perplexity
    increase = [[100 * (p / dense - 1) for p in row] for row in grid]
    worst = max(pairs, key=lambda ih: grid[ih[0]][ih[1]])
    return {
        "num_layers": ctx.num_layers,
        "num_heads": num_heads,
        "dense": {"perplexity": dense},
        "perplexity": grid,
        "increase_pct": increase,
        "per_layer_mean_increase_pct": [sum(row) / num_heads for row in increase],
        "most_important_head": {"layer": worst[0], "head": worst[1], "perplexity": grid[worst[0]][worst[1]]},
    }


def metric_order(values: list[float], protected: frozenset[int]) -> list[int]:
    """Unprotected layers, lowest value first (ties: lower index)."""
    return [i for i in sorted(range(len(values)), key=lambda i: (values[i], i)) if i not in protected]


def _removal_sets(ctx: Context, grid: list[int], protected: frozenset[int]) -> tuple[dict, dict]:
    """order name → {n: removed layers}, and order name → how the order was obtained (full order, cost)."""
    from .greedy import ppl_greedy_order
    from .importance import score_iteratively
    from .plan import make_plan

    n_max, s = grid[-1], ctx.settings
    scores = ctx.scores()
    orders: dict[str, list[int]] = {}
    info: dict[str, dict[str, Any]] = {}
    for name in s.orders:
        start = time.perf_counter()
        if name in scores.all_metrics and name != "angular":
            orders[name] = metric_order(scores.all_metrics[name], protected)
        elif name == "iterative_bi":
            it = score_iteratively(
                ctx.model, ctx.calibration, metric="bi", n_remove=n_max, protected=protected, progress=ctx.progress
            )
            orders[name] = it.removal_order[:n_max]
        elif name == "ppl_greedy":
            greedy = ppl_greedy_order(
                ctx.model, ctx.greedy_calibration, n_remove=n_max, protected=protected, progress=ctx.progress
            )
            orders[name] = greedy.removal_order
            info[name] = {"steps": greedy.steps, "forward_passes": greedy.forward_passes}
        info.setdefault(name, {})["order_duration_s"] = round(time.perf_counter() - start, 2)
    sets = {name: {n: sorted(order[:n]) for n in grid} for name, order in orders.items()}
    for name, order in orders.items():
        info[name]["removal_order"] = order
    if "angular" in s.orders:
        plans = {
            n: make_plan(num_layers=ctx.num_layers, scores=scores, n_remove=n, protect=sorted(protected))
            for n in grid
            if n
        }
        sets["angular"] = {n: sorted(plans[n].remove) if n else [] for n in grid}
        info["angular"]["blocks"] = {str(n): sets["angular"][n] for n in grid}
    return {name: sets[name] for name in s.orders}, info


def ratio_sweep_analysis(ctx: Context) -> dict[str, Any]:
    """Paper Fig. 5: held-out perplexity against the number of layers removed, for every removal order."""
    from .evaluate import retention_pct
    from .plan import normalize_protected
    from .runtime import tqdm

    s, num_layers = ctx.settings, ctx.num_layers
    protected = frozenset(normalize_protected(list(s.protect), num_layers))
    grid, n25 = sweep_grid(num_layers, num_layers - len(protected), max_ratio=s.max_ratio, step=s.step)
    sets, info = _removal_sets(ctx, grid, protected)
    points = [(name, n) for name in sets for n in grid]
    with_tasks = {n for n in grid if s.tasks_at == "all" or n in (0, n25)}
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in sets}
    for name, n in tqdm(points, desc="ratio sweep", unit="point", disable=not ctx.progress):
        row = ctx.measure(set(sets[name][n]), tasks=n in with_tasks)
        rows[name].append({"n": n, "removed": sets[name][n], **row})
    table = {name: {str(r["n"]): r["perplexity"] for r in rs} for name, rs in rows.items()}
    mc: dict[str, Any] = {}
    if ctx.tasks:
        mc_table = {name: {str(r["n"]): r["mc_acc"] for r in rs if "mc_acc" in r} for name, rs in rows.items()}
        dense_mc = ctx.measure(frozenset())["mc_acc"]
        mc = {
            "tasks_at": s.tasks_at,
            "mc_table": mc_table,
            "dense_mc_acc": dense_mc,
            "at_25_percent_mc": {name: t[str(n25)] for name, t in mc_table.items()},
            "retention_at_25_percent": {name: retention_pct(t[str(n25)], dense_mc) for name, t in mc_table.items()},
        }
    return {
        "num_layers": num_layers,
        "max_ratio": s.max_ratio,
        "step": s.step,
        "protected": sorted(protected),
        "protection": PROTECTION_NOTE,
        "grid": grid,
        "n_at_25_percent": n25,
        "at_25_percent": {name: t[str(n25)] for name, t in table.items()},
        "perplexity_table": table,
        **mc,
        "orders": info,
        "points": rows,
    }


ANALYZERS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "single-layer": single_layer_analysis,
    "ratio-sweep": ratio_sweep_analysis,
    "metrics": metrics_analysis,
    "heads": heads_analysis,
}


# ------------------------------------------------------------------------------------------- entry point
@dataclass(frozen=True)
class AnalysisResult:
    json_path: Path
    png_path: Path
    data: dict[str, Any]


def load_context(
    model_spec: str, settings: AnalysisSettings, *, progress: bool, what: str = "", stream: str = "auto"
) -> tuple[Context, str]:
    """The model and what the analysis `what` measures with. `metrics` needs no model in memory: with `stream`
    on, or auto when the weights do not fit, its scores are streamed one layer at a time (streaming.py)."""
    from .calibration import build_calibration, load_documents
    from .modeling import decide_add_bos, load_model, resolve_checkpoint
    from .recipe import PruneSpec
    from .streaming import should_stream
    from .tasks import load_task

    # before the model, so that an unknown task or missing task data fails at once
    tasks = [load_task(name, limit=settings.limit, shots=settings.shots) for name in settings.tasks]
    docs = load_documents(settings.calibration)  # so does a missing or binary calibration file
    checkpoint = resolve_checkpoint(model_spec)
    streamed = None
    scoring = PruneSpec(metric="angular", n_remove=1, stream=stream)  # type: ignore[arg-type]
    if what == "metrics" and should_stream(checkpoint.path, "float32", scoring):
        from transformers import AutoTokenizer

        model, tokenizer, streamed = None, AutoTokenizer.from_pretrained(checkpoint.path), checkpoint.path
    else:
        model, tokenizer = load_model(checkpoint.path)
    add_bos = decide_add_bos(tokenizer, requested=None, source=checkpoint.add_bos)
    calib, greedy = (
        build_calibration(docs, tokenizer, spec, add_bos=add_bos, source=spec.source)
        for spec in (settings.calibration, settings.greedy_calibration)
    )
    ctx = Context(model, tokenizer, add_bos, settings, calib, greedy, tasks, progress, streamed=streamed)
    return ctx, str(checkpoint.path)


def run_analysis(
    model_spec: str,
    *,
    what: str,
    settings: AnalysisSettings,
    out_dir: Path | None = None,
    progress: bool = True,
    stream: str = "auto",
) -> AnalysisResult:
    """Run one analysis (`what`, one of ANALYSES) and write out_dir/<what>.json and .png. MODEL may be a build's
    run folder: the analysis is then of its recipe's model (orthogonality: of its four checkpoints), written
    into that folder unless out_dir says otherwise."""
    check_what(what)
    start = time.perf_counter()
    out_dir = out_dir or default_out_dir(model_spec)
    if what == "orthogonality":
        from .orthogonality import orthogonality_analysis

        data = {"analysis": what, "model": model_of_run(model_spec)}
        data |= orthogonality_analysis(model_spec, settings, progress=progress)
        data |= {"duration_s": round(time.perf_counter() - start, 2), "provenance": provenance()}
        return _write(data, out_dir)
    ctx, checkpoint = load_context(model_of_run(model_spec), settings, progress=progress, what=what, stream=stream)
    results = ANALYZERS[what](ctx)
    s = settings
    data = {
        "analysis": what,
        "model": model_of_run(model_spec),
        "checkpoint": checkpoint,
        "calibration": ctx.calibration.describe() if what != "heads" else None,
        "heldout": {**s.heldout_settings(), "add_bos": ctx.add_bos} if what != "metrics" else None,
        "tasks": (
            [
                {"name": t.name, "items": len(t.items), "shots": t.shots, "split": t.split, "source": t.source}
                for t in ctx.tasks
            ]
            if ctx.tasks
            else None
        ),
        "limit": s.limit if ctx.tasks else None,
        **results,
        "duration_s": round(time.perf_counter() - start, 2),
        "provenance": provenance(),
    }
    if what == "ratio-sweep" and "ppl_greedy" in s.orders:
        data["greedy_calibration"] = ctx.greedy_calibration.describe()
    return _write(data, out_dir)


def _write(data: dict[str, Any], out_dir: Path) -> AnalysisResult:
    """out_dir/<analysis>.json and .png (replacing earlier ones; the JSON is written whole or not at all)."""
    from .analyze_plots import PLOTTERS

    what = data["analysis"]
    json_path, png_path = RunDir(out_dir).save_analysis(what, data)
    PLOTTERS[what](data, png_path)
    return AnalysisResult(json_path, png_path, data)
