"""The training-free repairs: the math pinned on hand-made inputs, folding exact, a gap that is exactly linear
recovered to the dense logits, and embeddings (tied or not) never touched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import calibration, load, logits, pruned_pair
from safetensors import safe_open
from tiny import tiny_tokenizer

import shortgpt_deploy.modeling as modeling
from shortgpt_deploy import repair_fit as fit
from shortgpt_deploy.calibration import CalibrationSet
from shortgpt_deploy.errors import OutputExistsError
from shortgpt_deploy.plan import LayerPlan, make_plan
from shortgpt_deploy.repair import (
    REPAIR_FILE,
    RepairError,
    RepairOptions,
    RepairResult,
    repair_checkpoint,
    write_repaired,
)
from shortgpt_deploy.repair_methods import find_gaps, fold, mlp_branch
from shortgpt_deploy.surgery import PLAN_FILE, prune_checkpoint, read_layer_tensors

TOL = 1e-5


# ------------------------------------------------------------------------------------------- helpers
def tensor(folder: Path, name: str) -> torch.Tensor:
    headers, _ = read_layer_tensors(folder, modeling_layers(folder))
    for shard, header in headers.items():
        if name in header:
            with safe_open(str(shard), framework="pt") as f:
                return f.get_tensor(name)
    raise KeyError(name)


def modeling_layers(folder: Path) -> int:
    from shortgpt_deploy.surgery import read_config_layers

    return read_config_layers(folder)


# ---------------------------------------------------------------------------------------- pure math
def test_least_squares_recovers_a_known_map_and_reports_the_error():
    g = torch.Generator().manual_seed(0)
    m, h = torch.randn(300, 6, generator=g), torch.randn(300, 6, generator=g)
    t_true = torch.eye(6) + 0.3 * torch.randn(6, 6, generator=g)
    y = h + m @ t_true
    eq = fit.NormalEquations.zeros(6)
    eq.add(m[:100], h[:100], y[:100])  # two batches sum to what one would
    eq.add(m[100:], h[100:], y[100:])
    t = fit.solve_full(eq, ridge=0.0)
    assert torch.allclose(t, t_true.double(), atol=1e-5)
    err = fit.fit_error(eq, t)
    assert err.fit_rel_error < 1e-5 and err.state_rel_error < 1e-5
    r = (y - h).double()
    before = float((m.double() - r).norm() / r.norm())  # T = I: the layer as it was
    assert err.fit_rel_error_before == pytest.approx(before, rel=1e-6)
    assert err.state_rel_error_before == pytest.approx(float((m.double() - r).norm() / y.double().norm()), rel=1e-6)


def test_squared_error_from_sums_matches_the_direct_residual():
    g = torch.Generator().manual_seed(1)
    m, h, y = (torch.randn(50, 4, generator=g) for _ in range(3))
    eq = fit.NormalEquations.zeros(4)
    eq.add(m, h, y)
    r = y.double() - h.double()
    for t in (torch.randn(4, 4, generator=g).double(), torch.randn(4, generator=g).double()):
        direct = float((fit.apply_map(m.double(), t) - r).pow(2).sum())
        assert fit.squared_error(eq, t) == pytest.approx(direct, rel=1e-9)


def test_padding_is_left_out_of_the_sums():
    g = torch.Generator().manual_seed(2)
    m, h, y = (torch.randn(2, 5, 3, generator=g) for _ in range(3))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    garbage = [x.clone() for x in (m, h, y)]
    for x in garbage:
        x[1, 3:] = 1e6
    a, b = fit.NormalEquations.zeros(3), fit.NormalEquations.zeros(3)
    a.add(m, h, y, mask)
    b.add(*garbage, mask)
    assert a.num_tokens == 8 and torch.equal(a.mtm, b.mtm) and torch.equal(a.mtr, b.mtr) and a.rr == b.rr


def test_ridge_pulls_unseen_directions_to_the_identity():
    m = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])  # the second direction never occurs
    y = torch.tensor([[2.0, 5.0], [4.0, 5.0], [6.0, 5.0]])
    eq = fit.NormalEquations.zeros(2)
    eq.add(m, torch.zeros_like(m), y)
    t = fit.solve_full(eq, ridge=1e-9)
    assert torch.allclose(t[1], torch.tensor([0.0, 1.0], dtype=torch.float64))  # row of the unseen direction: e_1
    assert float(t[0, 0]) == pytest.approx(2.0, rel=1e-6)


def test_diagonal_solution_by_hand():
    m = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    r = torch.tensor([[2.0, 2.0], [6.0, 2.0]])
    eq = fit.NormalEquations.zeros(2)
    eq.add(m, torch.zeros_like(m), r)
    # t_0 = (1·2 + 3·6) / (1 + 9) = 2, t_1 = (2·2 + 4·2) / (4 + 16) = 0.6
    assert fit.solve_diagonal(eq, ridge=0.0).tolist() == pytest.approx([2.0, 0.6])


def test_magnitude_ratio_by_hand():
    s = fit.MagnitudeSums()
    x = torch.tensor([[[3.0, 4.0], [1.0, 0.0], [100.0, 0.0]]])  # norms 5, 1, (padding)
    y = torch.tensor([[[6.0, 8.0], [0.0, 2.0], [0.0, 0.0]]])  # norms 10, 2
    s.add(x, y, torch.tensor([[1, 1, 0]]))
    assert s.num_tokens == 2 and s.ratio == pytest.approx(12 / 6)


def test_folding_into_a_linear_and_a_norm_by_hand():
    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(5, 3)
    z, t = torch.randn(7, 5, generator=g), torch.randn(3, 3, generator=g)
    w, b = fit.fold_into_linear(lin.weight.detach(), lin.bias.detach(), t)
    assert torch.allclose(z @ w.T + b, lin(z).detach() @ t, atol=1e-5)
    d = torch.tensor([2.0, 0.5, -1.0])
    w, b = fit.fold_into_linear(lin.weight.detach(), lin.bias.detach(), d)
    assert torch.allclose(z @ w.T + b, lin(z).detach() * d, atol=1e-5)
    gemma_w = torch.tensor([0.5, -0.2, 0.0])  # Gemma multiplies by (1 + w)
    assert (1 + fit.fold_into_norm(gemma_w, d, 1.0)).tolist() == pytest.approx(((1 + gemma_w) * d).tolist())
    assert fit.fold_into_norm(gemma_w, d, 0.0).tolist() == pytest.approx((gemma_w * d).tolist())


def test_cosine_refinement_never_ends_worse_and_improves_a_poor_start():
    g = torch.Generator().manual_seed(4)
    m, h = torch.randn(64, 4, generator=g), torch.randn(64, 4, generator=g)
    y = 3.0 * (h + m @ (torch.eye(4) + 0.5 * torch.randn(4, 4, generator=g)))  # a direction LS from I misses
    t, start, end = fit.refine_cosine(torch.eye(4, dtype=torch.float64), [(m, h, y)], steps=100, lr=0.02)
    assert end < 0.5 * start
    assert float(fit.cosine_loss(t, [(m.double(), h.double(), y.double())])) == pytest.approx(end, abs=1e-6)
    _, start0, end0 = fit.refine_cosine(t, [(m, h, y)], steps=3, lr=10.0)  # a wild step is not kept
    assert end0 <= start0


def test_gaps_and_their_anchors():
    plan = LayerPlan(7, (5, 0, 3, 1), (2, 4, 6), "explicit", (), {})
    gaps = find_gaps(plan)
    assert [(g.removed, g.anchor, g.anchor_new, g.side, g.target) for g in gaps] == [
        ((0, 1), 2, 0, "after", 2),  # nothing kept before layer 0: the first kept layer after it
        ((3,), 2, 0, "before", 3),
        ((5,), 4, 1, "before", 5),
    ]


# ------------------------------------------------------------------------------------ on tiny models
class LinearLayer(torch.nn.Module):
    """A decoder layer computing x + x S: what the pruned model must reproduce from the layer before it."""

    def __init__(self, s: torch.Tensor):
        super().__init__()
        self.s = s

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states + hidden_states @ self.s


def test_linear_recovers_an_exactly_linear_gap(tiny_checkpoint, tmp_path, monkeypatch):
    """Layer 1 writes its attention into the first half of the hidden coordinates (U) and its MLP into the
    second (V); removed layer 2 is x + x S with S acting on V only. Then the dense state after the gap is
    H + M (I + S) exactly, which the linear repair must find and fold, to the dense logits."""
    d, half = 32, 16
    model = load(tiny_checkpoint("llama", tmp_path / "src", num_hidden_layers=4))
    with torch.no_grad():
        model.model.embed_tokens.weight[:, half:] = 0
        for layer in model.model.layers[:2]:  # attention writes into U only
            layer.self_attn.o_proj.weight[half:] = 0
        model.model.layers[0].mlp.down_proj.weight[half:] = 0
        model.model.layers[1].mlp.down_proj.weight[:half] = 0  # the anchor's MLP writes into V only
    model.save_pretrained(tmp_path / "dense")
    tiny_tokenizer().save_pretrained(tmp_path / "dense")
    plan = make_plan(num_layers=4, layers=[2], protect=[])
    prune_checkpoint(tmp_path / "dense", plan, out_dir=tmp_path / "pruned", progress=False)
    s = torch.zeros(d, d)
    s[half:, half:] = 0.5 * torch.randn(half, half, generator=torch.Generator().manual_seed(5))
    model.model.layers[2] = LinearLayer(s)  # the dense model: layer 2 is exactly linear
    cal = calibration()
    want = logits(model, cal)

    real_load = modeling.load_model
    monkeypatch.setattr(
        modeling, "load_model", lambda f, **kw: (model, None) if Path(f) == tmp_path / "dense" else real_load(f, **kw)
    )
    result = repair_checkpoint(
        tmp_path / "dense",
        tmp_path / "pruned",
        out_dir=tmp_path / "repaired",
        calibration=cal,
        options=RepairOptions(ridge=1e-10),
        progress=False,
    )
    before = (logits(load(tmp_path / "pruned"), cal) - want).abs().max()
    after = (logits(load(tmp_path / "repaired"), cal) - want).abs().max()
    assert before > 1e-2  # the gap matters: without the repair the logits are far off
    assert after < TOL, f"max |logits − dense| = {after:.3g}"
    (gap,) = result.gaps
    assert gap.kind == "full" and gap.folded_into == ["model.layers.1.mlp.down_proj.weight"]
    assert gap.fit_rel_error < 1e-5 < gap.fit_rel_error_before
    assert result.tokens == cal.num_tokens
    assert RepairResult.load(tmp_path / "repaired" / REPAIR_FILE).to_dict() == result.to_dict()


@pytest.mark.parametrize(
    ("family", "overrides"),
    [("llama", {"mlp_bias": True})] + [(f, {}) for f in ("mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")],
)
def test_folding_is_exact(tiny_checkpoint, tmp_path, family, overrides):
    """A map T applied to the MLP branch by a hook, and T folded and saved, give the same logits (bias included;
    Gemma3: a diagonal T through post_feedforward_layernorm's (1 + w))."""
    _, pruned = pruned_pair(tiny_checkpoint, tmp_path, family, [1, 3], **overrides)
    cal = calibration(n_batches=1)
    model = load(pruned)
    g = torch.Generator().manual_seed(6)
    maps = {}
    handles = []
    for j, layer in enumerate(model.model.layers):
        branch, diagonal = mlp_branch(layer)
        t = (
            1 + 0.3 * torch.randn(32, generator=g)
            if diagonal
            else torch.eye(32) + 0.2 * torch.randn(32, 32, generator=g)
        )
        maps[j] = t
        handles.append(branch.register_forward_hook(lambda mod, args, out, t=t: fit.apply_map(out, t)))
    want = logits(model, cal)
    for h in handles:
        h.remove()
    assert (logits(model, cal) - want).abs().max() > 1e-2  # the maps change the model
    changed = {}
    for j, layer in enumerate(model.model.layers):
        where = "post_feedforward_layernorm" if maps[j].dim() == 1 else "mlp.down_proj"
        changed.update(fold(layer.get_submodule(where), maps[j], where, f"model.layers.{j}."))
    assert any(k.endswith("bias") for k in changed) == (family == "llama")
    headers, _ = read_layer_tensors(pruned, 4)
    out = tmp_path / "folded"
    out.mkdir()
    write_repaired(pruned, out, headers, changed)
    assert (logits(load(out), cal) - want).abs().max() < TOL


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "gemma3_text", "phi3"])
def test_scale_is_a_stream_rescale_and_never_touches_tied_embeddings(tiny_checkpoint, tmp_path, family):
    """Exact up to the norms' eps (rms² + eps is not scale-free): the tiny model's hidden states are so small
    (‖h‖²/d ~ 1e-3) that the default 1e-6 would show at 1e-4, so the test sets it far below them."""
    dense, pruned = pruned_pair(tiny_checkpoint, tmp_path, family, [0, 3], tie_word_embeddings=True, rms_norm_eps=1e-12)
    cal = calibration()
    result = repair_checkpoint(
        dense, pruned, out_dir=tmp_path / "scaled", calibration=cal, method="scale", progress=False
    )
    embed = "model.embed_tokens.weight"
    assert torch.equal(tensor(tmp_path / "scaled", embed), tensor(pruned, embed))
    assert all(embed not in g.folded_into and "lm_head.weight" not in g.folded_into for g in result.gaps)
    alphas = [g.alpha for g in result.gaps]
    assert all(abs(a - 1) > 1e-3 for a in alphas)
    # The same model: the pruned one with its stream multiplied by α at each gap (new layers 0 and 2: keep 1,2,4,5).
    model = load(pruned)
    hooks = [
        model.model.layers[j].register_forward_pre_hook(
            lambda mod, args, kwargs, a=a: (
                ((args[0] * a, *args[1:]), kwargs)
                if args
                else (args, {**kwargs, "hidden_states": kwargs["hidden_states"] * a})
            ),
            with_kwargs=True,
        )
        for j, a in zip((0, 2), alphas, strict=True)
    ]
    want = logits(model, cal)
    for h in hooks:
        h.remove()
    assert (logits(model, cal) - want).abs().max() > 1e-3
    assert (logits(load(tmp_path / "scaled"), cal) - want).abs().max() < TOL


