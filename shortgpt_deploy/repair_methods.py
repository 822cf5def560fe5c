"""The training-free repairs, in memory: find each gap, run the models, fold the fix into the pruned model.

repair.py wraps them into `repair_checkpoint` (load, fit, write a stock checkpoint); the math is in
repair_fit.py. Each method changes a few existing tensors of the pruned model and adds none.

- `linear` (ReplaceMe): per contiguous run of removed layers (a *gap*), a d×d map T on the MLP branch of the
  *anchor* layer, the last kept layer before the gap, so that its output reproduces the dense hidden state
  after the gap; folded into that layer's down_proj. Gaps are fitted in order, each on the model with the
  earlier ones already repaired, so later fits also absorb what earlier ones left. Two choices:
  * a gap at layer 0 has no kept layer before it. Folding T into the embedding would also change the LM head
    when the two are tied, so the anchor is the first kept layer after the gap instead, fitted to the dense
    output of that same layer; embeddings are never changed, tied or not.
  * Gemma2/3 pass the MLP output through post_feedforward_layernorm, which would undo a full T folded before
    it: there T is diagonal and folded into that norm's weight.
- `scale` (after Prune&Comp): per gap, α = mean‖h after‖ / mean‖h before‖ in the dense model. Multiplying the
  stream at the gap by α is the same, because every layer and the final norm normalise their input, as
  dividing what every later layer writes into the stream by α: so the residual writers (o_proj/down_proj,
  or Gemma2/3's post-norms) of the layers after the gap are scaled by 1/α, and embeddings never are.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from . import repair_fit as fit
from .errors import UnsupportedArchitectureError
from .plan import LayerPlan
from .repair_distill import DistillOptions, repair_distill
from .repair_gaps import Gap, GapRepair, RepairError, find_gaps  # noqa: F401  (find_gaps: the methods' vocabulary)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from .calibration import Batch, CalibrationSet

logger = logging.getLogger(__name__)

OBJECTIVES = ("lstsq", "cosine")


@dataclass(frozen=True)
class RepairOptions:
    objective: str = "lstsq"  # linear: least squares, or cosine (a few Adam steps from the LS solution)
    ridge: float = 1e-4  # λ relative to tr(MᵀM)/d, pulling T towards the identity (repair_fit.solve_full)
    cosine_steps: int = 50
    cosine_lr: float = 1e-4
    cosine_max_tokens: int = 8192  # the cosine steps need the tokens themselves: at most this many are kept
    dtype: str = "float32"  # of both models while fitting; tensors are written back in the checkpoint's dtype
    device: str = "cpu"
    distill: DistillOptions = field(default_factory=DistillOptions)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise RepairError(f"unknown repair objective {self.objective!r}; known: {', '.join(OBJECTIVES)}")
        if self.ridge < 0 or self.cosine_steps < 0 or self.cosine_max_tokens < 1 or self.cosine_lr <= 0:
            raise RepairError("repair options: ridge and cosine_steps must be ≥ 0, cosine_lr and max tokens > 0")


# ------------------------------------------------------------------------------------ model plumbing
class _Stop(Exception):
    """Raised by a hook once all it needs is captured: the rest of the forward pass is skipped."""


def capture(model: PreTrainedModel, batch: Batch, taps: dict[str, tuple[torch.nn.Module, str]], stop: str) -> dict:
    """Run `model` on `batch`, return each tap's tensor (a module's "in"put or "out"put); stop after tap `stop`."""
    from .modeling import decoder_body

    got: dict[str, torch.Tensor] = {}

    def hook(key: str, where: str) -> Callable[..., None]:
        def keep(*hook_args: Any) -> None:
            if where == "in":
                args, kwargs = hook_args[1], hook_args[2]
                got[key] = args[0] if args else kwargs["hidden_states"]
            else:
                out = hook_args[-1]
                got[key] = out[0] if isinstance(out, tuple) else out
            if key == stop:
                raise _Stop

        return keep

    handles = [
        m.register_forward_pre_hook(hook(k, w), with_kwargs=True) if w == "in" else m.register_forward_hook(hook(k, w))
        for k, (m, w) in taps.items()
    ]
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            decoder_body(model)(
                input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), use_cache=False
            )
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return got


def mlp_branch(layer: torch.nn.Module) -> tuple[torch.nn.Module, bool]:
    """The module whose output the MLP adds to the stream, and whether only a diagonal T can be folded there."""
    if hasattr(layer, "post_feedforward_layernorm"):  # Gemma2/3: down_proj → post-norm → residual
        return layer.post_feedforward_layernorm, True
    if not hasattr(getattr(layer, "mlp", None), "down_proj"):
        raise UnsupportedArchitectureError(
            f"{type(layer).__name__} has no mlp.down_proj: the linear repair does not know where to fold T"
        )
    return layer.mlp, False


def residual_writers(layer: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name within the layer, module) of what writes into the residual stream: scaling these scales the updates."""
    names = ("post_attention_layernorm", "post_feedforward_layernorm")
    if not hasattr(layer, "post_feedforward_layernorm"):  # elsewhere post_attention_layernorm is the MLP's input norm
        names = ("self_attn.o_proj", "mlp.down_proj")
    try:
        return [(n, layer.get_submodule(n)) for n in names]
    except AttributeError:
        raise UnsupportedArchitectureError(
            f"{type(layer).__name__} lacks {' or '.join(names)}: the scale repair does not know what to rescale"
        ) from None


