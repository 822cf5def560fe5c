"""The `distill` repair: its loss pinned by hand, and on tiny models a held-out loss that drops, only the chosen
tensors changing, LoRA merged away, the budgets and the seed obeyed, and a saved checkpoint equal to the model
trained in memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import calibration, load, logits, pruned_pair

from shortgpt_deploy.calibration import Batch
from shortgpt_deploy.plan import make_plan
from shortgpt_deploy.repair import REPAIR_FILE, RepairError, RepairOptions, RepairResult, repair_checkpoint
from shortgpt_deploy.repair_distill import (
    DistillOptions,
    LowRankAdapter,
    Taps,
    batch_loss,
    distill_kl,
    relative_mse,
    split_batches,
)
from shortgpt_deploy.repair_methods import METHODS, repair_distill

REMOVE = [2, 3]  # one gap; its anchor is pruned layer 1, so `layers` trains pruned layers 1 and 2
PREFIX = "model.layers."


def distill(dense: Path, pruned: Path, cal: Any, **kw: Any) -> tuple[Any, Any, dict[str, torch.Tensor]]:
    """Run the method in memory on freshly loaded models: (record, student, changed)."""
    student = load(pruned)
    plan = make_plan(num_layers=6, layers=REMOVE, protect=[])
    options = RepairOptions(distill=DistillOptions(**{"max_time_s": None, **kw}))
    (record,), changed = repair_distill(load(dense), student, plan, cal, prefix=PREFIX, options=options, progress=False)
    return record, student, changed


@pytest.fixture
def pair(tiny_checkpoint, tmp_path: Path) -> tuple[Path, Path]:
    return pruned_pair(tiny_checkpoint, tmp_path, "llama", REMOVE)


# ---------------------------------------------------------------------------------------- pure math
def test_kl_and_relative_mse_by_hand():
    z = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 5.0]])
    assert float(distill_kl(z, z)) == pytest.approx(0.0, abs=1e-7)
    teacher, student = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, torch.log(torch.tensor(3.0))]])
    # p = (1/2, 1/2), q = (1/4, 3/4): KL = ½ log 2 + ½ log(2/3)
    assert float(distill_kl(teacher, student)) == pytest.approx(
        0.5 * (2 * torch.log(torch.tensor(2.0)) - torch.log(torch.tensor(3.0))).item()
    )
    # T = 2 divides the logits by 2 and multiplies the KL by 4
    assert float(distill_kl(2 * teacher, 2 * student, 2.0)) == pytest.approx(4 * float(distill_kl(teacher, student)))
    t = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert float(relative_mse(torch.zeros_like(t), t)) == pytest.approx(1.0)
    assert float(relative_mse(t + torch.tensor([[0.0, 5.0], [0.0, 0.0]]), t)) == pytest.approx(1.0)  # 25 / 25


def test_held_out_batches_and_refusals():
    cal = calibration(n_batches=8)
    train, held = split_batches(cal.batches, 0.125)
    assert (len(train), len(held)) == (7, 1) and held[0] is cal.batches[-1]
    assert [len(x) for x in split_batches(cal.batches[:2], 0.01)] == [1, 1]  # at least one each way
    with pytest.raises(RepairError, match="at least 2 calibration batches"):
        split_batches(cal.batches[:1], 0.125)
    with pytest.raises(RepairError, match="unknown distill trainable 'all'"):
        DistillOptions(trainable="all")
    with pytest.raises(RepairError, match="lr, max_time_s out of range"):
        DistillOptions(lr=0, max_time_s=-1)
    with pytest.raises(RepairError, match="max_tokens, max_time_s out of range"):
        DistillOptions(max_tokens=0, max_time_s=0)  # None is no budget; 0 is a mistake


# ------------------------------------------------------------------------------------ on tiny models
def test_padded_tokens_change_nothing(pair):
    """Right padding: the real tokens' logits and states do not depend on the padded ids, so only a loss that
    counted padded positions would change with them."""
    dense_model, student = load(pair[0]), load(pair[1])
    taps = Taps([student.model.layers[1]], [dense_model.model.layers[3]])  # the gap's anchor ↔ dense after it
    opts = DistillOptions(hidden_weight=1.0)
    padded = calibration(n_batches=2).batches[1]
    garbage = padded.input_ids.clone()
    garbage[padded.attention_mask == 0] = 7
    with torch.no_grad():
        want, n = batch_loss(dense_model, student, padded, taps, opts)
        got, m = batch_loss(dense_model, student, Batch(garbage, padded.attention_mask), taps, opts)
    assert n == m == 56 and float(want) > 0 and float(got) == pytest.approx(float(want), rel=1e-6)


@pytest.mark.parametrize(("trainable", "hidden_weight"), [("layers", 0.0), ("lora", 0.0), ("layers", 1.0)])
def test_distill_lowers_the_held_out_loss_and_changes_only_its_subset(pair, trainable, hidden_weight):
    dense, pruned = pair
    cal = calibration(n_batches=8)
    before = load(pruned).state_dict()
    record, student, changed = distill(
        dense, pruned, cal, trainable=trainable, hidden_weight=hidden_weight, lr=3e-3, max_steps=16, eval_every=4
    )
    assert record.kind == "distill" and record.removed == REMOVE and record.stopped_because == "max_steps"
    assert record.steps == 16 and record.num_tokens == 16 * 56  # 4 rows × 16 tokens, one row half padding
    assert record.heldout_loss_best < 0.8 * record.heldout_loss_before
    after = student.state_dict()
    assert after.keys() == before.keys()  # no adapter left behind
    assert not any(isinstance(m, LowRankAdapter) for m in student.modules())
    differ = {n for n in before if not torch.equal(before[n], after[n])}
    assert differ == set(changed) == set(record.folded_into)
    if trainable == "layers":  # every tensor of pruned layers 1 and 2, nothing else
        assert differ == {n for n in before if n.startswith((f"{PREFIX}1.", f"{PREFIX}2."))}
    else:  # every Linear weight of every decoder layer: no norm, bias, embedding or LM head
        linears = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        assert differ == {f"{PREFIX}{i}.{m}.{p}.weight" for i in range(4) for m, p in _linear_paths(linears)}
    for n in differ:
        assert after[n].shape == before[n].shape
    assert all(changed[n] is student.get_parameter(n) for n in changed)  # what repair.py will write


def _linear_paths(names: tuple[str, ...]) -> list[tuple[str, str]]:
    return [("self_attn" if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp", n) for n in names]


class VirtualClock:
    """repair_distill's clock, advanced by 0.1 s at every reading (and by hand): the time budget is exercised
    without depending on how busy the machine is."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 0.1
        return self.now


