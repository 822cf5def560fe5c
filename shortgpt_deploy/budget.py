"""A guarded selector: how many layers to remove, chosen by a quality budget rather than a fixed ratio.

ShortGPT removes a fixed share of layers (about 25%). What that costs differs a lot between models (a 135M model
has far less redundancy than a 7B one), so `prune.budget` asks the other way round: the largest n such that
removing the first n layers of the metric's removal order keeps quality within a bound, by one of two criteria:

- perplexity: held-out perplexity rises by at most X% (`select_by_perplexity`);
- retention: the average multiple-choice accuracy stays at least Y% of the dense model's (`select_by_retention`;
  the ShortGPT paper's retention, pruned average acc ÷ dense average acc × 100).

Quality along a removal order falls almost monotonically with n, so n is found by galloping (n = 1, 2, 4, ...
until the budget is broken) and then bisecting the last bracket: about 2·log2(n_max) evaluations instead of
n_max, each run in memory (`modeling.layers_removed`), no checkpoint written. Every evaluated point is kept
(budget.json), so a non-monotone curve is visible; the chosen n is one that was measured within budget. The
selection data should not be what the final report evaluates on (default text: a third novel). Accuracy on a
few hundred items is noisy (a standard error of a few points), so a retention curve is less monotone than a
perplexity one: the chosen n is within budget as measured, not a guarantee on the full benchmark.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import PlanError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .importance import LayerScores
    from .recipe import BudgetSpec, PruneSpec
    from .tasks import LoadedTask

logger = logging.getLogger(__name__)


@dataclass
class BudgetResult:
    """What budget.json holds. Perplexity criterion: the *_ppl fields; retention: the retention/accuracy ones."""

    n_remove: int  # the largest n measured within budget
    order: list[int]  # the candidate removal order (protected layers excluded)
    criterion: str = "perplexity"  # or "retention"
    limit_ppl: float | None = None  # baseline × (1 + max_increase_pct / 100)
    baseline_ppl: float | None = None
    ppl_by_n: dict[int, float] = field(default_factory=dict)  # every evaluated point
    min_retention_pct: float | None = None
    baseline_acc: float | None = None  # the dense model's average multiple-choice acc
    retention_by_n: dict[int, float] = field(default_factory=dict)  # every evaluated point, in percent
    accuracy_by_n: dict[int, dict[str, Any]] = field(default_factory=dict)  # average and per-task acc, per point
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Only the fields of the criterion used; the per-n tables with string keys (JSON objects)."""
        data = asdict(self)
        keep = PERPLEXITY_KEYS if self.criterion == "perplexity" else RETENTION_KEYS
        for key in (*PERPLEXITY_KEYS, *RETENTION_KEYS):
            if key not in keep:
                del data[key]
            elif key.endswith("_by_n"):
                data[key] = {str(n): v for n, v in sorted(getattr(self, key).items())}
        return data

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BudgetResult:
        """The inverse of to_dict: a budget.json of any version (with or without schema_version, of either
        criterion); the per-n tables get their int keys back. A missing n_remove or order is a KeyError."""
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d and d[k] is not None}
        for key in ("ppl_by_n", "retention_by_n", "accuracy_by_n"):
            if key in known:
                known[key] = {int(n): v for n, v in known[key].items()}
        return cls(**(known | {"n_remove": int(d["n_remove"]), "order": list(d["order"])}))


PERPLEXITY_KEYS = ("limit_ppl", "baseline_ppl", "ppl_by_n")
RETENTION_KEYS = ("min_retention_pct", "baseline_acc", "retention_by_n", "accuracy_by_n")