def norm_offset(norm: torch.nn.Module) -> float:
    """1.0 for a norm that multiplies by (1 + w) (Gemma), 0.0 for one that multiplies by w: run it with w = 0."""
    x = torch.ones(1, norm.weight.shape[0], dtype=norm.weight.dtype, device=norm.weight.device)
    out = torch.func.functional_call(norm, {"weight": torch.zeros_like(norm.weight)}, (x,))
    return 1.0 if float(out.abs().max()) > 0 else 0.0


def fold(module: torch.nn.Module, t: torch.Tensor, name: str, prefix: str) -> dict[str, torch.Tensor]:
    """Make `module`'s output (times T, or diag(t)) part of its weights; returns {checkpoint name: parameter}."""
    with torch.no_grad():
        if isinstance(module, torch.nn.Linear):
            w, b = fit.fold_into_linear(module.weight, module.bias, t.to(module.weight.device))
            module.weight.copy_(w)
            changed = {f"{prefix}{name}.weight": module.weight}
            if module.bias is not None and b is not None:
                module.bias.copy_(b)
                changed[f"{prefix}{name}.bias"] = module.bias
            return changed
        if t.dim() != 1:
            raise UnsupportedArchitectureError(f"{name} is a norm: only a diagonal map can be folded into it")
        module.weight.copy_(fit.fold_into_norm(module.weight, t.to(module.weight.device), norm_offset(module)))
        return {f"{prefix}{name}.weight": module.weight}


# ------------------------------------------------------------------------------------------- methods
Changed = dict[str, torch.Tensor]
Method = Callable[..., tuple[list[GapRepair], Changed]]


def repair_linear(
    dense: PreTrainedModel,
    student: PreTrainedModel,
    plan: LayerPlan,
    calibration: CalibrationSet,
    *,
    prefix: str,
    options: RepairOptions,
    progress: bool = True,
) -> tuple[list[GapRepair], Changed]:
    """Fit and fold T for every gap, in order, into `student` (the pruned model) in memory."""
    from .modeling import decoder_layers
    from .runtime import tqdm  # on the console also while libraries' output goes to the log

    gaps = find_gaps(plan)
    student_layers = decoder_layers(student)
    results, changed = [], {}
    bar = tqdm(total=len(gaps) * len(calibration.batches), desc="repair linear", unit="batch", disable=not progress)
    for gap in gaps:
        start = time.perf_counter()
        layer = student_layers[gap.anchor_new]
        _, diagonal = mlp_branch(layer)
        eq, samples = _gap_sums(dense, student, gap, calibration, options, bar.update)
        if not diagonal and eq.num_tokens < eq.mtm.shape[0]:
            logger.warning(
                "gap %s: %d tokens for a %d-wide T; the ridge decides the rest",
                list(gap.removed),
                eq.num_tokens,
                eq.mtm.shape[0],
            )
        t = fit.solve_diagonal(eq, ridge=options.ridge) if diagonal else fit.solve_full(eq, ridge=options.ridge)
        record = GapRepair(
            list(gap.removed), "diagonal" if diagonal else "full", [], gap.anchor, gap.anchor_new, gap.side
        )
        if options.objective == "cosine":
            record.lstsq_fit_rel_error = fit.fit_error(eq, t).fit_rel_error
            t, record.cosine_loss_lstsq, record.cosine_loss = fit.refine_cosine(
                t, samples, steps=options.cosine_steps, lr=options.cosine_lr
            )
        err = fit.fit_error(eq, t)
        record.fit_rel_error_before, record.fit_rel_error = err.fit_rel_error_before, err.fit_rel_error
        record.state_rel_error_before, record.state_rel_error = err.state_rel_error_before, err.state_rel_error
        where = "post_feedforward_layernorm" if diagonal else "mlp.down_proj"
        folded = fold(layer.get_submodule(where), t, where, f"{prefix}{gap.anchor_new}.")
        changed.update(folded)
        record.folded_into, record.num_tokens = sorted(folded), eq.num_tokens
        record.time_s = time.perf_counter() - start
        logger.info("gap %s: fit error %.4g → %.4g", list(gap.removed), err.fit_rel_error_before, err.fit_rel_error)
        results.append(record)
    bar.close()
    return results, changed


