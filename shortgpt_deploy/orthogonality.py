"""`analyze --what orthogonality` (paper Table 2): do layer removal and GPTQ compose independently?

Four checkpoints of one model are measured alike: dense, dense-gptq, pruned and pruned-gptq, each on held-out
perplexity and multiple-choice accuracy (MMLU by default, as in the paper's table). If the two compressions are
independent, their costs multiply, so two predictions for pruned-gptq follow from the other three:

- perplexity: pruned × (dense-gptq ÷ dense);
- retention (MC average ÷ dense MC average × 100): retention(pruned) × retention(dense-gptq) ÷ 100.

The interaction is observed ÷ predicted; 1.0 means no interaction. The accuracy comparison comes with the standard
error of the observed accuracy, so a difference smaller than it is not called a finding.

MODEL is a build's run folder that has the four checkpoints (a recipe whose quantize section names variants
[dense, pruned], as recipes/default.yaml does). Given a model instead, `shortgpt-deploy analyze` has
`pipeline.orthogonality_checkpoints` build them first in OUT/checkpoints (BI, 25% of layers removed, GPTQ of both,
with the build's defaults), reused by the next call; this module only reads run folders (it never builds).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ShortGPTError
from .run import RunDir

if TYPE_CHECKING:
    from .analyze import AnalysisSettings
    from .recipe import EvalSpec

logger = logging.getLogger(__name__)

FOUR = ("dense", "dense-gptq", "pruned", "pruned-gptq")
REPAIRED_PAIR = ("repaired", "repaired-gptq")
DEFAULT_TASKS = ("mmlu",)


class OrthogonalityError(ShortGPTError):
    """A run folder without the four checkpoints."""


def run_variants(run_dir: Path) -> dict[str, Path] | None:
    """The checkpoint folders a build's run folder has, by variant name (as its report finds them); None if it is
    not a run folder."""
    run = RunDir(run_dir)
    if not run.is_run_folder():
        return None
    return {name: p for name, p in run.variant_folders().items() if (p / "config.json").is_file()}


def check_tasks(settings: AnalysisSettings) -> tuple[str, ...]:
    """The tasks to measure; an unknown one or missing data fails before anything is built or loaded."""
    from .tasks import load_task

    tasks = settings.tasks or DEFAULT_TASKS
    for name in tasks:
        load_task(name, limit=settings.limit, shots=settings.shots)
    return tasks


def eval_spec(settings: AnalysisSettings, tasks: tuple[str, ...]) -> EvalSpec:
    """The eval section this analysis measures with: perplexity on the held-out text and `tasks`, no greedy
    agreement. A value out of range names analyze's option (`--max-tokens must be at least 16, got 8`)."""
    from pydantic import ValidationError

    from .recipe import EvalSpec, option_errors

    try:
        return EvalSpec(
            text=settings.heldout, context_len=settings.context_len, stride=settings.stride,
            max_tokens=settings.max_tokens, greedy_prompts=0, tasks=list(tasks), limit=settings.limit,
            shots=settings.shots, batch_size=settings.batch_size,
        )  # fmt: skip
    except ValidationError as err:
        raise OrthogonalityError(option_errors(err, {"text": "--heldout"})) from None