def test_linear_on_a_random_model_lowers_every_fit_error_and_keeps_tied_embeddings(tiny_checkpoint, tmp_path):
    dense, pruned = pruned_pair(tiny_checkpoint, tmp_path, "llama", [0, 2, 3], tie_word_embeddings=True)
    cal = calibration(n_batches=8)
    result = repair_checkpoint(
        dense,
        pruned,
        out_dir=tmp_path / "lin",
        calibration=cal,
        options=RepairOptions(objective="cosine"),
        progress=False,
    )
    assert [(g.removed, g.side, g.anchor_new) for g in result.gaps] == [([0], "after", 0), ([2, 3], "before", 0)]
    assert any("starts at layer 0" in n for n in result.notes)
    for g in result.gaps:
        assert g.fit_rel_error < g.fit_rel_error_before
        assert g.cosine_loss <= g.cosine_loss_lstsq
    embed = "model.embed_tokens.weight"
    assert torch.equal(tensor(tmp_path / "lin", embed), tensor(pruned, embed))
    a, b = read_layer_tensors(pruned, 3)[0], read_layer_tensors(tmp_path / "lin", 3)[0]
    shapes = lambda hs: {n: v["shape"] for h in hs.values() for n, v in h.items()}  # noqa: E731
    assert shapes(a) == shapes(b)  # a stock checkpoint: the pruned one's names and shapes
    assert "## Repair: linear" in (tmp_path / "lin" / "README.md").read_text()


