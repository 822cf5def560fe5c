"""Layer importance: Block Influence (ShortGPT) and the orders it is compared against.

The math is in small pure functions over hidden-state tensors (pinned by tests on hand-made inputs). The
scorer runs the model once over the calibration batches with a forward pre-hook and a forward hook on every
decoder layer, so X_i is exactly layer i's input and X_i+1 exactly its output (`output_hidden_states` is not
used: in several implementations its last entry comes after the final norm). Statistics are accumulated per
layer in float64 while the forward pass runs, so memory stays at one batch of activations.

Scores mean "importance": the layer with the lowest score is removed first.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import PlanError
from .files import atomic_write_text

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from .calibration import CalibrationSet

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- math
def token_cosine(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """cos(x_t, y_t) = x_t·y_t / (‖x_t‖ ‖y_t‖) for every token t, over the last (hidden) dimension, in float32."""
    x, y = x.float(), y.float()
    return (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1)).clamp_min(eps)


def token_relative_magnitude(x_in: torch.Tensor, x_out: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """‖f(x)‖ / ‖x + f(x)‖ per token, with f(x) = x_out − x_in the layer's residual update.

    The paper writes ‖f(x)/(x+f(x))‖; read element-wise that divides by near-zero coordinates, so, as in
    Samragh et al. (2023) where the metric comes from, it is taken as a ratio of norms.
    """
    x_in, x_out = x_in.float(), x_out.float()
    return (x_out - x_in).norm(dim=-1) / x_out.norm(dim=-1).clamp_min(eps)


def token_angular_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """arccos(cos(x_t, y_t)) / π per token: 0 for the same direction, 1 for opposite (Gromov et al., 2024)."""
    return torch.arccos(token_cosine(x, y).clamp(-1.0, 1.0)) / math.pi


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> float:
    if mask is None:
        return float(values.double().mean())
    mask = mask.bool()
    return float(values.double()[mask].sum() / mask.sum())


def block_influence(x_in: torch.Tensor, x_out: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """BI = 1 − mean over non-padding tokens t of cos(X_i,t, X_i+1,t) (ShortGPT, eq. 1). 0 = no change."""
    return 1.0 - _masked_mean(token_cosine(x_in, x_out), mask)


def relative_magnitude(x_in: torch.Tensor, x_out: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean over non-padding tokens of ‖f(x)‖ / ‖x + f(x)‖ (see token_relative_magnitude)."""
    return _masked_mean(token_relative_magnitude(x_in, x_out), mask)