def test_time_budget_stops_it(pair, monkeypatch):
    import shortgpt_deploy.repair_distill as rd

    monkeypatch.setattr(rd, "time", VirtualClock())
    dense, pruned = pair
    record, _, _ = distill(dense, pruned, calibration(n_batches=4), max_steps=1000, max_time_s=2.0, eval_every=1000)
    assert record.stopped_because == "max_time_s"
    # Over the budget only by the clock readings after the last check (0.1 s each, two at most): no late step.
    assert 0 < record.steps < 1000 and record.time_s <= 2.0 + 0.25


def test_time_budget_leaves_room_for_the_last_evaluation(pair, monkeypatch):
    """The held-out evaluation after the last step counts too: a slow one must not push the run past the budget."""
    import shortgpt_deploy.repair_distill as rd

    clock, real = VirtualClock(), rd._heldout_loss
    monkeypatch.setattr(rd, "time", clock)

    def slow(*args: Any) -> float:
        clock.now += 1.0  # an evaluation that takes a virtual second
        return real(*args)

    monkeypatch.setattr(rd, "_heldout_loss", slow)
    dense, pruned = pair
    record, _, _ = distill(dense, pruned, calibration(n_batches=4), max_steps=1000, max_time_s=3.0, eval_every=1000)
    assert record.stopped_because == "max_time_s" and record.steps > 0
    assert record.time_s <= 3.0 + 0.25  # the evaluation's second was reserved, not spent past the budget


def test_token_budget_and_early_stop(pair):
    dense, pruned = pair
    record, _, _ = distill(dense, pruned, calibration(n_batches=4), max_tokens=100, max_steps=50)
    assert record.stopped_because == "max_tokens" and record.steps == 2 and record.num_tokens == 112
    # A rate that throws the weights far: held-out loss rises, training stops, and the untrained state is kept.
    record, student, changed = distill(
        dense, pruned, calibration(n_batches=4), lr=1.0, max_steps=50, eval_every=1, patience=2
    )
    assert record.stopped_because == "early_stop" and record.steps == 2 and record.best_step == 0
    assert record.heldout_loss_after > record.heldout_loss_best == record.heldout_loss_before
    assert changed == {} and all(
        torch.equal(a, b)
        for a, b in zip(student.state_dict().values(), load(pruned).state_dict().values(), strict=True)
    )


@pytest.mark.parametrize("trainable", ["layers", "lora"])
def test_deterministic_for_a_seed(pair, trainable):
    dense, pruned = pair
    cal = calibration(n_batches=4)
    runs = [
        distill(dense, pruned, cal, trainable=trainable, lr=3e-3, max_steps=6, eval_every=3, seed=s) for s in (1, 1, 2)
    ]
    (a, sa, ca), (b, sb, cb), (c, _, cc) = runs
    assert sorted(ca) == sorted(cb) and all(torch.equal(ca[n], cb[n]) for n in ca)
    assert (a.heldout_loss_best, a.heldout_loss_after) == (b.heldout_loss_best, b.heldout_loss_after)
    assert not all(torch.equal(ca[n], cc[n]) for n in ca)  # the seed matters (batch order, adapters' start)


def test_saved_checkpoint_reloads_with_the_trained_logits(pair, tmp_path, monkeypatch):
    dense, pruned = pair
    cal = calibration(n_batches=8)
    trained: list[Any] = []

    def keep_student(dense_model: Any, student: Any, *args: Any, **kwargs: Any) -> Any:
        trained.append(student)
        return repair_distill(dense_model, student, *args, **kwargs)

    monkeypatch.setitem(METHODS, "distill", keep_student)
    options = RepairOptions(distill=DistillOptions(trainable="lora", lr=3e-3, max_steps=8, eval_every=4))
    result = repair_checkpoint(
        dense,
        pruned,
        out_dir=tmp_path / "distilled",
        calibration=cal,
        method="distill",
        options=options,
        progress=False,
    )
    saved = load(tmp_path / "distilled")
    assert (logits(load(pruned), cal) - logits(trained[0], cal)).abs().max() > 1e-3  # training changed the model
    assert (logits(saved, cal) - logits(trained[0], cal)).abs().max() < 1e-5
    assert saved.state_dict().keys() == load(pruned).state_dict().keys()
    (record,) = result.gaps
    assert record.steps == 8 and record.heldout_loss_best < record.heldout_loss_before
    loaded = RepairResult.load(tmp_path / "distilled" / REPAIR_FILE)
    assert loaded.to_dict() == result.to_dict() and loaded.options["distill"]["trainable"] == "lora"
    card = (tmp_path / "distilled" / "README.md").read_text()
    assert "## Repair: distill" in card and "| 8 |" in card  # the model card's distill table: 8 steps