def largest_within(measure: Callable[[int], float], *, n_max: int, limit: float) -> tuple[int, dict[int, float]]:
    """The largest n in 0..n_max with measure(n) <= limit, assuming measure grows with n; (n, every value seen).

    Galloping then bisection: measure(0) is taken to be within the limit (it is the baseline).
    """
    seen: dict[int, float] = {}

    def ok(n: int) -> bool:
        if n not in seen:
            seen[n] = measure(n)
        return seen[n] <= limit

    good, n = 0, 1
    while n <= n_max and ok(n):  # gallop: 1, 2, 4, ... until the budget breaks or n_max is reached
        good, n = n, n * 2
    bad = min(n, n_max + 1)
    if good == n_max or (bad == n_max + 1 and ok(n_max)):
        return n_max, seen
    while bad - good > 1:  # invariant: good within budget, bad not (or beyond n_max)
        mid = (good + bad) // 2
        good, bad = (mid, bad) if ok(mid) else (good, mid)
    return good, seen


def select_by_perplexity(
    model: PreTrainedModel,
    token_ids: list[int],
    order: list[int],
    *,
    max_increase_pct: float,
    n_max: int,
    context_len: int = 512,
    stride: int = 256,
    progress: bool = False,
) -> BudgetResult:
    """Remove the first n layers of `order`, for the largest n whose perplexity on `token_ids` stays within budget."""
    from .evaluate import perplexity
    from .modeling import layers_removed

    n_max = _check_n_max(n_max, order)

    def ppl(n: int) -> float:
        with layers_removed(model, frozenset(order[:n])):
            value = perplexity(model, token_ids, context_len=context_len, stride=stride, progress=progress).perplexity
        logger.info("budget: %d layers removed → perplexity %.3f", n, value)
        return value

    baseline = ppl(0)
    limit = baseline * (1 + max_increase_pct / 100)
    n, seen = largest_within(ppl, n_max=n_max, limit=limit)
    seen[0] = baseline
    if n == 0:
        raise PlanError(
            f"no layer can be removed within the budget: removing layer {order[0]} alone raises perplexity from "
            f"{baseline:.3f} to {seen[1]:.3f} (+{100 * (seen[1] / baseline - 1):.1f}%, budget "
            f"+{max_increase_pct:g}%); raise prune.budget.max_ppl_increase_pct, or give n_remove / ratio"
        )
    settings = {"max_increase_pct": max_increase_pct, "n_max": n_max, "context_len": context_len, "stride": stride}
    return BudgetResult(
        n, list(order), "perplexity", limit_ppl=limit, baseline_ppl=baseline, ppl_by_n=seen, settings=settings
    )


def load_budget_tasks(budget: BudgetSpec) -> list[LoadedTask]:
    """The retention criterion's items (first `limit` of each task); a missing data set fails here, with the fix."""
    from .tasks import load_task

    return [load_task(name, limit=budget.limit) for name in budget.tasks]


def select_by_retention(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[LoadedTask],
    order: list[int],
    *,
    min_retention_pct: float,
    n_max: int,
    batch_size: int = 8,
    add_bos: bool,
    progress: bool = False,
) -> BudgetResult:
    """Remove the first n layers of `order`, for the largest n whose multiple-choice retention stays at or above
    `min_retention_pct`: 100 × (average acc over `tasks` with n layers removed) ÷ (the dense model's)."""
    from .evaluate import retention_pct
    from .modeling import layers_removed
    from .multiple_choice import run_tasks

    n_max = _check_n_max(n_max, order)
    accuracy: dict[int, dict[str, Any]] = {}

    def average_acc(n: int) -> float:
        with layers_removed(model, frozenset(order[:n])):
            result = run_tasks(model, tokenizer, tasks, batch_size=batch_size, add_bos=add_bos, progress=progress)
        accuracy[n] = {
            "average": result["average"],
            "tasks": {t: {k: r[k] for k in ("acc", "acc_norm", "n")} for t, r in result["tasks"].items()},
        }
        return result["average"]["acc"]

    baseline = average_acc(0)
    names = ", ".join(t.name for t in tasks)
    if baseline <= 0:
        raise PlanError(
            f"the dense model answers none of the {names} items right, so retention is undefined; use other "
            "prune.budget.tasks or a larger limit, or max_ppl_increase_pct"
        )

    def negated_retention(n: int) -> float:  # largest_within wants a measure that grows with n
        retention = retention_pct(average_acc(n), baseline)
        logger.info("budget: %d layers removed → average acc %.4f, retention %.1f%%", n, accuracy[n]["average"]["acc"],
                    retention)  # fmt: skip
        return -retention

    n, seen = largest_within(negated_retention, n_max=n_max, limit=-min_retention_pct)
    retention_by_n = {0: 100.0} | {k: -v for k, v in seen.items()}
    if n == 0:
        raise PlanError(
            f"no layer can be removed within the budget: removing layer {order[0]} alone keeps "
            f"{retention_by_n[1]:.1f}% of the dense model's average accuracy on {names} ({baseline:.3f} → "
            f"{accuracy[1]['average']['acc']:.3f}, budget ≥ {min_retention_pct:g}%); lower "
            "prune.budget.min_retention_pct, or give n_remove / ratio"
        )
    settings = {
        "min_retention_pct": min_retention_pct,
        "n_max": n_max,
        "tasks": [t.name for t in tasks],
        "items": {t.name: len(t.items) for t in tasks},
        "shots": {t.name: t.shots for t in tasks},
        "split": {t.name: t.split for t in tasks},
        "source": {t.name: t.source for t in tasks},
        "batch_size": batch_size,
    }
    return BudgetResult(
        n,
        list(order),
        "retention",
        min_retention_pct=min_retention_pct,
        baseline_acc=baseline,
        retention_by_n=retention_by_n,
        accuracy_by_n=accuracy,
        settings=settings,
    )


