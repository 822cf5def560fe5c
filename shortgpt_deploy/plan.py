"""Deciding which layers go, separately from deleting them: scores + prune settings → a frozen LayerPlan.

The plan is printed and saved (plan.json) before any tensor is written, and `--dry-run` stops after it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import PlanError
from .files import atomic_write_text

if TYPE_CHECKING:  # importance imports torch; planning and surgery do not need it
    from .importance import LayerScores


@dataclass(frozen=True)
class LayerPlan:
    num_layers_before: int
    remove: tuple[int, ...]  # in the order they were chosen (least important first)
    keep: tuple[int, ...]  # ascending: new layer j is old layer keep[j]
    metric: str
    protected: tuple[int, ...]
    reasons: dict[int, str]

    @property
    def num_layers_after(self) -> int:
        return len(self.keep)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["num_layers_after"] = self.num_layers_after
        d["reasons"] = {str(k): v for k, v in self.reasons.items()}
        return d

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> LayerPlan:
        try:
            d = json.loads(path.read_text())
            return cls(
                num_layers_before=d["num_layers_before"],
                remove=tuple(d["remove"]),
                keep=tuple(d["keep"]),
                metric=d["metric"],
                protected=tuple(d["protected"]),
                reasons={int(k): v for k, v in d["reasons"].items()},
            )
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise PlanError(f"{path} is not a plan.json written by shortgpt-deploy: {err}") from None

    def summary(self) -> str:
        removed = ", ".join(str(i) for i in self.remove)
        return (
            f"remove {len(self.remove)} of {self.num_layers_before} layers ({self.metric}): [{removed}] → "
            f"{self.num_layers_after} layers"
        )


def normalize_protected(protect: list[int] | tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    out = set()
    for p in protect:
        if not -num_layers <= p < num_layers:
            raise PlanError(f"protected layer {p} is out of range for a model with {num_layers} layers")
        out.add(p % num_layers)
    return tuple(sorted(out))


def n_from_ratio(ratio: float, num_layers: int) -> int:
    """Layers to remove for a ratio: rounded to nearest, at least one (25% of 32 layers → 8)."""
    return max(1, round(ratio * num_layers))


def make_plan(
    *,
    num_layers: int,
    scores: LayerScores | None = None,
    n_remove: int | None = None,
    ratio: float | None = None,
    layers: list[int] | None = None,
    protect: list[int] | tuple[int, ...] = (0, -1),
) -> LayerPlan:
    """Pick the layers to remove: an explicit list, or the `n_remove` (or `ratio`) least important by `scores`."""
    if sum(x is not None for x in (n_remove, ratio, layers)) != 1:
        raise PlanError("give exactly one of n_remove, ratio or layers")
    if layers is None and scores is None:
        raise PlanError("n_remove and ratio need layer scores (from `shortgpt-deploy score`)")
    if scores is not None and layers is None and scores.num_layers != num_layers:
        raise PlanError(f"scores are for {scores.num_layers} layers but the model has {num_layers}")
    protected = check_request(
        num_layers=num_layers, n_remove=n_remove, ratio=ratio, layers=layers, protect=protect,
        metric=scores.metric if scores is not None else "explicit",
    )  # fmt: skip
    if layers is not None:
        keep = tuple(i for i in range(num_layers) if i not in set(layers))
        reasons = {i: "listed explicitly" for i in layers}
        return LayerPlan(num_layers, tuple(layers), keep, "explicit", protected, reasons)
    assert scores is not None
    n = n_remove if n_remove is not None else n_from_ratio(float(ratio), num_layers)  # type: ignore[arg-type]
    if scores.metric == "angular":
        remove, reasons = _angular_block(scores, n, protected)
    else:
        scores.check_covers(n, protected)  # a greedy order that stops short, or was chosen with other protection
        remove = [i for i in scores.removal_order if i not in protected][:n]
        rank = {layer: r + 1 for r, layer in enumerate(scores.removal_order)}
        how = "chosen after re-scoring" if scores.iterative else "rank"
        reasons = {
            i: f"{scores.metric}={scores.scores[i]:.6g} ({how} {rank[i]} of {num_layers}, lowest first)" for i in remove
        }
        if scores.iterative:
            reasons = {
                s["removed"]: f"{scores.metric}={s['score']:.6g} at step {k + 1} after re-scoring"
                for k, s in enumerate(scores.iterative)
                if s["removed"] in remove
            }
    keep = tuple(i for i in range(num_layers) if i not in set(remove))
    return LayerPlan(num_layers, tuple(remove), keep, scores.metric, protected, reasons)


def check_request(
    *,
    num_layers: int,
    n_remove: int | None = None,
    ratio: float | None = None,
    layers: list[int] | None = None,
    protect: list[int] | tuple[int, ...] = (0, -1),
    metric: str = "bi",
) -> tuple[int, ...]:
    """The rules of a removal request that need only the number of layers (config.json): make_plan keeps them,
    and preflight checks a recipe with them before any model loads, instead of after minutes of scoring.

    Returns the protected layers, normalised. A budget (none of the three amounts) picks n itself, within range.
    """
    protected = normalize_protected(protect, num_layers)
    if layers is not None:
        _check_layers(layers, num_layers, protected)
    elif n_remove is not None or ratio is not None:
        n = n_remove if n_remove is not None else n_from_ratio(float(ratio), num_layers)  # type: ignore[arg-type]
        check_amount(n, num_layers, protected)
        if metric == "angular":
            _angular_starts(num_layers, n, protected)
    return protected


def check_amount(n: int, num_layers: int, protected: tuple[int, ...] | frozenset[int]) -> None:
    """Removing n layers leaves at least one, and takes no protected one."""
    removable = num_layers - len(protected)
    if n >= num_layers:
        raise PlanError(f"cannot remove {n} of {num_layers} layers: at least one layer must stay")
    if n > removable:
        raise PlanError(
            f"cannot remove {n} layers: only {removable} of {num_layers} are not protected "
            f"(protected: {sorted(protected)}; change prune.protect or --protect)"
        )


def _check_layers(layers: list[int], num_layers: int, protected: tuple[int, ...]) -> None:
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise PlanError(f"layer index {bad[0]} is out of range: the model has layers 0..{num_layers - 1}")
    if len(set(layers)) != len(layers):
        raise PlanError(f"layer list {layers} names a layer twice")
    if len(layers) >= num_layers:
        raise PlanError(f"cannot remove all {num_layers} layers: at least one layer must stay")
    hit = [i for i in layers if i in protected]
    if hit:
        raise PlanError(
            f"layer {hit[0]} is protected (protected: {list(protected)}); remove it from the list, or set "
            "prune.protect / --protect to a list without it"
        )


def _angular_block(scores: LayerScores, n: int, protected: tuple[int, ...]) -> tuple[list[int], dict[int, str]]:
    """Gromov et al.: remove the n contiguous layers whose input and output are closest in angle."""
    starts = _angular_starts(scores.num_layers, n, protected)
    best = min(starts, key=lambda s: (scores.block_distance(s, n), s))
    d = scores.block_distance(best, n)
    remove = list(range(best, best + n))
    return remove, {i: f"in block [{best}, {best + n}) with angular distance {d:.6g}" for i in remove}


def _angular_starts(num_layers: int, n: int, protected: tuple[int, ...]) -> list[int]:
    """First layers of the blocks of n contiguous layers that contain no protected layer."""
    starts = [s for s in range(num_layers - n + 1) if not any(p in protected for p in range(s, s + n))]
    if not starts:
        raise PlanError(f"no block of {n} contiguous layers avoids the protected layers {list(protected)}")
    return starts
