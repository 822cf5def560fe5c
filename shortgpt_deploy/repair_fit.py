"""Pure math of the training-free repairs (`linear`, `scale`): tensors in, tensors out, no model.

Notation: rows are calibration tokens, d is the hidden width. At the *anchor* layer next to a gap,
  M  is the MLP branch's output, what it adds to the residual stream (for Gemma2/3: after
     post_feedforward_layernorm), and H the residual stream before that branch, so the layer outputs H + M;
  Y  is the dense model's hidden state after the gap, and R = Y − H what the branch should have added.
The `linear` repair (ReplaceMe, arXiv 2505.02819) makes the layer output H + M·T instead, T a d×d matrix
(or diag(t) where only a diagonal T can be folded). The `scale` repair (after Prune&Comp, arXiv 2507.18212)
multiplies the residual stream at the gap by α = mean‖Y‖ / mean‖X‖, X the stream entering the gap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


# ---------------------------------------------------------------------------------------- least squares
@dataclass
class NormalEquations:
    """Sums over tokens, in float64: A = Σ MᵀM, B = Σ MᵀR, rr = Σ‖R‖², yy = Σ‖Y‖², and the token count.

    They are all the least-squares fit and its error need, so batches are folded in one at a time and
    the tokens themselves are never kept.
    """

    mtm: torch.Tensor
    mtr: torch.Tensor
    rr: float = 0.0
    yy: float = 0.0
    num_tokens: int = 0

    @classmethod
    def zeros(cls, dim: int, device: torch.device | str | None = None) -> NormalEquations:
        """Empty sums on `device`: where the activations are, so a GPU does the d×d products."""
        z = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        return cls(z, z.clone())

    def add(self, m: torch.Tensor, h: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Fold in one batch ([..., d] each; `mask` [...] is 0 on padding, whose tokens are left out)."""
        m, r, y = _rows(m, mask), _rows(y, mask) - _rows(h, mask), _rows(y, mask)
        self.mtm += m.T @ m
        self.mtr += m.T @ r
        self.rr += float((r * r).sum())
        self.yy += float((y * y).sum())
        self.num_tokens += m.shape[0]


def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1]).double()
    return x if mask is None else x[mask.reshape(-1).bool()]


def ridge_lambda(eq: NormalEquations, ridge: float) -> float:
    """λ = ridge · tr(A) / d: relative to the mean squared size of M, so `ridge` means the same at any scale."""
    return ridge * float(eq.mtm.diagonal().sum()) / eq.mtm.shape[0]


def solve_full(eq: NormalEquations, *, ridge: float) -> torch.Tensor:
    """T = argmin ‖M T − R‖² + λ‖T − I‖² = (A + λI)⁻¹ (B + λI).

    The ridge pulls T towards the identity ("leave the layer as it is"), not towards zero ("drop its MLP"):
    directions the calibration tokens never reach keep the layer's own output.
    """
    lam = ridge_lambda(eq, ridge)
    eye = torch.eye(eq.mtm.shape[0], dtype=torch.float64, device=eq.mtm.device)
    return torch.linalg.solve(eq.mtm + lam * eye, eq.mtr + lam * eye)


def solve_diagonal(eq: NormalEquations, *, ridge: float) -> torch.Tensor:
    """t = argmin ‖M diag(t) − R‖² + λ‖t − 1‖², coordinate by coordinate: t_c = (B_cc + λ) / (A_cc + λ)."""
    lam = ridge_lambda(eq, ridge)
    return (eq.mtr.diagonal() + lam) / (eq.mtm.diagonal() + lam)


def squared_error(eq: NormalEquations, t: torch.Tensor) -> float:
    """‖M T − R‖² = tr(Tᵀ A T) − 2 tr(Tᵀ B) + rr, from the sums alone (a 1-D `t` is diag(t))."""
    t = t.double()
    if t.dim() == 1:
        value = (t * t * eq.mtm.diagonal()).sum() - 2 * (t * eq.mtr.diagonal()).sum() + eq.rr
    else:
        value = (t * (eq.mtm @ t)).sum() - 2 * (t * eq.mtr).sum() + eq.rr
    return max(float(value), 0.0)  # cancellation can leave a tiny negative where the fit is exact


