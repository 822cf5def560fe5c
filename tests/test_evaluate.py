"""Perplexity: every token predicted once, with the stated context. Greedy agreement, counted by hand."""

import math

import pytest
import torch
from tiny import tiny_llama

from shortgpt_deploy.evaluate import EvalError, agreement, greedy_continuations, perplexity, prompt_spans
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


def test_greedy_with_the_cache_equals_argmax_over_the_whole_sequence(model):
    prompt = [5, 9, 13, 7]
    (got,) = greedy_continuations(model, [prompt], new_tokens=6)
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(6):  # no cache: the full sequence every step
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert got == ids[len(prompt) :] and len(got) == 6


def test_agreement_counts_positions_and_prefixes():
    ref = [[1, 2, 3, 4], [5, 6, 7, 8]]
    got = [[1, 2, 9, 4], [5, 6, 7, 8]]
    a = agreement("q", "f", got, ref)
    assert a.token_match == pytest.approx(7 / 8)
    assert a.mean_prefix_tokens == pytest.approx((2 + 4) / 2)
    assert a.identical_outputs == 1 and a.prompts == 2 and a.new_tokens == 4
    with pytest.raises(EvalError):
        agreement("q", "f", got[:1], ref)


def test_prompt_spans_are_spread_and_keep_bos():
    ids = [1, *range(100, 200)]
    spans = prompt_spans(ids, n_prompts=3, prompt_len=10, bos=1)
    assert [s[0] for s in spans] == [1, 1, 1]
    assert [s[1] for s in spans] == [100, 130, 160] and all(len(s) == 11 for s in spans)
    with pytest.raises(EvalError, match="at least 10"):
        prompt_spans(list(range(5)), n_prompts=2, prompt_len=10)


def test_repetition_rate_by_hand():
    from shortgpt_deploy.evaluate import repetition_rate

    assert repetition_rate([1, 2, 3, 4, 5, 6]) == 0.0
    assert repetition_rate([7, 7, 7, 7, 7, 7], n=4) == pytest.approx(1 - 1 / 3)  # 3 four-grams, all the same
    assert repetition_rate([1, 2, 3]) == 0.0  # shorter than n: no n-grams


def test_continuation_nll_is_the_mean_nll_of_the_continuation_tokens(model):
    from shortgpt_deploy.evaluate import continuation_nll

    ids = [5, 9, 13, 7, 21, 4, 8]
    nll = reference_nll(model, ids)  # position k predicts token k + 1
    assert continuation_nll(model, ids[:3], ids[3:]) == pytest.approx(float(nll[2:].mean()), rel=1e-5)


# ------------------------------------------------------------------------------- one checkpoint (eval's entry point)
def test_checkpoint_eval_spec_decides_what_runs_and_refuses_what_measures_nothing():
    from shortgpt_deploy.evaluate import CheckpointEvalSpec

    assert CheckpointEvalSpec().runs_perplexity  # nothing asked: perplexity
    assert not CheckpointEvalSpec(tasks=("piqa",)).runs_perplexity  # tasks replace it unless asked for
    assert CheckpointEvalSpec(lm_eval=("piqa",), perplexity=True).runs_perplexity
    assert CheckpointEvalSpec(tasks=("piqa",), limit=3, shots=0).limit == 3
    for given in ({"limit": 5}, {"shots": 1}):
        with pytest.raises(EvalError, match=r"--limit and --shots apply to multiple-choice tasks: add --tasks"):
            CheckpointEvalSpec(**given)
    with pytest.raises(EvalError, match="nothing to evaluate: give --tasks, or drop --no-perplexity"):
        CheckpointEvalSpec(perplexity=False)


def test_evaluate_checkpoint_alone_is_the_perplexity_report(two_layer_llama):
    from shortgpt_deploy.evaluate import CheckpointEvalSpec, evaluate_checkpoint, evaluate_perplexity

    spec = CheckpointEvalSpec(context_len=64, stride=32, max_tokens=200)
    report = evaluate_checkpoint(str(two_layer_llama), spec, progress=False)
    expected = evaluate_perplexity(two_layer_llama, context_len=64, stride=32, max_tokens=200, progress=False)
    assert report == {"model": str(two_layer_llama), **expected.to_dict()}
