"""The run's plots, as PNG files (matplotlib's Agg backend: offline, no display, no web assets).

Each function takes the data a stage wrote (LayerScores and LayerPlan, or bench's summary.json as a dict) and
writes one PNG atomically, so a crash never leaves half a picture behind.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .bench import LATENCY_METRICS, PERCENTILES

if TYPE_CHECKING:  # importance imports torch; plotting needs only the numbers
    from .importance import LayerScores
    from .plan import LayerPlan

METRIC_LABELS = {
    "bi": "Block Influence (1 − mean cos)",
    "relative_magnitude": "Relative magnitude ‖f(x)‖/‖x+f(x)‖",
    "angular": "Angular distance (arccos/π)",
    "sequential": "Sequential order",
    "reverse": "Reverse order",
    "ppl_greedy": "Calibration perplexity after removal (greedy)",
}
LATENCY_NAMES = {"ttft": "time to first token", "tpot": "time per output token", "itl": "inter-token latency",
                 "e2el": "end-to-end latency"}  # fmt: skip


def repeats_planned(summary: dict[str, Any]) -> int:
    """Repeats planned: the workload's, else the most any cell has."""
    cells = [c["repeats"] for levels in summary["variants"].values() for c in levels.values()]
    return int(summary.get("workload", {}).get("repeats") or max(cells, default=0))


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig: Any, path: Path) -> Path:
    """Save beside the target, then rename over it, so a crash never leaves half a PNG behind."""
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    fig.savefig(tmp, format="png")
    _pyplot().close(fig)
    os.replace(tmp, path)
    return path


def plot_scores(scores: LayerScores, plan: LayerPlan | None, path: Path, *, title: str = "") -> Path:
    """Bar chart of the score per layer, removed layers in red and protected ones hatched."""
    plt = _pyplot()
    removed = set(plan.remove) if plan else set()
    protected = set(plan.protected) if plan else set()
    colors = ["tab:red" if i in removed else "tab:blue" for i in range(scores.num_layers)]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * scores.num_layers + 2), 3.6), dpi=120)
    bars = ax.bar(range(scores.num_layers), scores.scores, color=colors)
    for i in protected:
        bars[i].set_hatch("//")
        bars[i].set_alpha(0.6)
    ax.set_xlabel("layer")
    ax.set_ylabel(METRIC_LABELS.get(scores.metric, scores.metric))
    ax.set_xticks(range(0, scores.num_layers, 1 if scores.num_layers <= 40 else 4))
    ax.tick_params(axis="x", labelsize=7)
    if scores.metric == "bi" and max(scores.scores) > 20 * sorted(scores.scores)[len(scores.scores) // 2]:
        ax.set_yscale("log")  # layer 0 often dwarfs the rest; a log axis keeps the small ones readable
    from matplotlib.patches import Patch

    handles = [Patch(color="tab:blue", label="kept"), Patch(color="tab:red", label="removed")]
    if protected:
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="protected"))
    ax.legend(handles=handles, fontsize=8, loc="upper right")
    ax.set_title(title or f"{scores.model}: {scores.metric} per layer", fontsize=10)
    fig.tight_layout()
    return _save_png(fig, path)


def _level_label(level: str) -> str:
    """c4 → "4 in flight", r0.5 → "0.5 req/s" (bench.Level.label's two forms)."""
    return f"{level[1:]} in flight" if level.startswith("c") else f"{level[1:]} req/s"


def _offsets(n: int, width: float) -> list[float]:
    return [(k - (n - 1) / 2) * width for k in range(n)]


def plot_throughput(summary: dict[str, Any], path: Path) -> Path:
    """Output tokens/s per load level and variant: the median over repeats, error bars from min to max."""
    plt = _pyplot()
    levels, variants = summary["levels"], list(summary["variants"])
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(levels) + 3.5), 4.0), dpi=120)
    for k, (v, dx) in enumerate(zip(variants, _offsets(len(variants), 0.08), strict=True)):
        points = []  # (x, median, low, high); side by side within a level so the error bars do not overlap
        for i, lv in enumerate(levels):
            c = summary["variants"][v].get(lv) or {}
            if (tps := (c.get("median") or {}).get("output_tokens_per_s")) is not None:
                lo, hi = c.get("tokens_per_s_range") or (tps, tps)
                points.append((i + dx, tps, tps - lo, hi - tps))
        if points:
            x, y, lo, hi = zip(*points, strict=True)
            ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=4, color=f"C{k}", label=v)
    ax.set_xticks(range(len(levels)), [_level_label(lv) for lv in levels])
    ax.set_xlim(-0.5, len(levels) - 0.5)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("load level")
    ax.set_ylabel("output tokens/s")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(f"Output tokens/s: median of {repeats_planned(summary)} repeats, bars min–max", fontsize=10)
    fig.tight_layout()
    return _save_png(fig, path)


def _shade(color: str, strength: float) -> tuple[float, float, float]:
    """`color` mixed with white: strength 1 is the color itself, 0 is white."""
    from matplotlib.colors import to_rgb

    r, g, b = to_rgb(color)
    return (1 - strength * (1 - r), 1 - strength * (1 - g), 1 - strength * (1 - b))


def plot_latency(summary: dict[str, Any], path: Path) -> Path:
    """One panel per latency metric; per level a bar per variant, p99 drawn behind p90 behind p50 (darkest)."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    levels, variants = summary["levels"], list(summary["variants"])
    strength = dict(zip(sorted(PERCENTILES), (1.0, 0.6, 0.3), strict=False))
    width = 0.8 / len(variants)
    fig, axes = plt.subplots(2, 2, figsize=(max(9.0, 1.2 * len(levels) * len(variants) + 4), 7.0), dpi=120)
    for ax, metric in zip(axes.flat, LATENCY_METRICS, strict=False):
        for k, (v, dx) in enumerate(zip(variants, _offsets(len(variants), width), strict=True)):
            for p in sorted(PERCENTILES, reverse=True):
                cells = [(i + dx, (summary["variants"][v].get(lv) or {}).get("median")) for i, lv in enumerate(levels)]
                bars = [(x, m[f"p{p}_{metric}_ms"]) for x, m in cells if m and m.get(f"p{p}_{metric}_ms") is not None]
                if bars:
                    x, y = zip(*bars, strict=True)
                    ax.bar(x, y, width * 0.9, color=_shade(f"C{k}", strength[p]), edgecolor=f"C{k}", linewidth=0.6)
        ax.set_xticks(range(len(levels)), [_level_label(lv) for lv in levels])
        ax.set_ylabel("ms")
        ax.set_title(f"{metric.upper()}: {LATENCY_NAMES[metric]}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    handles = [Patch(color=f"C{k}", label=v) for k, v in enumerate(variants)]
    handles += [Patch(facecolor=_shade("0.3", strength[p]), edgecolor="0.3", label=f"p{p}") for p in PERCENTILES]
    fig.suptitle("Latency percentiles (medians over repeats)", y=0.985, fontsize=11)
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.95), ncol=len(handles), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return _save_png(fig, path)
