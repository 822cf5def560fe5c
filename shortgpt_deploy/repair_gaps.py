"""What every repair method shares: the gaps a plan leaves (each with its anchor layer), the record of one gap's
repair, and the error. Its own module so that repair_methods and repair_distill both import it and not each
other (see repair_methods' docstring for what an anchor is).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ShortGPTError
from .plan import LayerPlan


class RepairError(ShortGPTError):
    """A repair that cannot be done as asked (method, options, inputs)."""


@dataclass(frozen=True)
class Gap:
    removed: tuple[int, ...]  # dense layer indices, ascending and contiguous
    anchor: int  # dense index of the kept layer that takes the linear fix
    anchor_new: int  # the same layer's index in the pruned checkpoint
    side: str  # "before": last kept layer before the gap; "after": first one after it (gap at layer 0)
    target: int  # dense layer whose output the repaired anchor should reproduce


def find_gaps(plan: LayerPlan) -> list[Gap]:
    """The contiguous runs of removed layers, in model order, each with its anchor (see repair_methods' docstring)."""
    new_index = {old: new for new, old in enumerate(plan.keep)}
    runs: list[list[int]] = []
    for i in sorted(plan.remove):
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    gaps = []
    for run in runs:
        if run[0] > 0:
            gaps.append(Gap(tuple(run), run[0] - 1, new_index[run[0] - 1], "before", run[-1]))
        else:  # plans keep at least one layer, so there is one after
            gaps.append(Gap(tuple(run), run[-1] + 1, new_index[run[-1] + 1], "after", run[-1] + 1))
    return gaps


@dataclass
class GapRepair:
    removed: list[int]
    kind: str  # full | diagonal | scale
    folded_into: list[str]  # checkpoint tensor names changed for this gap
    anchor: int | None = None
    anchor_new: int | None = None
    side: str | None = None
    fit_rel_error_before: float | None = None  # repair_fit.FitError; T = I is the model before this fit
    fit_rel_error: float | None = None
    state_rel_error_before: float | None = None
    state_rel_error: float | None = None
    lstsq_fit_rel_error: float | None = None  # cosine objective: the least-squares start, for comparison
    cosine_loss_lstsq: float | None = None
    cosine_loss: float | None = None
    alpha: float | None = None  # scale: mean‖h after gap‖ / mean‖h before gap‖ (dense)
    num_tokens: int = 0
    time_s: float = 0.0
    steps: int | None = None  # distill: one record for the whole run (repair_distill), tokens in num_tokens
    heldout_loss_before: float | None = None
    heldout_loss_after: float | None = None  # the state trained last
    heldout_loss_best: float | None = None  # the state kept
    best_step: int | None = None
    stopped_because: str | None = None  # max_steps | max_tokens | max_time_s | early_stop
