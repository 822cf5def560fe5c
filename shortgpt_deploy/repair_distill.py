"""Short knowledge distillation from the dense model into the pruned (or already repaired) one: `repair_distill`.

The dense model is the teacher (frozen, eval mode). On the calibration batches the student learns to match
its next-token distributions, and optionally its hidden state after each gap:

    loss = T² · mean_t KL(softmax(z_dense,t / T) ‖ softmax(z_student,t / T))
           + w · Σ_gaps Σ_t ‖h_student,t − h_dense,t‖² / Σ_t ‖h_dense,t‖²

over the non-padded tokens t. T is `temperature`; T² keeps the KL's gradients the same size whatever T is
(Hinton et al. 2015). The hidden term (`hidden_weight` w, default 0) compares the student's anchor layer output
with the dense state after the gap, the pair the linear repair fits; it is divided by the dense state's energy
because hidden-state scales differ by orders of magnitude between models, so w means the same on each.

What trains (`trainable`):
- `layers`: every tensor of the kept layers next to each gap, its anchor and the layer after the anchor;
- `lora`: low-rank adapters W + (α/r)·B·A on every Linear of the decoder layers, merged into W before
  returning, so the checkpoint keeps the pruned one's tensor names and shapes. peft is not among our
  dependencies (nor in the environment), and an adapter that merges by one add per weight is a few lines.
Embeddings, the final norm and the LM head never train: with tied embeddings the LM head is the embedding.

Budgets: `max_steps`, `max_tokens` (training tokens seen), `max_time_s` (the whole method: no step is started
unless it and a held-out evaluation after it still fit, judged by the last ones' durations). The last
`holdout` share of the calibration batches (at least one) is held out; its loss is measured before training and
every `eval_every` steps, training stops early after `patience` evaluations without improvement, and the best
state measured (the untrained one included) is what the student keeps. One step is one calibration batch; the
batch order is a permutation per epoch drawn from `seed`, which also seeds torch (the adapters' initialisation).

This module imports repair_methods only inside functions: repair_methods imports DistillOptions from here.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from .calibration import Batch, CalibrationSet
    from .plan import LayerPlan
    from .repair_gaps import GapRepair
    from .repair_methods import RepairOptions

logger = logging.getLogger(__name__)

TRAINABLE = ("layers", "lora")
CLIP_NORM = 1.0  # a few steps on little data: one outlier batch must not throw the pretrained weights far


@dataclass(frozen=True)
class DistillOptions:
    trainable: str = "layers"  # layers | lora (see the module docstring)
    lora_rank: int = 8
    lora_alpha: float = 16.0  # the adapters add (lora_alpha / lora_rank) · B A
    temperature: float = 1.0
    hidden_weight: float = 0.0  # w of the hidden-state term; 0 leaves it out (and skips capturing states)
    lr: float = 1e-4
    max_steps: int = 200
    max_tokens: int | None = None  # training tokens (non-padded), None: no token budget
    max_time_s: float | None = 600.0  # None: no time budget
    eval_every: int = 10
    patience: int = 3  # evaluations without improvement before stopping
    holdout: float = 0.125  # share of the calibration batches held out (at least one)
    seed: int = 0

    def __post_init__(self) -> None:
        from .repair_gaps import RepairError

        if self.trainable not in TRAINABLE:
            raise RepairError(f"unknown distill trainable {self.trainable!r}; known: {', '.join(TRAINABLE)}")
        positive = {"lora_rank": self.lora_rank, "lora_alpha": self.lora_alpha, "temperature": self.temperature}
        positive |= {"lr": self.lr, "max_steps": self.max_steps, "eval_every": self.eval_every}
        budgets = {"max_tokens": self.max_tokens, "max_time_s": self.max_time_s}
        positive |= {"patience": self.patience, **{k: 1 if v is None else v for k, v in budgets.items()}}
        bad = [k for k, v in positive.items() if not v > 0]
        if bad or self.hidden_weight < 0 or not 0 < self.holdout < 1:
            raise RepairError(
                f"repair distill options: {', '.join(bad) or 'hidden_weight or holdout'} out of range; "
                "lora_rank, lora_alpha, temperature, lr, max_steps, eval_every, patience, max_tokens and max_time_s "
                "must be > 0, hidden_weight ≥ 0, holdout between 0 and 1"
            )


# ------------------------------------------------------------------------------------------ pure math
def distill_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T² · mean over rows of KL(softmax(z_t / T) ‖ softmax(z_s / T)) = T² · mean Σ_v p_t (log p_t − log p_s).

    Rows are tokens ([tokens, vocab]); computed in float32 whatever the models' dtype.
    """
    t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    return temperature**2 * (t.exp() * (t - s)).sum(-1).mean()


