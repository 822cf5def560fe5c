"""A guarded selector: how many layers to remove, chosen by a quality budget rather than a fixed ratio.

ShortGPT removes a fixed share of layers (about 25%). What that costs differs a lot between models (a 135M model
has far less redundancy than a 7B one), so `prune.budget` asks the other way round: the largest n such that
removing the first n layers of the metric's removal order raises held-out perplexity by at most X%.

Perplexity along a removal order rises almost monotonically with n, so n is found by galloping (n = 1, 2, 4, ...
until the budget is broken) and then bisecting the last bracket: about 2·log2(n_max) perplexity evaluations
instead of n_max, each run in memory (`modeling.layers_removed`), no checkpoint written. Every evaluated point
is kept (budget.json), so a non-monotone curve is visible; the chosen n is one that was measured within budget.
The selection text should not be the text the final report evaluates on (default: a third novel).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import PlanError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)


@dataclass
class BudgetResult:
    n_remove: int  # the largest n measured within budget
    limit_ppl: float  # baseline × (1 + max_increase_pct / 100)
    baseline_ppl: float
    order: list[int]  # the candidate removal order (protected layers excluded)
    ppl_by_n: dict[int, float] = field(default_factory=dict)  # every evaluated point
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ppl_by_n"] = {str(n): p for n, p in sorted(self.ppl_by_n.items())}
        return data


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

    n_max = min(n_max, len(order))
    if n_max < 1:
        raise PlanError("the budget has no layer to try: every layer is protected, or max_ratio allows none")

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
    return BudgetResult(n, limit, baseline, list(order), seen, settings)
