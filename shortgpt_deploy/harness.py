"""`eval --lm-eval TASKS`: EleutherAI's lm-evaluation-harness on a checkpoint, when it is installed.

Our own multiple-choice scoring (multiple_choice.py, data from tasks.py) runs offline and covers the paper's tasks; the
harness covers hundreds more and is the reference implementation, but it downloads its data from the Hugging
Face Hub. The model is loaded by us (`modeling.load_model`: GGUF conversions, pruned folders and dequantized
GPTQ folders alike) and handed to the harness's HFLM wrapper, so every variant a build writes can be evaluated.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .errors import ShortGPTError

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "lm-evaluation-harness is not installed: `pip install lm-eval` in this environment (its tasks download their "
    "data from the Hugging Face Hub); offline, use --tasks (mmlu, hellaswag, piqa, boolq, arc_easy, arc_challenge)"
)
METRICS = ("acc", "acc_norm")


class HarnessError(ShortGPTError):
    """lm-evaluation-harness missing or failing."""


def parse_results(results: dict[str, Any]) -> dict[str, Any]:
    """The harness's {"results": {task: {"acc,none": …, "acc_stderr,none": …}}} → our per-task layout
    {"tasks": {task: {acc, acc_norm, acc_stderr, acc_norm_stderr}}, "average": {acc, acc_norm}} (only the metrics a
    task reports; the average is over the tasks that report it)."""
    tasks: dict[str, dict[str, float]] = {}
    for task, metrics in results.get("results", {}).items():
        row: dict[str, float] = {}
        for key, value in metrics.items():
            name, _, _filter = key.partition(",")
            if isinstance(value, int | float) and name in (*METRICS, *(m + "_stderr" for m in METRICS)):
                row[name] = float(value)
        if row:
            tasks[task] = row
    average = {
        m: sum(r[m] for r in tasks.values() if m in r) / n
        for m in METRICS
        if (n := sum(1 for r in tasks.values() if m in r))
    }
    return {"tasks": tasks, "average": average}


def run_lm_eval(
    model_dir: Path,
    tasks: list[str],
    *,
    limit: int | None = None,
    shots: int | None = None,
    batch_size: int = 8,
    dtype: str = "float32",
) -> dict[str, Any]:
    """lm-evaluation-harness's `simple_evaluate` on the checkpoint in model_dir; returns parse_results(...) plus the
    harness version and settings."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise HarnessError(INSTALL_HINT) from None
    from .modeling import load_model

    if limit is not None and limit < 1:
        raise HarnessError(f"--limit must be at least 1 (items per task), got {limit}")
    model, tokenizer = load_model(Path(model_dir), dtype=dtype)
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    logger.info("lm-eval %s: %s on %s", getattr(lm_eval, "__version__", "?"), ", ".join(tasks), model_dir)
    try:
        raw = lm_eval.simple_evaluate(model=wrapped, tasks=tasks, num_fewshot=shots, limit=limit)
    except Exception as err:  # the harness's own errors (unknown task, no network) are many kinds
        raise HarnessError(f"lm-evaluation-harness failed on {', '.join(tasks)}: {type(err).__name__}: {err}") from err
    if raw is None:
        raise HarnessError("lm-evaluation-harness returned no results (it does so on non-zero ranks)")
    settings = {"limit": limit, "shots": shots, "batch_size": batch_size, "dtype": dtype}
    return {"harness": "lm-eval " + str(getattr(lm_eval, "__version__", "?")), **settings, **parse_results(raw)}