def relative_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Σ‖h_s − h_t‖² / Σ‖h_t‖² over rows (tokens): 0 when equal, 1 when the student's state is zero."""
    diff = (student.float() - teacher.float()).pow(2).sum()
    return diff / teacher.float().pow(2).sum().clamp_min(torch.finfo(torch.float32).tiny)


def split_batches(batches: list[Batch], holdout: float) -> tuple[list[Batch], list[Batch]]:
    """(training, held-out): the last round(share) batches, at least one, are held out. The calibration set is
    already a seeded random sample of blocks, so the last batches are as representative as any."""
    from .repair_gaps import RepairError

    if len(batches) < 2:
        raise RepairError(
            f"distill needs at least 2 calibration batches (one to train on, one held out), got {len(batches)}: "
            "raise calibration.samples or lower calibration.batch_size"
        )
    held = min(len(batches) - 1, max(1, round(holdout * len(batches))))
    return batches[:-held], batches[-held:]


def trainable_layers(gaps: list[Any], num_layers: int) -> list[int]:
    """Pruned-model indices of the kept layers next to each gap: its anchor and the layer after the anchor."""
    return sorted({i for g in gaps for i in (g.anchor_new, g.anchor_new + 1) if i < num_layers})


# -------------------------------------------------------------------------------------------- adapters
class LowRankAdapter(torch.nn.Module):
    """base(x) + (α/r) · x Aᵀ Bᵀ. B starts at zero, so training starts from the model exactly as it is."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        w = base.weight
        self.a = torch.nn.Parameter(torch.empty(rank, base.in_features, dtype=w.dtype, device=w.device))
        torch.nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))  # what nn.Linear (and peft) start A from
        self.b = torch.nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * ((x @ self.a.T) @ self.b.T)

    def merge(self) -> bool:
        """Fold (α/r)·B·A into the base weight in place; whether that changed any of its values."""
        with torch.no_grad():
            old = self.base.weight.clone()
            self.base.weight.add_(self.scale * (self.b @ self.a))
            return not torch.equal(old, self.base.weight)


@contextmanager
def adapters(
    layers: torch.nn.ModuleList, prefix: str, *, rank: int, alpha: float
) -> Iterator[dict[str, LowRankAdapter]]:
    """Every Linear of the decoder layers wrapped in an adapter ({checkpoint weight name: adapter}); on exit the
    original Linears are back in place, whatever happened (merging is the caller's, on success only)."""
    wrapped: dict[str, tuple[torch.nn.Module, str, LowRankAdapter]] = {}
    try:
        for i, layer in enumerate(layers):
            for name, module in list(layer.named_modules()):
                if isinstance(module, torch.nn.Linear):
                    parent_name, _, child = name.rpartition(".")
                    parent = layer.get_submodule(parent_name) if parent_name else layer
                    adapter = LowRankAdapter(module, rank, alpha)
                    setattr(parent, child, adapter)
                    wrapped[f"{prefix}{i}.{name}.weight"] = (parent, child, adapter)
        yield {k: a for k, (_, _, a) in wrapped.items()}
    finally:
        for parent, child, adapter in wrapped.values():
            setattr(parent, child, adapter.base)


# ---------------------------------------------------------------------------------------------- the loss
@dataclass
class Taps:
    """The decoder layers whose outputs the hidden term compares: student anchor k ↔ dense target k."""

    student: list[torch.nn.Module]
    dense: list[torch.nn.Module]


def _forward(model: PreTrainedModel, batch: Batch, taps: list[torch.nn.Module]) -> tuple[torch.Tensor, list]:
    """Logits and the outputs of `taps` (decoder layers), on the model's device."""
    got: list[torch.Tensor] = []

    def keep(module: torch.nn.Module, args: Any, out: Any) -> None:
        got.append(out[0] if isinstance(out, tuple) else out)

    handles = [m.register_forward_hook(keep) for m in taps]
    device = next(model.parameters()).device
    try:
        out = model(
            input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), use_cache=False
        )
    finally:
        for h in handles:
            h.remove()
    return out.logits, got