def _check_n_max(n_max: int, order: list[int]) -> int:
    n_max = min(n_max, len(order))
    if n_max < 1:
        raise PlanError("the budget has no layer to try: every layer is protected, or max_ratio allows none")
    return n_max


def select_budget(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    scores: LayerScores,
    prune: PruneSpec,
    *,
    add_bos: bool | None,
    progress: bool,
) -> BudgetResult:
    """prune.budget: the largest n along the scores' removal order (protected layers left out) within the
    perplexity or retention budget, measured on `model` in memory."""
    from .evaluate import heldout_token_ids
    from .modeling import decide_add_bos
    from .plan import n_from_ratio, normalize_protected

    b = prune.budget
    assert b is not None
    protected = set(normalize_protected(prune.protect, scores.num_layers))
    ranked = [s["removed"] for s in scores.iterative] if scores.iterative else scores.removal_order
    order = [i for i in ranked if i not in protected]
    bos = decide_add_bos(tokenizer, requested=add_bos)
    n_max = n_from_ratio(b.max_ratio, scores.num_layers)
    if b.criterion == "retention":
        assert b.min_retention_pct is not None
        result = select_by_retention(
            model, tokenizer, load_budget_tasks(b), order, min_retention_pct=b.min_retention_pct, n_max=n_max,
            batch_size=b.batch_size, add_bos=bos,
        )  # fmt: skip
        result.settings |= {"limit": b.limit, "metric": scores.metric}
        logger.info(
            "budget: %d layers keep %.1f%% of the dense average accuracy on %s (limit %g%%)",
            result.n_remove, result.retention_by_n[result.n_remove], ", ".join(b.tasks), b.min_retention_pct,
        )  # fmt: skip
        return result
    assert b.max_ppl_increase_pct is not None
    ids = heldout_token_ids(tokenizer, b.text, max_tokens=b.max_tokens, add_bos=bos)
    result = select_by_perplexity(
        model,
        ids,
        order,
        max_increase_pct=b.max_ppl_increase_pct,
        n_max=n_max,
        context_len=b.context_len,
        stride=b.stride,
    )
    result.settings |= {"text": b.text, "max_tokens": b.max_tokens, "metric": scores.metric}
    logger.info(
        "budget: %d layers keep perplexity on %s within +%g%% (%.3f → %.3f, limit %.3f)",
        result.n_remove, b.text, b.max_ppl_increase_pct, result.baseline_ppl, result.ppl_by_n[result.n_remove],
        result.limit_ppl,
    )  # fmt: skip
    return result