def _gap_sums(
    dense: PreTrainedModel,
    student: PreTrainedModel,
    gap: Gap,
    calibration: CalibrationSet,
    options: RepairOptions,
    tick: Callable[[int], Any],
) -> tuple[fit.NormalEquations, list[tuple[torch.Tensor, ...]]]:
    """One pass over the calibration set: the dense state after the gap (Y), and the student's anchor layer
    output split into its MLP branch (M) and the rest (H); summed, and kept as rows for the cosine steps."""
    from .modeling import decoder_layers

    layer = decoder_layers(student)[gap.anchor_new]
    branch, _ = mlp_branch(layer)
    target = decoder_layers(dense)[gap.target]
    eq: fit.NormalEquations | None = None
    samples: list[tuple[torch.Tensor, ...]] = []
    kept = 0
    for batch in calibration.batches:
        y = capture(dense, batch, {"y": (target, "out")}, "y")["y"]
        got = capture(student, batch, {"m": (branch, "out"), "out": (layer, "out")}, "out")
        m, h, mask = got["m"], got["out"] - got["m"], batch.attention_mask.to(y.device).bool()
        eq = eq or fit.NormalEquations.zeros(m.shape[-1], device=m.device)
        eq.add(m, h, y, mask)
        if options.objective == "cosine" and kept < options.cosine_max_tokens:
            rows = [x[mask][: options.cosine_max_tokens - kept] for x in (m, h, y)]
            samples.append(tuple(rows))
            kept += rows[0].shape[0]
        tick(1)
    if eq is None:
        raise RepairError("the calibration set has no batches: the repair needs calibration text")
    return eq, samples


def repair_scale(
    dense: PreTrainedModel,
    student: PreTrainedModel,
    plan: LayerPlan,
    calibration: CalibrationSet,
    *,
    prefix: str,
    options: RepairOptions,
    progress: bool = True,
) -> tuple[list[GapRepair], Changed]:
    """Measure α per gap in one dense pass, then scale the writers of every kept layer after each gap by 1/α."""
    from .modeling import decoder_layers
    from .runtime import tqdm  # on the console also while libraries' output goes to the log

    start = time.perf_counter()
    gaps = find_gaps(plan)
    dense_layers, student_layers = decoder_layers(dense), decoder_layers(student)
    taps = {}
    for k, gap in enumerate(gaps):
        taps[f"x{k}"] = (dense_layers[gap.removed[0]], "in")
        taps[f"y{k}"] = (dense_layers[gap.removed[-1]], "out")
    sums = [fit.MagnitudeSums() for _ in gaps]
    for batch in tqdm(calibration.batches, desc="repair scale", unit="batch", disable=not progress):
        got = capture(dense, batch, taps, f"y{len(gaps) - 1}")
        mask = batch.attention_mask.to(got["x0"].device).bool()
        for k, s in enumerate(sums):
            s.add(got[f"x{k}"], got[f"y{k}"], mask)
    factor = [1.0] * len(plan.keep)  # per kept layer: 1/α of every gap before it
    after = [[new for new, old in enumerate(plan.keep) if old > gap.removed[-1]] for gap in gaps]
    for layers, s in zip(after, sums, strict=True):
        for new in layers:
            factor[new] /= s.ratio
    changed: Changed = {}
    for new, c in enumerate(factor):
        if c != 1.0:
            for name, module in residual_writers(student_layers[new]):
                changed.update(fold(module, torch.full((module.weight.shape[0],), c), name, f"{prefix}{new}."))
    elapsed = time.perf_counter() - start  # one pass serves every gap
    return [
        GapRepair(
            list(gap.removed),
            "scale",
            sorted(k for k in changed for new in layers if k.startswith(f"{prefix}{new}.")),
            alpha=s.ratio,
            num_tokens=s.num_tokens,
            time_s=elapsed,
        )
        for gap, layers, s in zip(gaps, after, sums, strict=True)
    ], changed


METHODS: dict[str, Method] = {"linear": repair_linear, "scale": repair_scale, "distill": repair_distill}
