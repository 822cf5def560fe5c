"""Scoring on a real forward pass: hooks see each layer's true input and output, padding is masked, and the
iterative and angular variants do what they say."""

from pathlib import Path

import pytest
import torch
from tiny import tiny_llama

from shortgpt_deploy.calibration import Batch, CalibrationSet
from shortgpt_deploy.importance import block_influence, collect_stats, score_iteratively, score_layers
from shortgpt_deploy.modeling import load_model
from shortgpt_deploy.plan import make_plan


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    m, _ = load_model(tiny_llama(tmp_path_factory.mktemp("m") / "llama", num_layers=6, seed=3))
    with torch.no_grad():  # a trained final norm has non-uniform weights: it changes directions, so BI too
        m.model.norm.weight.uniform_(0.2, 2.0, generator=torch.Generator().manual_seed(0))
    return m


def calib(ids, mask=None):
    ids = torch.as_tensor(ids)
    mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask)
    return CalibrationSet([Batch(ids, mask)], "test", ids.shape[0], ids.shape[1], 0, False)


def test_hooks_match_hidden_states_for_inner_layers_but_not_the_last(model):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 60, (2, 24), generator=g)
    scores = score_layers(model, calib(ids), metric="bi", progress=False).scores
    with torch.inference_mode():
        hs = model(ids, output_hidden_states=True).hidden_states  # hs[i] = input of layer i, hs[-1] after norm
    for i in range(5):
        assert scores[i] == pytest.approx(block_influence(hs[i], hs[i + 1]), abs=1e-6)
    # The last entry of hidden_states comes after the final norm: it is not the last layer's output.
    assert scores[5] != pytest.approx(block_influence(hs[5], hs[6]), abs=1e-4)


def test_padding_changes_nothing(model):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(4, 60, (1, 20), generator=g), torch.randint(4, 60, (1, 12), generator=g)
    padded = torch.full((2, 20), 3)
    padded[0], padded[1, :12] = a[0], b[0]
    mask = torch.zeros(2, 20, dtype=torch.long)
    mask[0], mask[1, :12] = 1, 1
    together = collect_stats(model, calib(padded, mask), progress=False)
    one, two = collect_stats(model, calib(a), progress=False), collect_stats(model, calib(b), progress=False)
    assert together.num_tokens == 32
    for i in range(6):
        assert together.cos_sum[i] == pytest.approx(one.cos_sum[i] + two.cos_sum[i], rel=1e-5)


def test_iterative_rescoring_after_each_removal(model):
    ids = torch.randint(4, 60, (2, 16), generator=torch.Generator().manual_seed(2))
    c = calib(ids)
    result = score_iteratively(model, c, metric="bi", n_remove=2, protected=frozenset({0, 5}), progress=False)
    first = score_layers(model, c, metric="bi", progress=False)
    expected_first = min(range(1, 5), key=lambda i: first.scores[i])
    assert result.iterative[0]["removed"] == expected_first
    again = collect_stats(model, c, skip=frozenset({expected_first}), progress=False)
    rescored = [1 - s / again.num_tokens for s in again.cos_sum]
    expected_second = min((i for i in range(1, 5) if i != expected_first), key=lambda i: rescored[i])
    assert result.iterative[1]["removed"] == expected_second
    assert result.removal_order[:2] == [expected_first, expected_second]
    plan = make_plan(num_layers=6, scores=result, n_remove=2, protect=[0, 5])
    assert set(plan.remove) == {expected_first, expected_second}


def test_angular_block_distances(model):
    ids = torch.randint(4, 60, (2, 16), generator=torch.Generator().manual_seed(4))
    scores = score_layers(model, calib(ids), metric="angular", progress=False)
    d = scores.angular_distance
    assert len(d) == 7 and all(d[i][i] == 0 for i in range(7))
    with torch.inference_mode():
        hs = list(model(ids, output_hidden_states=True).hidden_states)
    cos = torch.nn.functional.cosine_similarity(hs[1].float(), hs[4].float(), dim=-1).clamp(-1, 1)
    assert d[1][4] == pytest.approx(float((torch.arccos(cos) / torch.pi).mean()), abs=1e-5)
    plan = make_plan(num_layers=6, scores=scores, n_remove=3)
    start = plan.remove[0]
    assert plan.remove == tuple(range(start, start + 3))
    assert d[start][start + 3] == min(d[s][s + 3] for s in range(1, 3))


class _Tokenizer:
    """Just enough of a tokenizer for decide_add_bos: adds BOS (id 1) or not."""

    def __init__(self, adds_bos: bool) -> None:
        self.bos_token_id = 1
        self.adds_bos = adds_bos

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": ([1] if self.adds_bos and add_special_tokens else []) + [7]}


def test_one_bos_rule_for_every_stage() -> None:
    """The recipe's add_bos wins, then the source checkpoint's preference, then the tokenizer; the later stages
    of a build get the same answer scoring got (they pass source_add_bos on, and decide_add_bos settles None)."""
    from shortgpt_deploy.modeling import Checkpoint, decide_add_bos, source_add_bos
    from shortgpt_deploy.recipe import ModelSpec

    gguf = Checkpoint(path=Path("/nonexistent"), source="x.gguf", kind="gguf", add_bos=True)
    folder = Checkpoint(path=Path("/nonexistent"), source="dir", kind="folder", add_bos=None)
    plain = ModelSpec(path="x.gguf")
    assert source_add_bos(plain, gguf) is True
    assert source_add_bos(ModelSpec(path="x.gguf", add_bos=False), gguf) is False
    assert source_add_bos(plain, folder) is None
    no_bos = _Tokenizer(adds_bos=False)
    assert decide_add_bos(no_bos, requested=None, source=True) is True  # the GGUF's choice, not the tokenizer's
    assert decide_add_bos(no_bos, requested=source_add_bos(plain, gguf)) is True  # what a later stage computes
    assert decide_add_bos(no_bos, requested=None) is False
    assert decide_add_bos(_Tokenizer(adds_bos=True), requested=None) is True
    assert decide_add_bos(_Tokenizer(adds_bos=True), requested=False, source=True) is False
