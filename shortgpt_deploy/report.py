"""Plots and the human-readable summaries of a run folder. Offline: matplotlib's Agg backend, no web assets."""

from __future__ import annotations

from pathlib import Path

from .importance import LayerScores
from .plan import LayerPlan

METRIC_LABELS = {
    "bi": "Block Influence (1 − mean cos)",
    "relative_magnitude": "Relative magnitude ‖f(x)‖/‖x+f(x)‖",
    "angular": "Angular distance (arccos/π)",
    "sequential": "Sequential order",
    "reverse": "Reverse order",
}


def plot_scores(scores: LayerScores, plan: LayerPlan | None, path: Path, *, title: str = "") -> Path:
    """Bar chart of the score per layer, removed layers in red and protected ones hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.savefig(path)
    plt.close(fig)
    return path
