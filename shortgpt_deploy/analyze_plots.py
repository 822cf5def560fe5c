"""How analyze.py's results look: one PNG per analysis (paper Figs. 3, 5, 8 and Table 2) and a printable table.

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


def _mc_axis(ax: Any, dense: float, xlabel: str) -> None:
    ax.axhline(dense, color="0.3", linestyle=":", label=f"dense ({dense:.3f})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("MC average accuracy")
    ax.grid(alpha=0.3)


def _task_names(data: dict[str, Any]) -> str:
    return ", ".join(t["name"] for t in data.get("tasks") or [])


def plot_single_layer(data: dict[str, Any], path: Path) -> Path:
    """Held-out perplexity with each layer removed alone (log y), BI per layer on a twin axis; with tasks, a
    second panel of MC average accuracy per removed layer."""
    plt = _pyplot()
    layers = [r["layer"] for r in data["layers"]]
    width = max(6.0, 0.25 * data["num_layers"] + 3)
    if data.get("tasks"):
        fig, (ax, mc_ax) = plt.subplots(2, 1, figsize=(width, 6.6), dpi=120, sharex=True)
        mc_ax.plot(layers, [r["mc_acc"] for r in data["layers"]], marker="o", color="tab:green", label="MC acc")
        _mc_axis(mc_ax, data["dense"]["mc_acc"], "removed layer")
        mc_ax.legend(fontsize=8, title=_task_names(data), title_fontsize=7)
    else:
        fig, ax = plt.subplots(figsize=(width, 3.8), dpi=120)
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
    """Held-out perplexity (log y) against layers removed, one line per removal order; 25% marked. With tasks, a
    second panel of MC average accuracy (at every point, or at 0 and 25% only)."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    if data.get("mc_table"):
        fig, (ax, mc_ax) = plt.subplots(1, 2, figsize=(12.0, 4.4), dpi=120)
        for name, table in data["mc_table"].items():
            ns = sorted(int(n) for n in table)
            mc_ax.plot(ns, [table[str(n)] for n in ns], marker="o", label=ORDER_LABELS.get(name, name))
        mc_ax.axvline(data["n_at_25_percent"], color="0.5", linestyle=":")
        _mc_axis(mc_ax, data["dense_mc_acc"], f"layers removed (of {data['num_layers']})")
        mc_ax.legend(fontsize=7, title=_task_names(data), title_fontsize=7)
        mc_ax.set_title("MC average accuracy by removal order", fontsize=10)
    else:
        fig, ax = plt.subplots(figsize=(7.0, 4.2), dpi=120)
    for name, table in data["perplexity_table"].items():
        ax.plot(data["grid"], [table[str(n)] for n in data["grid"]], marker="o", label=ORDER_LABELS.get(name, name))
    ax.axvline(data["n_at_25_percent"], color="0.5", linestyle=":", label="25% of layers")
    for axis in fig.axes:  # layers removed are whole numbers
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_yscale("log")
    ax.set_xlabel(f"layers removed (of {data['num_layers']})")
    ax.set_ylabel(f"perplexity on {data['heldout']['text']} (log)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{data['model']}: perplexity by removal order", fontsize=10)
    fig.tight_layout()
    return _save_png(fig, path)