def test_refusals_leave_nothing_behind(tiny_checkpoint, tmp_path):
    dense, pruned = pruned_pair(tiny_checkpoint, tmp_path, "llama", [2])
    cal = calibration(n_batches=1)
    with pytest.raises(RepairError, match="unknown repair method 'distil'"):
        repair_checkpoint(dense, pruned, out_dir=tmp_path / "x", calibration=cal, method="distil")
    with pytest.raises(RepairError, match="no batches"):
        repair_checkpoint(
            dense, pruned, out_dir=tmp_path / "x", calibration=CalibrationSet([], "empty", 0, 8, 0, False)
        )
    with pytest.raises(RepairError, match="objective"):
        RepairOptions(objective="l1")
    wrong = make_plan(num_layers=6, layers=[1, 2], protect=[])
    with pytest.raises(RepairError, match="give the dense model and plan"):
        repair_checkpoint(dense, pruned, out_dir=tmp_path / "x", calibration=cal, plan=wrong)
    with pytest.raises(RepairError, match="is its input"):
        repair_checkpoint(dense, pruned, out_dir=pruned, calibration=cal)
    (tmp_path / "x").mkdir()
    with pytest.raises(OutputExistsError, match="--force"):
        repair_checkpoint(dense, pruned, out_dir=tmp_path / "x", calibration=cal)
    shutil.copytree(pruned, tmp_path / "noplan")
    (tmp_path / "noplan" / PLAN_FILE).unlink()
    with pytest.raises(RepairError, match="has no shortgpt_plan.json"):
        repair_checkpoint(dense, tmp_path / "noplan", out_dir=tmp_path / "y", calibration=cal)
    config = json.loads((pruned / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "noplan" / "config.json").write_text(json.dumps(config))
    with pytest.raises(RepairError, match="GPTQ-quantized: .* quantize the repaired one"):
        repair_checkpoint(dense, tmp_path / "noplan", out_dir=tmp_path / "y", calibration=cal)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "noplan", "pruned", "x"]


def test_scale_of_a_gap_at_the_end_changes_nothing(tiny_checkpoint, tmp_path):
    """After the last layer only the final norm follows, which undoes any scale: nothing to fold."""
    dense, pruned = pruned_pair(tiny_checkpoint, tmp_path, "llama", [5])
    result = repair_checkpoint(
        dense, pruned, out_dir=tmp_path / "s", calibration=calibration(1), method="scale", progress=False
    )
    assert result.gaps[0].folded_into == [] and "ends the model" in result.notes[0]
    assert (tmp_path / "s" / "model.safetensors").read_bytes() == (pruned / "model.safetensors").read_bytes()
