"""How analyze.py's results look: one PNG per analysis (paper Figs. 3, 5 and 8) and a printable table.

Each function takes the analysis's JSON content, so a plot can be redrawn from a saved file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .plots import METRIC_LABELS, _pyplot, _save_png

ORDER_LABELS = {
    "bi": "BI",
    "relative_magnitude": "relative magnitude",
    "sequential": "sequential",
    "reverse": "reverse",
    "angular": "angular block",
    "iterative_bi": "iterative BI",
    "ppl_greedy": "greedy (calibration ppl)",
}


def _layer_ticks(ax: Any, num_layers: int) -> None:
    ax.set_xticks(range(0, num_layers, 1 if num_layers <= 40 else 4))
    ax.tick_params(axis="x", labelsize=7)


def plot_metrics(data: dict[str, Any], path: Path) -> Path:
    """Every metric per layer, min–max normalised to [0, 1]; the legend gives each one's Spearman ρ with BI."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * data["num_layers"] + 3), 3.8), dpi=120)
    for name, values in data["normalised"].items():
        rho = data["spearman_with_bi"][name]
        label = METRIC_LABELS.get(name, name) + ("" if rho is None or name == "bi" else f" (ρ={rho:.2f})")
        ax.plot(range(len(values)), values, marker="o", markersize=3, label=label)
    ax.set_xlabel("layer")
    ax.set_ylabel("normalised value (min 0, max 1)")
    _layer_ticks(ax, data["num_layers"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{data['model']}: layer metrics, min–max normalised", fontsize=10)
    fig.tight_layout()
    return _save_png(fig, path)


def plot_single_layer(data: dict[str, Any], path: Path) -> Path:
    """Held-out perplexity with each layer removed alone (log y), BI per layer on a twin axis."""
    plt = _pyplot()
    layers = [r["layer"] for r in data["layers"]]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * data["num_layers"] + 3), 3.8), dpi=120)
    ax.plot(layers, [r["perplexity"] for r in data["layers"]], marker="o", color="tab:red", label="perplexity")
    ax.axhline(data["dense"]["perplexity"], color="tab:red", linestyle=":", label="dense perplexity")
    ax.set_yscale("log")
    ax.set_xlabel("removed layer")
    ax.set_ylabel(f"perplexity on {data['heldout']['text']} (log)")
    twin = ax.twinx()
    twin.bar(layers, [r["bi"] for r in data["layers"]], color="tab:blue", alpha=0.3, label="BI")
    twin.set_ylabel("Block Influence")
    ax.set_zorder(twin.get_zorder() + 1)  # the perplexity line in front of the BI bars
    ax.patch.set_visible(False)
    _layer_ticks(ax, data["num_layers"])
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=8, loc="upper right")
    ax.set_title(f"{data['model']}: one layer removed", fontsize=10)
    fig.tight_layout()
    return _save_png(fig, path)


def plot_ratio_sweep(data: dict[str, Any], path: Path) -> Path:
    """Held-out perplexity (log y) against layers removed, one line per removal order; 25% marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.2), dpi=120)
    for name, table in data["perplexity_table"].items():
        ax.plot(data["grid"], [table[str(n)] for n in data["grid"]], marker="o", label=ORDER_LABELS.get(name, name))
    ax.axvline(data["n_at_25_percent"], color="0.5", linestyle=":", label="25% of layers")
    ax.set_yscale("log")
    ax.set_xlabel(f"layers removed (of {data['num_layers']})")
    ax.set_ylabel(f"perplexity on {data['heldout']['text']} (log)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{data['model']}: perplexity by removal order", fontsize=10)
    fig.tight_layout()
    return _save_png(fig, path)


PLOTTERS: dict[str, Callable[[dict[str, Any], Path], Path]] = {
    "single-layer": plot_single_layer,
    "ratio-sweep": plot_ratio_sweep,
    "metrics": plot_metrics,
}


def summary_rows(data: dict[str, Any]) -> tuple[str, list[str], list[list[str]]]:
    """A printable table of an analysis's JSON: (title, headers, rows)."""
    what = data["analysis"]
    if what == "metrics":
        names = list(data["raw"])
        rows = [[str(i), *(f"{data['raw'][m][i]:.4g}" for m in names)] for i in range(data["num_layers"])]
        rho = data["spearman_with_bi"]
        rows.append(["ρ(BI)", *("—" if rho[m] is None else f"{rho[m]:.3f}" for m in names)])
        return f"{data['model']}: metrics per layer (last row: Spearman with BI)", ["layer", *names], rows
    if what == "single-layer":
        dense = data["dense"]["perplexity"]
        rows = [[str(r["layer"]), f"{r['bi']:.4f}", f"{r['perplexity']:.2f}", *_task_cell(r)] for r in data["layers"]]
        headers = ["removed layer", "BI", "perplexity", *(["task acc"] if data["task"] else [])]
        return f"{data['model']}: one layer removed (dense perplexity {dense:.2f})", headers, rows
    table = data["perplexity_table"]
    headers = ["order", *(f"n={n}" + ("*" if n == data["n_at_25_percent"] else "") for n in data["grid"])]
    rows = [[name, *(f"{t[str(n)]:.4g}" for n in data["grid"])] for name, t in table.items()]
    return f"{data['model']}: held-out perplexity by layers removed (* = 25%)", headers, rows


def _task_cell(row: dict[str, Any]) -> list[str]:
    return [f"{row['task_acc']:.4f}"] if "task_acc" in row else []