def plot_orthogonality(data: dict[str, Any], path: Path) -> Path:
    """Paper Table 2 as bars: perplexity and MC average accuracy of the four checkpoints, with pruned-gptq's
    independence prediction marked on both."""
    plt = _pyplot()
    names = list(data["variants"])
    rows = [data["variants"][v] for v in names]
    predicted = data["predicted_if_independent"]
    colors = ["tab:blue", "tab:cyan", "tab:orange", "tab:red"]
    fig, (ppl_ax, acc_ax) = plt.subplots(1, 2, figsize=(10.0, 4.0), dpi=120)
    ppl_ax.bar(names, [r["perplexity"] for r in rows], color=colors)
    ppl_ax.set_ylabel(f"perplexity on {data['heldout']['text']}")
    acc_ax.bar(names, [r["mc_acc"] for r in rows], color=colors)
    acc_ax.set_ylabel(f"MC average accuracy ({', '.join(data['tasks'])})")
    dense_acc = data["variants"]["dense"]["mc_acc"]
    for ax, value in ((ppl_ax, predicted["perplexity"]), (acc_ax, predicted["retention_pct"] * dense_acc / 100)):
        ax.scatter([names[-1]], [value], marker="_", s=900, color="black", zorder=3, label="if independent")
        ax.legend(fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{data['model']}: pruning × GPTQ", fontsize=10)
    fig.tight_layout()
    return _save_png(fig, path)


def plot_heads(data: dict[str, Any], path: Path) -> Path:
    """A layers × heads heatmap of the perplexity rise (%) when that one head is ablated (log colour scale)."""
    from matplotlib.colors import SymLogNorm

    plt = _pyplot()
    rise = data["increase_pct"]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * data["num_heads"] + 2.5), max(4.0, 0.22 * len(rise) + 1.5)))
    image = ax.imshow(
        rise, aspect="auto", cmap="magma_r", norm=SymLogNorm(linthresh=1.0, vmin=min(0.0, *map(min, rise)))
    )
    fig.colorbar(image, ax=ax, label=f"perplexity rise on {data['heldout']['text']} (%)")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(data["num_heads"]))
    ax.set_yticks(range(0, len(rise), 1 if len(rise) <= 40 else 4))
    ax.tick_params(labelsize=7)
    ax.set_title(f"{data['model']}: one attention head ablated", fontsize=10)
    fig.tight_layout()
    return _save_png(fig, path)


PLOTTERS: dict[str, Callable[[dict[str, Any], Path], Path]] = {
    "single-layer": plot_single_layer,
    "ratio-sweep": plot_ratio_sweep,
    "metrics": plot_metrics,
    "orthogonality": plot_orthogonality,
    "heads": plot_heads,
}


def orthogonality_rows(data: dict[str, Any]) -> tuple[str, list[str], list[list[str]]]:
    tasks = data["tasks"]
    headers = ["variant", "layers", "perplexity", "÷ dense", *tasks, "MC average", "retention"]
    rows = [
        [
            name,
            str(r["layers"]),
            f"{r['perplexity']:.2f}",
            f"{r['perplexity_ratio']:.2f}",
            *(f"{r['tasks'][t]['acc']:.3f}" for t in tasks),
            f"{r['mc_acc']:.3f}",
            f"{r['retention_pct']:.1f}%",
        ]
        for name, r in data["variants"].items()
    ]
    p = data["predicted_if_independent"]
    dense = data["variants"]["dense"]
    rows.append(
        [
            "pruned-gptq if independent",
            "",
            f"{p['perplexity']:.2f}",
            f"{p['perplexity'] / dense['perplexity']:.2f}",
            *("" for _ in tasks),
            f"{p['retention_pct'] * dense['mc_acc'] / 100:.3f}",
            f"{p['retention_pct']:.1f}%",
        ]
    )
    return f"{data['model']}: pruning × GPTQ (paper Table 2)", headers, rows


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
        rows = [[str(r["layer"]), f"{r['bi']:.4f}", f"{r['perplexity']:.2f}", *_mc_cell(r)] for r in data["layers"]]
        headers = ["removed layer", "BI", "perplexity", *(["MC acc"] if data.get("tasks") else [])]
        return f"{data['model']}: one layer removed (dense perplexity {dense:.2f})", headers, rows
    if what == "orthogonality":
        return orthogonality_rows(data)
    if what == "heads":
        headers = ["layer", *(f"h{h}" for h in range(data["num_heads"])), "mean"]
        rows = [
            [str(i), *(f"{x:+.1f}" for x in row), f"{data['per_layer_mean_increase_pct'][i]:+.1f}"]
            for i, row in enumerate(data["increase_pct"])
        ]
        dense = data["dense"]["perplexity"]
        return f"{data['model']}: perplexity rise (%) with one head ablated (dense {dense:.2f})", headers, rows
    table = data["perplexity_table"]
    headers = ["order", *(f"n={n}" + ("*" if n == data["n_at_25_percent"] else "") for n in data["grid"])]
    rows = [[name, *(f"{t[str(n)]:.4g}" for n in data["grid"])] for name, t in table.items()]
    return f"{data['model']}: held-out perplexity by layers removed (* = 25%)", headers, rows