def angular_distance(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean over non-padding tokens of arccos(cos(x_t, y_t)) / π."""
    return _masked_mean(token_angular_distance(x, y), mask)


# ------------------------------------------------------------------------------------------- accumulation
@dataclass
class LayerStats:
    """Per-layer sums over calibration tokens; `pair_angle_sum[i][j]` is between boundaries i < j.

    Boundary i is the input of layer i; boundary L is the output of the last layer.
    """

    num_layers: int
    num_tokens: int = 0
    cos_sum: list[float] = field(default_factory=list)
    relmag_sum: list[float] = field(default_factory=list)
    pair_angle_sum: list[list[float]] | None = None

    def mean(self, values: list[float]) -> list[float]:
        return [v / max(self.num_tokens, 1) for v in values]


def _bi(stats: LayerStats) -> list[float]:
    return [1.0 - c for c in stats.mean(stats.cos_sum)]


def _relative_magnitude(stats: LayerStats) -> list[float]:
    return stats.mean(stats.relmag_sum)


def _angular(stats: LayerStats) -> list[float]:
    if stats.pair_angle_sum is None:  # one layer is a block of one: arccos of the same cosine BI uses
        return [math.acos(max(-1.0, min(1.0, c))) / math.pi for c in stats.mean(stats.cos_sum)]
    return [stats.pair_angle_sum[i][i + 1] / max(stats.num_tokens, 1) for i in range(stats.num_layers)]


def _sequential(stats: LayerStats) -> list[float]:
    return [float(i) for i in range(stats.num_layers)]  # layer 0 first


def _reverse(stats: LayerStats) -> list[float]:
    return [float(stats.num_layers - 1 - i) for i in range(stats.num_layers)]  # last layer first


# Metric name → function of the accumulated statistics. recipe.MetricName lists the same keys.
METRICS: dict[str, Callable[[LayerStats], list[float]]] = {
    "bi": _bi,
    "relative_magnitude": _relative_magnitude,
    "sequential": _sequential,
    "reverse": _reverse,
    "angular": _angular,
}
FIXED_ORDER_METRICS = ("sequential", "reverse")


class _Collector:
    """Hooks on every decoder layer that fold each batch into LayerStats as the forward pass runs."""

    def __init__(self, layers: torch.nn.ModuleList, layer_ids: list[int], stats: LayerStats, pairs: bool):
        self.stats, self.layer_ids, self.pairs = stats, layer_ids, pairs
        self.mask: torch.Tensor | None = None
        self._inputs: dict[int, torch.Tensor] = {}
        self.boundaries: dict[int, torch.Tensor] = {}
        self._handles = []
        for pos, layer in enumerate(layers):
            self._handles.append(layer.register_forward_pre_hook(self._pre(pos), with_kwargs=True))
            self._handles.append(layer.register_forward_hook(self._post(pos), with_kwargs=True))

    def _pre(self, pos: int) -> Callable[..., None]:
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            self._inputs[pos] = args[0] if args else kwargs["hidden_states"]

        return hook

    def _post(self, pos: int) -> Callable[..., None]:
        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            x_in = self._inputs.pop(pos)
            x_out = output[0] if isinstance(output, tuple) else output
            mask = self.mask
            i = self.layer_ids[pos]
            self.stats.cos_sum[i] += float(token_cosine(x_in, x_out).double()[mask].sum())
            self.stats.relmag_sum[i] += float(token_relative_magnitude(x_in, x_out).double()[mask].sum())
            if self.pairs:
                self.boundaries[i] = _unit(x_in)
                if pos == len(self.layer_ids) - 1:
                    self.boundaries[self.stats.num_layers] = _unit(x_out)

        return hook

    def fold_pairs(self) -> None:
        """Angular distance between every pair of boundaries of this batch (Gromov et al.'s blocks)."""
        assert self.stats.pair_angle_sum is not None and self.mask is not None
        ids = sorted(self.boundaries)
        for a, i in enumerate(ids):
            for j in ids[a + 1 :]:
                cos = (self.boundaries[i] * self.boundaries[j]).sum(-1).clamp(-1.0, 1.0)
                angle = torch.arccos(cos) / math.pi
                self.stats.pair_angle_sum[i][j] += float(angle.double()[self.mask].sum())
        self.boundaries.clear()

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _unit(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def collect_stats(
    model: PreTrainedModel,
    calibration: CalibrationSet,
    *,
    pairs: bool = False,
    skip: frozenset[int] = frozenset(),
    progress: bool = True,
) -> LayerStats:
    """One forward pass over the calibration set, every layer scored at once; `skip` layers act as removed."""
    from .modeling import decoder_body, decoder_layers, layers_removed
    from .runtime import tqdm

    n = len(decoder_layers(model))
    stats = LayerStats(num_layers=n, cos_sum=[0.0] * n, relmag_sum=[0.0] * n)
    if pairs:
        stats.pair_angle_sum = [[0.0] * (n + 1) for _ in range(n + 1)]
    body = decoder_body(model)
    device = next(model.parameters()).device
    with layers_removed(model, skip), torch.inference_mode():
        kept = [i for i in range(n) if i not in skip]
        collector = _Collector(decoder_layers(model), kept, stats, pairs)
        try:
            for batch in tqdm(calibration.batches, desc="calibration", unit="batch", disable=not progress):
                mask = batch.attention_mask.to(device)
                collector.mask = mask.bool()
                body(input_ids=batch.input_ids.to(device), attention_mask=mask, use_cache=False)
                if pairs:
                    collector.fold_pairs()
                stats.num_tokens += int(mask.sum())
        finally:
            collector.close()
    return stats


# -------------------------------------------------------------------------------------------------- scores
@dataclass
class LayerScores:
    """What `shortgpt-deploy score` writes to scores.json.

    A score of NaN means "not scored" (ppl_greedy scores only the layers it removes); scores.json writes it as
    null. `removal_order` then lists only the scored layers, in the order they were chosen.
    """

    metric: str
    model: str
    num_layers: int
    scores: list[float]
    removal_order: list[int]
    calibration: dict[str, Any]
    all_metrics: dict[str, list[float]] = field(default_factory=dict)
    angular_distance: list[list[float]] | None = None  # [i][j]: mean angular distance of boundaries i < j
    iterative: list[dict[str, Any]] | None = None  # one entry per removal when re-scored after each
    duration_s: float = 0.0
    greedy: dict[str, Any] | None = None  # ppl_greedy: what the scores mean, dense perplexity, forward passes

    def block_distance(self, start: int, n: int) -> float:
        """Angular distance between the input of layer `start` and the output of layer `start + n − 1`."""
        if self.angular_distance is None:
            raise PlanError("these scores have no block distances; score with --metric angular")
        return self.angular_distance[start][start + n]

    def check_covers(self, n: int, protected: tuple[int, ...] | frozenset[int]) -> None:
        """Raise unless the first n removable layers of `removal_order` are ones these scores really chose.

        A greedy order (ppl_greedy) stops after the layers it was asked for, and each of its steps assumes the
        steps before it: a plan must neither go past its end nor skip a step for a layer protected now.
        """
        ranked = [i for i in self.removal_order if i not in protected]
        steps = [s["removed"] for s in self.iterative or []]
        last = ranked[n - 1] if 0 < n <= len(ranked) else None
        used = steps[: steps.index(last) + 1] if last in steps else steps  # the steps the plan relies on
        skipped = [i for i in used if i in protected]
        if skipped:
            raise PlanError(
                f"layer {skipped[0]} is protected but was removed at step {steps.index(skipped[0]) + 1} of the "
                f"{self.metric} order, and the later steps were chosen with it gone; score again with the same "
                "protected layers"
            )
        if len(ranked) < n:
            raise PlanError(
                f"these {self.metric} scores rank only {len(ranked)} removable layers but the plan removes {n}; "
                f"score again with --n-remove {n} (or a prune.n_remove / ratio that asks for {n})"
            )

    def save(self, path: Path) -> None:
        import json

        data = asdict(self)
        data["scores"] = [None if math.isnan(v) else v for v in self.scores]  # JSON has no NaN: null
        atomic_write_text(path, json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> LayerScores:
        import json

        try:
            data = json.loads(path.read_text())
            data.pop("schema_version", None)  # run.RunDir.save_scores writes one; earlier files have none
            data["scores"] = [math.nan if v is None else v for v in data["scores"]]
            return cls(**data)
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise PlanError(f"{path} is not a scores.json written by `shortgpt-deploy score`: {err}") from None


def _order(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: (scores[i], i))


def score_layers(
    model: PreTrainedModel,
    calibration: CalibrationSet,
    *,
    metric: str = "bi",
    model_name: str = "",
    progress: bool = True,
) -> LayerScores:
    """Score every decoder layer with `metric` (a key of METRICS) in one pass over the calibration set."""
    from .modeling import decoder_layers

    return scores_from_pass(
        lambda pairs: collect_stats(model, calibration, pairs=pairs, progress=progress),
        len(decoder_layers(model)),
        calibration,
        metric=metric,
        model_name=model_name,
    )


def scores_from_pass(
    collect: Callable[[bool], LayerStats],
    num_layers: int,
    calibration: CalibrationSet,
    *,
    metric: str,
    model_name: str,
) -> LayerScores:
    """scores.json's content from one pass, `collect(pairs)` (in memory here, or streamed: streaming.py); the
    fixed orders need no pass, and the pair matrix is collected only for `angular`."""
    if metric not in METRICS:
        raise PlanError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    start = time.perf_counter()
    stats = LayerStats(num_layers=num_layers) if metric in FIXED_ORDER_METRICS else collect(metric == "angular")
    scores = METRICS[metric](stats)
    all_metrics = {name: fn(stats) for name, fn in METRICS.items()} if stats.num_tokens else {}
    angular = None
    if stats.pair_angle_sum is not None:
        angular = [[v / stats.num_tokens for v in row] for row in stats.pair_angle_sum]
    return LayerScores(
        metric=metric,
        model=model_name,
        num_layers=stats.num_layers,
        scores=scores,
        removal_order=_order(scores),
        calibration=calibration.describe(),
        all_metrics=all_metrics,
        angular_distance=angular,
        duration_s=time.perf_counter() - start,
    )


def score_iteratively(
    model: PreTrainedModel,
    calibration: CalibrationSet,
    *,
    metric: str = "bi",
    n_remove: int,
    protected: frozenset[int],
    model_name: str = "",
    progress: bool = True,
) -> LayerScores:
    """Remove the least important layer, re-score the rest, repeat `n_remove` times (one pass per removal).

    One-shot BI scores each layer in the full model; after a removal the remaining layers see different
    inputs, so their influence can change. `removal_order` is the sequence of choices.
    """
    from .runtime import tqdm

    start = time.perf_counter()
    first = score_layers(model, calibration, metric=metric, model_name=model_name, progress=False)
    removed: list[int] = []
    steps = []
    scores = first.scores
    for step in tqdm(range(n_remove), desc=f"iterative {metric}", unit="layer", disable=not progress):
        if step:
            stats = collect_stats(model, calibration, skip=frozenset(removed), progress=False)
            scores = METRICS[metric](stats)
        candidates = [i for i in range(first.num_layers) if i not in removed and i not in protected]
        if not candidates:
            raise PlanError(f"only {len(removed)} layers can be removed: the rest are protected")
        choice = min(candidates, key=lambda i: (scores[i], i))
        removed.append(choice)
        steps.append({"removed": choice, "score": scores[choice], "scores": scores})
    first.iterative = steps
    first.removal_order = removed + [i for i in first.removal_order if i not in removed]
    first.duration_s = time.perf_counter() - start
    return first
