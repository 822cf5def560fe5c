"""`ppl_greedy`: the removal order chosen by calibration perplexity itself.

Remove, one at a time, the layer whose removal raises calibration perplexity least, re-evaluating every remaining
candidate after each removal. It is the baseline the cheap one-pass metrics (BI and the others, importance.py) are
measured against in `analyze --what ratio-sweep`, and a `prune.metric` of its own. Candidates are removed in memory
(`modeling.layers_removed`); the layers in front of a candidate replay their recorded outputs instead of running.

As a prune metric (`score_greedily`) it scores only the layers it removes: a layer's score is the calibration
perplexity once it and every layer chosen before it are gone. Layers it never reached, and protected ones, have
no score (NaN in memory, null in scores.json); `removal_order` is the greedy order and nothing after it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .errors import ShortGPTError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from .calibration import CalibrationSet
    from .importance import LayerScores

logger = logging.getLogger(__name__)


class GreedyError(ShortGPTError):
    """A greedy order that cannot be built (too few removable layers)."""


def calibration_nll(model: PreTrainedModel, calibration: CalibrationSet) -> float:
    """Mean over non-padding next-token targets of −log p(token | block so far), over every calibration block."""
    import torch

    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in calibration.batches:
            ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
            logits = model(ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            keep = mask[:, 1:].bool()
            total += float(nll.double()[keep].sum())
            count += int(keep.sum())
    return total / count


@contextmanager
def _replaying(layers: torch.nn.ModuleList, outputs: list[Any]) -> Iterator[None]:
    """Layers [0, len(outputs)) return their recorded outputs instead of computing (their inputs are unchanged)."""
    for layer, output in zip(layers, outputs, strict=False):
        layer.forward = lambda *args, _out=output, **kwargs: _out
    try:
        yield
    finally:
        for layer in list(layers)[: len(outputs)]:
            del layer.forward


def _record(model: PreTrainedModel, calibration: CalibrationSet) -> tuple[float, list[list[Any]]]:
    """Calibration NLL of the model as it stands, and each batch's list of every decoder layer's output."""
    from .modeling import decoder_layers

    outputs: list[list[Any]] = []
    handles = [
        layer.register_forward_hook(lambda module, args, out: outputs[-1].append(out))
        for layer in decoder_layers(model)
    ]
    try:
        nll_sum, count = 0.0, 0
        for batch in calibration.batches:
            outputs.append([])
            tokens = int(batch.attention_mask[:, 1:].sum())
            nll_sum += calibration_nll(model, replace(calibration, batches=[batch])) * tokens
            count += tokens
    finally:
        for h in handles:
            h.remove()
    return nll_sum / count, outputs


def _nll_without(
    model: PreTrainedModel, calibration: CalibrationSet, removed: list[int], candidate: int, outputs: list[list[Any]]
) -> float:
    """Calibration NLL with `candidate` removed too; the kept layers in front of it replay `outputs`."""
    from .modeling import decoder_layers, layers_removed

    in_front = sum(1 for i in range(candidate) if i not in removed)  # same layers, same inputs as when recorded
    total, count = 0.0, 0
    with layers_removed(model, frozenset([*removed, candidate])):
        layers = decoder_layers(model)
        for batch, recorded in zip(calibration.batches, outputs, strict=True):
            with _replaying(layers, recorded[:in_front]):
                tokens = int(batch.attention_mask[:, 1:].sum())
                total += calibration_nll(model, replace(calibration, batches=[batch])) * tokens
                count += tokens
    return total / count


@dataclass
class GreedyOrder:
    removal_order: list[int]
    steps: list[dict[str, Any]]  # per removal: the layer, calibration perplexity before/after, every candidate's
    calibration: dict[str, Any]
    forward_passes: int
    duration_s: float


def ppl_greedy_order(
    model: PreTrainedModel,
    calibration: CalibrationSet,
    *,
    n_remove: int,
    protected: frozenset[int],
    progress: bool = True,
) -> GreedyOrder:
    """Remove, one at a time, the layer whose removal raises calibration perplexity least, re-evaluating every
    remaining candidate after each removal (ties: the lower index). An oracle-like baseline for the metrics.

    Cost: for R removable layers, step k evaluates R − k candidates, so Σ_{k<n} (R − k) + n forward passes over
    the calibration blocks (R = 28, n = 15: 330). A candidate's pass does not recompute the layers in front of it
    (they replay outputs recorded in the step's first pass), so it costs about half a full pass on average.
    """
    from .modeling import decoder_layers, layers_removed
    from .runtime import tqdm

    start = time.perf_counter()
    num_layers = len(decoder_layers(model))
    removable = sum(1 for i in range(num_layers) if i not in protected)
    removed: list[int] = []
    steps: list[dict[str, Any]] = []
    passes = 0
    bar = tqdm(  # counts candidate evaluations, so the rate and the time left are honest (early steps are longest)
        total=sum(max(removable - k, 0) for k in range(n_remove)),
        desc="ppl_greedy",
        unit="candidate",
        disable=not progress,
    )
    with bar:
        for k in range(n_remove):
            candidates = [i for i in range(num_layers) if i not in removed and i not in protected]
            if not candidates:
                raise GreedyError(f"only {len(removed)} layers can be removed: the rest are protected")
            with layers_removed(model, frozenset(removed)):
                before, outputs = _record(model, calibration)
            nll = {}
            for c in candidates:
                nll[c] = _nll_without(model, calibration, removed, c, outputs)
                bar.update()
            passes += 1 + len(candidates)
            choice = min(candidates, key=lambda c: (nll[c], c))
            removed.append(choice)
            steps.append(
                {
                    "removed": choice,
                    "calibration_perplexity_before": math.exp(before),
                    "calibration_perplexity": math.exp(nll[choice]),
                    "candidates": {str(c): math.exp(v) for c, v in nll.items()},
                }
            )
            logger.info(
                "ppl_greedy step %d/%d: layer %d (calibration perplexity %.3f → %.3f, best of %d candidates)",
                k + 1, n_remove, choice, math.exp(before), math.exp(nll[choice]), len(candidates),
            )  # fmt: skip
            bar.set_postfix(removed=choice, ppl=f"{math.exp(nll[choice]):.2f}")
    return GreedyOrder(removed, steps, calibration.describe(), passes, time.perf_counter() - start)


def score_greedily(
    model: PreTrainedModel,
    calibration: CalibrationSet,
    *,
    n_remove: int,
    protected: frozenset[int],
    model_name: str = "",
    progress: bool = True,
) -> LayerScores:
    """`ppl_greedy` as a prune metric: the greedy order for `n_remove` layers as LayerScores.

    Like iterative scoring, each removal is a step in `iterative` (its "score" is the calibration perplexity after
    it; "candidates" is every candidate's), so plan.make_plan and the budget follow the steps in order. Only the
    removed layers are scored (see the module docstring); the plan must not need more than `n_remove` of them.
    """
    from .importance import LayerScores
    from .modeling import decoder_layers

    if n_remove < 1:
        raise GreedyError(f"ppl_greedy needs at least one step to score, got n_remove={n_remove}")
    num_layers = len(decoder_layers(model))
    order = ppl_greedy_order(model, calibration, n_remove=n_remove, protected=protected, progress=progress)
    scores = [math.nan] * num_layers
    for step in order.steps:
        scores[step["removed"]] = step["calibration_perplexity"]
    steps = [{"removed": s["removed"], "score": s["calibration_perplexity"], **s} for s in order.steps]
    logger.info(
        "ppl_greedy: %d layers in %.1f s (%d forward passes over the calibration set, some partial)",
        n_remove, order.duration_s, order.forward_passes,
    )  # fmt: skip
    return LayerScores(
        metric="ppl_greedy",
        model=model_name,
        num_layers=num_layers,
        scores=scores,
        removal_order=list(order.removal_order),
        calibration=order.calibration,
        iterative=steps,
        duration_s=order.duration_s,
        greedy={
            "scores": "calibration perplexity with this layer and every layer before it in removal_order removed; "
            "null: not scored (protected, or past the last greedy step)",
            "dense_calibration_perplexity": order.steps[0]["calibration_perplexity_before"],
            "steps": n_remove,
            "protected": sorted(protected),
            "forward_passes": order.forward_passes,
        },
    )
