"""Perplexity: every token predicted once, with the stated context."""

import math

import pytest
import torch
from tiny import tiny_llama

from shortgpt_deploy.evaluate import EvalError, perplexity
from shortgpt_deploy.modeling import load_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(tiny_llama(tmp_path_factory.mktemp("m") / "llama", num_layers=2))[0]


def reference_nll(model, ids):
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none").double()


def test_one_window_is_plain_exp_mean_nll(model):
    ids = list(range(4, 40))
    result = perplexity(model, ids, context_len=64, stride=64, progress=False)
    nll = reference_nll(model, ids)
    assert result.num_tokens == len(ids) - 1
    assert result.perplexity == pytest.approx(math.exp(float(nll.mean())), rel=1e-5)


def test_strided_windows_predict_each_token_once_with_limited_context(model):
    ids = [4 + (7 * i) % 50 for i in range(40)]
    result = perplexity(model, ids, context_len=16, stride=8, progress=False)
    assert result.num_tokens == len(ids) - 1
    # By hand: window [0,16) scores tokens 1..15; then each window [b, b+16) scores its last 8 tokens.
    total = float(reference_nll(model, ids[:16]).sum())
    for begin in range(8, len(ids) - 1, 8):
        window = ids[begin : begin + 16]
        new = len(window) - 8  # the previous window ended at begin + 8
        total += float(reference_nll(model, window)[-new:].sum())
        if begin + 16 >= len(ids):
            break
    assert result.nll_per_token == pytest.approx(total / (len(ids) - 1), rel=1e-5)
    full = perplexity(model, ids, context_len=64, stride=64, progress=False)
    assert result.perplexity != pytest.approx(full.perplexity, rel=1e-6)  # context really was limited


def test_bad_stride(model):
    with pytest.raises(EvalError, match="stride"):
        perplexity(model, [4, 5, 6], context_len=8, stride=16)