@dataclass(frozen=True)
class FitError:
    """Relative errors of the anchor layer's output, before (T = I: no repair) and after the fit.

    fit_*: ‖M T − R‖ / ‖R‖, how well the branch reproduces what the gap added;
    state_*: ‖M T − R‖ / ‖Y‖, the same residual relative to the dense hidden state itself.
    """

    fit_rel_error_before: float
    fit_rel_error: float
    state_rel_error_before: float
    state_rel_error: float


def fit_error(eq: NormalEquations, t: torch.Tensor) -> FitError:
    identity = torch.ones(eq.mtm.shape[0], dtype=torch.float64, device=eq.mtm.device)  # diag(1) = I
    before, after = squared_error(eq, identity), squared_error(eq, t)
    rr, yy = max(eq.rr, 1e-300), max(eq.yy, 1e-300)
    return FitError((before / rr) ** 0.5, (after / rr) ** 0.5, (before / yy) ** 0.5, (after / yy) ** 0.5)


def apply_map(m: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """M T for a d×d `t`, M diag(t) for a 1-D one."""
    return m * t if t.dim() == 1 else m @ t


# ------------------------------------------------------------------------------------- cosine objective
def cosine_loss(t: torch.Tensor, samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """mean over tokens of 1 − cos(H + M T, Y), for samples of (M, H, Y) rows.

    The next layer normalises its input, so the direction of the hidden state matters more than its length;
    this is ReplaceMe's cosine variant, taken on the whole hidden state rather than the branch alone.
    """
    total, count = t.new_zeros(()), 0
    for m, h, y in samples:
        out = h + apply_map(m, t)
        total = total + (1 - torch.nn.functional.cosine_similarity(out, y, dim=-1)).sum()
        count += m.shape[0]
    return total / max(count, 1)


def refine_cosine(
    t0: torch.Tensor,
    samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    *,
    steps: int,
    lr: float,
) -> tuple[torch.Tensor, float, float]:
    """A few Adam steps on `cosine_loss` from the least-squares `t0`; returns (best T seen, loss at t0, its loss).

    The best iterate, t0 included, is kept, so the cosine objective never ends worse than where it started.
    """
    samples = [tuple(x.float() for x in s) for s in samples]  # type: ignore[misc]
    t = t0.detach().float().clone().requires_grad_(True)
    opt = torch.optim.Adam([t], lr=lr)
    with torch.no_grad():
        start = float(cosine_loss(t, samples))
    best, best_t = start, t0.detach().double().clone()
    for _ in range(steps):
        opt.zero_grad()
        loss = cosine_loss(t, samples)
        loss.backward()
        opt.step()
        with torch.no_grad():
            now = float(cosine_loss(t, samples))
        if now < best:
            best, best_t = now, t.detach().double().clone()
    return best_t, start, best


# ----------------------------------------------------------------------------------------- magnitudes
@dataclass
class MagnitudeSums:
    """Σ_t ‖X_t‖ and Σ_t ‖Y_t‖ over non-padding tokens, X entering a gap and Y leaving it (dense model)."""

    x_norm_sum: float = 0.0
    y_norm_sum: float = 0.0
    num_tokens: int = 0

    def add(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        x, y = _rows(x, mask), _rows(y, mask)
        self.x_norm_sum += float(x.norm(dim=-1).sum())
        self.y_norm_sum += float(y.norm(dim=-1).sum())
        self.num_tokens += x.shape[0]

    @property
    def ratio(self) -> float:
        """α = mean‖Y‖ / mean‖X‖: how much the removed layers grew the residual stream."""
        return self.y_norm_sum / max(self.x_norm_sum, 1e-300)


# -------------------------------------------------------------------------------------------- folding
def fold_into_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A Linear computes z Wᵀ + b; (z Wᵀ + b) T = z (Tᵀ W)ᵀ + Tᵀ b, so W ← Tᵀ W and b ← Tᵀ b (in float64)."""
    tt = t.double().T if t.dim() == 2 else torch.diag(t.double())
    new_w = (tt @ weight.double()).to(weight.dtype)
    new_b = None if bias is None else (tt @ bias.double()).to(bias.dtype)
    return new_w, new_b


def fold_into_norm(weight: torch.Tensor, t: torch.Tensor, offset: float) -> torch.Tensor:
    """A norm outputs n(x)·(offset + w) (Gemma: offset 1); times t that is n(x)·(offset + w') with
    w' = (offset + w)·t − offset."""
    return ((offset + weight.double()) * t.double() - offset).to(weight.dtype)