def orthogonality_table(evaluated: dict[str, Any], compressed: str = "pruned") -> dict[str, Any]:
    """From evaluate_variants' result for the four (dense, dense-gptq, `compressed` and its GPTQ: pruned, or
    repaired where the run has it too): per-variant rows, the predictions, and the interactions."""
    from .evaluate import retention_pct  # evaluate imports torch: only when a table is made

    quantized = compressed + "-gptq"
    four = ("dense", "dense-gptq", compressed, quantized)
    ppl = {v: evaluated["perplexity"][v]["perplexity"] for v in four}
    acc = {v: evaluated["accuracy"][v]["average"]["acc"] for v in four}
    tasks = evaluated["tasks"]
    rows = {
        v: {
            "perplexity": ppl[v],
            "perplexity_ratio": ppl[v] / ppl["dense"],
            "mc_acc": acc[v],
            "retention_pct": retention_pct(acc[v], acc["dense"]),
            "tasks": {
                t: {k: r[k] for k in ("acc", "acc_norm", "acc_stderr", "n") if k in r}
                for t, r in evaluated["accuracy"][v]["tasks"].items()
            },
        }
        for v in four
    }
    predicted_ppl = ppl[compressed] * ppl["dense-gptq"] / ppl["dense"]
    predicted_ret = rows[compressed]["retention_pct"] * rows["dense-gptq"]["retention_pct"] / 100
    observed_ret = rows[quantized]["retention_pct"]
    stderrs = [r.get("acc_stderr") for r in rows[quantized]["tasks"].values()]
    # the average over tasks of independent estimates: its standard error, in retention points
    avg_stderr = (sum(s * s for s in stderrs) ** 0.5 / len(stderrs)) if None not in stderrs else None
    ret_stderr = None if avg_stderr is None else retention_pct(avg_stderr, acc["dense"])
    return {
        "tasks": tasks,
        "variants": rows,
        "predicted_if_independent": {"perplexity": predicted_ppl, "retention_pct": predicted_ret},
        "interaction": {
            "perplexity": ppl[quantized] / predicted_ppl,
            "retention": observed_ret / predicted_ret,
            "retention_gap_points": observed_ret - predicted_ret,
            "retention_stderr_points": ret_stderr,
        },
        "verdict": verdict(ppl[quantized] / predicted_ppl, observed_ret - predicted_ret, ret_stderr, quantized),
    }


def verdict(
    ppl_interaction: float, gap_points: float, stderr_points: float | None, quantized: str = "pruned-gptq"
) -> str:
    """One sentence: how far `quantized` is from the independence prediction, on both measures."""
    ppl_part = f"{quantized} perplexity is {ppl_interaction:.2f}× the independence prediction"
    if stderr_points is None:
        acc_part = f"its retention is {gap_points:+.1f} points from the prediction"
    elif abs(gap_points) <= 2 * stderr_points:
        acc_part = (
            f"its retention is {gap_points:+.1f} points from the prediction, within 2 standard errors "
            f"(±{2 * stderr_points:.1f}): no interaction detectable"
        )
    else:
        worse = "worse" if gap_points < 0 else "better"
        acc_part = (
            f"its retention is {gap_points:+.1f} points from the prediction ({worse} than independent, beyond 2 "
            f"standard errors ±{2 * stderr_points:.1f})"
        )
    return f"{ppl_part}; {acc_part}."


def orthogonality_analysis(model_spec: str, settings: AnalysisSettings, *, progress: bool) -> dict[str, Any]:
    """Measure the four checkpoints of a build's run folder (pipeline.orthogonality_checkpoints makes them from a
    model)."""
    from .evaluate import evaluate_variants

    tasks = check_tasks(settings)
    run_dir = Path(model_spec)
    variants = run_variants(run_dir)
    if variants is None:
        raise OrthogonalityError(
            f"{run_dir} is not a build's run folder; give one with the four checkpoints, or the model itself to "
            "`shortgpt-deploy analyze` (pipeline.analyze_model builds them first)"
        )
    missing = [v for v in FOUR if v not in variants]
    if missing:
        raise OrthogonalityError(
            f"{run_dir} has no {', '.join(missing)} checkpoint: build it with a quantize section naming variants "
            "[dense, pruned] (recipes/default.yaml does), or give analyze the model itself and it builds all four"
        )
    # A run that repaired its pruned model and quantized both is measured for the repaired pair as well.
    repaired = [v for v in REPAIRED_PAIR if v in variants] == list(REPAIRED_PAIR)
    measured = (*FOUR, *REPAIRED_PAIR) if repaired else FOUR
    evaluated = evaluate_variants({v: variants[v] for v in measured}, eval_spec(settings, tasks), progress=progress)
    layers = {v: json.loads((variants[v] / "config.json").read_text()) for v in measured}
    table = orthogonality_table(evaluated.to_dict())
    if repaired:
        table["repaired"] = orthogonality_table(evaluated.to_dict(), "repaired")
    for t in (table, table.get("repaired")):
        for v in t["variants"] if t else ():
            cfg = layers[v].get("text_config", layers[v])
            t["variants"][v] = {"checkpoint": str(variants[v]), "layers": cfg.get("num_hidden_layers")} | t["variants"][
                v
            ]
    return {
        "run_dir": str(run_dir),
        "heldout": {
            "text": settings.heldout,
            "max_tokens": settings.max_tokens,
            "context_len": settings.context_len,
            "stride": settings.stride,
        },
        "limit": settings.limit,
        "shots": settings.shots,
        **table,
    }