def batch_loss(
    dense: PreTrainedModel, student: PreTrainedModel, batch: Batch, taps: Taps, opts: DistillOptions
) -> tuple[torch.Tensor, int]:
    """The distillation loss on one batch (module docstring), and its number of non-padded tokens."""
    with torch.no_grad():
        t_logits, t_states = _forward(dense, batch, taps.dense)
    s_logits, s_states = _forward(student, batch, taps.student)
    device = s_logits.device
    keep = batch.attention_mask.to(device).bool()
    loss = distill_kl(t_logits.to(device)[keep], s_logits[keep], opts.temperature)
    for s, t in zip(s_states, t_states, strict=True):
        loss = loss + opts.hidden_weight * relative_mse(s[keep], t.to(device)[keep])
    return loss, int(keep.sum())


def _heldout_loss(
    dense: PreTrainedModel, student: PreTrainedModel, held: list[Batch], taps: Taps, opts: DistillOptions
) -> float:
    """The loss over all held-out tokens (token-weighted across batches)."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in held:
            loss, n = batch_loss(dense, student, batch, taps, opts)
            total, tokens = total + float(loss) * n, tokens + n
    return total / tokens


# ------------------------------------------------------------------------------------------- the method
def repair_distill(
    dense: PreTrainedModel,
    student: PreTrainedModel,
    plan: LayerPlan,
    calibration: CalibrationSet,
    *,
    prefix: str,
    options: RepairOptions,
    progress: bool = True,
) -> tuple[list[GapRepair], dict[str, torch.Tensor]]:
    """Distil `dense` into `student` in memory; one record for the whole run, and every tensor it changed."""
    from .modeling import decoder_layers
    from .repair_gaps import GapRepair, find_gaps

    start = time.perf_counter()
    opts = options.distill
    train, held = split_batches(calibration.batches, opts.holdout)
    gaps = find_gaps(plan)
    layers = decoder_layers(student)
    taps = Taps([], [])
    if opts.hidden_weight > 0:
        taps = Taps([layers[g.anchor_new] for g in gaps], [decoder_layers(dense)[g.target] for g in gaps])
    torch.manual_seed(opts.seed)
    dense.eval().requires_grad_(False)
    # Eval mode for the student too: dropout (0 in these configs anyway) would only add noise to so short a run.
    student.eval().requires_grad_(False)
    if opts.trainable == "layers":
        params = {
            f"{prefix}{i}.{n}": p for i in trainable_layers(gaps, len(layers)) for n, p in layers[i].named_parameters()
        }
        old = {n: p.detach().clone() for n, p in params.items()}
        summary = _train(dense, student, list(params.values()), train, held, taps, opts, start, progress)
        changed = {n: p for n, p in params.items() if not torch.equal(old[n], p)}
    else:
        with adapters(layers, prefix, rank=opts.lora_rank, alpha=opts.lora_alpha) as wrapped:
            trained = [p for a in wrapped.values() for p in (a.a, a.b)]
            summary = _train(dense, student, trained, train, held, taps, opts, start, progress)
            changed = {n: a.base.weight for n, a in wrapped.items() if a.merge()}
    student.requires_grad_(False)
    record = GapRepair(sorted(plan.remove), "distill", sorted(changed), num_tokens=summary.pop("tokens"), **summary)
    record.time_s = time.perf_counter() - start
    logger.info(
        "distill (%s): %d steps, held-out loss %.4g → %.4g (best, step %d), stopped by %s, %d tensors changed",
        opts.trainable,
        record.steps,
        record.heldout_loss_before,
        record.heldout_loss_best,
        record.best_step,
        record.stopped_because,
        len(changed),
    )
    return [record], changed


class _Best:
    """The lowest held-out loss measured so far, the step it was measured at, and the trained tensors then."""

    def __init__(self, trained: list[torch.nn.Parameter], loss: float):
        self.trained, self.loss, self.step, self.stale = trained, loss, 0, 0
        self.state = [p.detach().clone() for p in trained]

    def offer(self, loss: float, step: int) -> None:
        if loss < self.loss:
            self.loss, self.step, self.stale = loss, step, 0
            self.state = [p.detach().clone() for p in self.trained]
        else:
            self.stale += 1

    def restore(self) -> None:
        with torch.no_grad():
            for p, kept in zip(self.trained, self.state, strict=True):
                p.copy_(kept)


def _budget_spent(opts: DistillOptions, tokens: int, elapsed_s: float, reserve_s: float) -> str | None:
    """Which budget stops training before the next step: none is started unless `reserve_s` (the last step's and
    the last evaluation's durations: a held-out evaluation may follow the step) still fits in the time."""
    if opts.max_time_s is not None and elapsed_s + reserve_s > opts.max_time_s:
        return "max_time_s"
    if opts.max_tokens is not None and tokens >= opts.max_tokens:
        return "max_tokens"
    return None


def _train(
    dense: PreTrainedModel,
    student: PreTrainedModel,
    trained: list[torch.nn.Parameter],
    train: list[Batch],
    held: list[Batch],
    taps: Taps,
    opts: DistillOptions,
    start: float,
    progress: bool,
) -> dict[str, Any]:
    """The training loop; leaves the best measured state in `trained` and returns the run's summary."""
    from .runtime import tqdm

    for p in trained:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained, lr=opts.lr, weight_decay=0.0)  # decay would pull weights to zero
    order_rng = torch.Generator().manual_seed(opts.seed)
    eval_s = 0.0

    def evaluate() -> float:
        nonlocal eval_s
        t = time.perf_counter()
        loss = _heldout_loss(dense, student, held, taps, opts)
        eval_s = time.perf_counter() - t
        return loss

    best = _Best(trained, evaluate())
    before = last = best.loss
    steps = tokens = 0
    stopped, order, running, step_s = "max_steps", [], 0.0, 0.0
    bar = tqdm(total=opts.max_steps, desc="repair distill", unit="step", disable=not progress)
    while steps < opts.max_steps:
        if spent := _budget_spent(opts, tokens, time.perf_counter() - start, step_s + eval_s):
            stopped = spent
            break
        t0 = time.perf_counter()
        order = order or torch.randperm(len(train), generator=order_rng).tolist()
        loss, n = batch_loss(dense, student, train[order.pop()], taps, opts)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, CLIP_NORM)
        optimizer.step()
        steps, tokens = steps + 1, tokens + n
        running = float(loss.detach()) if steps == 1 else 0.9 * running + 0.1 * float(loss.detach())
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4g}", heldout=f"{best.loss:.4g}")
        if steps % opts.eval_every == 0:
            last = evaluate()
            best.offer(last, steps)
            if best.stale >= opts.patience:
                stopped = "early_stop"
                break
        step_s = time.perf_counter() - t0 - (eval_s if steps % opts.eval_every == 0 else 0.0)
    bar.close()
    if steps % opts.eval_every:  # the state trained last was not measured yet
        last = evaluate()
        best.offer(last, steps)
    best.restore()
    for p in trained:
        p.requires_grad_(False)
    return {
        "steps": steps,
        "tokens": tokens,
        "heldout_loss_before": before,
        "heldout_loss_after": last,
        "heldout_loss_best": best.loss,
        "best_step": best.step,
        "stopped_because": stopped,
    }