def _mc_cell(row: dict[str, Any]) -> list[str]:
    return [f"{row['mc_acc']:.4f}"] if "mc_acc" in row else []


TITLES = {
    "metrics": "Layer metrics side by side (paper Fig. 8)",
    "single-layer": "One layer removed at a time (paper Fig. 3)",
    "ratio-sweep": "Removal orders as more layers go (paper Fig. 5)",
    "orthogonality": "Pruning × GPTQ (paper Table 2)",
    "heads": "One attention head ablated at a time (paper Fig. 6)",
}


def markdown_section(data: dict[str, Any], png_name: str) -> str:
    """An analysis's JSON as a report section: the command that made it, its plot, its table, its key lines."""
    from .serving_tables import markdown_table

    title, headers, rows = summary_rows(data)
    command = " ".join(data.get("provenance", {}).get("command", [])[1:])
    lines = [f"### {TITLES[data['analysis']]}", "", f"`shortgpt-deploy {command}` ({data['duration_s']:.0f} s)"]
    lines += ["", f"![{data['analysis']}]({png_name})", "", f"{title}:", "", markdown_table(headers, rows)]
    if data["analysis"] == "ratio-sweep":
        mc = data.get("at_25_percent_mc") or {}
        lines += ["", f"At 25% ({data['n_at_25_percent']} of {data['num_layers']} layers removed):", ""]
        at25 = sorted(data["at_25_percent"].items(), key=lambda kv: kv[1])
        cols = ["order", "perplexity", *(["MC average", "retention"] if mc else [])]
        body = [
            [name, f"{ppl:.2f}", *([f"{mc[name]:.3f}", f"{data['retention_at_25_percent'][name]:.1f}%"] if mc else [])]
            for name, ppl in at25
        ]
        lines.append(markdown_table(cols, body))
    if data["analysis"] == "orthogonality":
        lines += ["", data["verdict"]]
        if rep := data.get("repaired"):
            rows = [[v, f"{r['perplexity']:.2f}", f"{r['retention_pct']:.1f}%"] for v, r in rep["variants"].items()]
            p = rep["predicted_if_independent"]
            rows.append(["repaired-gptq if independent", f"{p['perplexity']:.2f}", f"{p['retention_pct']:.1f}%"])
            lines += [
                "",
                "The repaired model and its GPTQ:",
                "",
                markdown_table(["variant", "perplexity", "retention"], rows),
            ]
            lines += ["", rep["verdict"]]
    return "\n".join(lines)


def summary_lines(data: dict[str, Any], what: str) -> list[str]:
    """The lines `analyze` prints under its table: the 25% point of a sweep, the verdicts, the top head."""
    lines = []
    if what == "ratio-sweep":
        n25, at25 = data["n_at_25_percent"], data["at_25_percent"]
        lines.append(f"at 25% ({n25} of {data['num_layers']} layers removed): held-out perplexity")
        mc = data.get("at_25_percent_mc") or {}
        for name, ppl in sorted(at25.items(), key=lambda kv: kv[1]):
            acc = f"   MC acc {mc[name]:.3f} ({data['retention_at_25_percent'][name]:.1f}%)" if mc else ""
            lines.append(f"  {name:<20} {ppl:10.2f}{acc}")
    if what == "orthogonality":
        lines += [data["verdict"], *([data["repaired"]["verdict"]] if "repaired" in data else [])]
    if what == "heads":
        top = data["most_important_head"]
        lines.append(
            f"most important head: layer {top['layer']} head {top['head']} (perplexity {top['perplexity']:.2f})"
        )
    return lines
