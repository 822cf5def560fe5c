"""The gen variant in eval and the report: perplexity as generation sees it (prompt skipping, then one decoding
step per scored token), multiple-choice scoring by the same rule, and the report's ShortGPT-gen section."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from helpers import dense_folder, gen_folder
from transformers import DynamicCache

from shortgpt_deploy.bench import summarize
from shortgpt_deploy.evaluate import evaluate_variants, prompted_perplexity
from shortgpt_deploy.gen import continuation_logprobs
from shortgpt_deploy.modeling import load_model
from shortgpt_deploy.multiple_choice import continuation_loglikelihoods
from shortgpt_deploy.recipe import EvalSpec
from shortgpt_deploy.records import BenchSummary

IDS = torch.randint(4, 100, (120,), generator=torch.Generator().manual_seed(3)).tolist()


def stepwise_logprobs(model, prompt: list[int], cont: list[int]) -> list[float]:
    """Generation's protocol spelled out: the prompt in one forward, then one forward per continuation token."""
    with torch.inference_mode():
        out = model(torch.tensor([prompt]), past_key_values=DynamicCache(config=model.config), use_cache=True)
        logits = [out.logits[0, -1]]
        for token in cont[:-1]:
            out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits[0, -1])
    return [float(torch.log_softmax(x.float(), -1)[t]) for x, t in zip(logits, cont, strict=True)]


def slow_prompted_nll(model, ids: list[int], prompt_len: int, scored_len: int) -> float:
    span, total, n = prompt_len + scored_len, 0.0, 0
    for begin in range(0, len(ids) - span + 1, span):
        total -= sum(stepwise_logprobs(model, ids[begin : begin + prompt_len], ids[begin + prompt_len : begin + span]))
        n += scored_len
    return total / n


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_continuation_in_one_forward_equals_one_decoding_step_per_token(tmp_path: Path, family: str) -> None:
    """continuation_logprobs scores the continuation in one forward inside gen.decoding(); with the cache that is
    exactly what a decoding step per token computes (Gemma 3: also past its sliding window)."""
    dense_folder(family, tmp_path / "dense")
    gen, _ = load_model(gen_folder(tmp_path / "dense", tmp_path / "gen", [1, 2]))
    prompt, cont = IDS[:10], IDS[10:22]
    fast = continuation_logprobs(gen, torch.tensor(prompt), torch.tensor(cont)).tolist()
    assert max(abs(a - b) for a, b in zip(fast, stepwise_logprobs(gen, prompt, cont), strict=True)) < 1e-5


def test_prompted_perplexity_is_the_decoding_protocol_for_every_model(tmp_path: Path) -> None:
    dense, _ = load_model(dense_folder("llama", tmp_path / "dense"))
    gen, _ = load_model(gen_folder(tmp_path / "dense", tmp_path / "gen", [1, 2]))
    for model in (dense, gen):  # one forward per span for dense computes what the decoding steps compute
        got = prompted_perplexity(model, IDS, prompt_len=20, scored_len=8, progress=False)
        assert got.spans == 4 and got.tokens == 32
        assert abs(got.mean_nll - slow_prompted_nll(model, IDS, 20, 8)) < 1e-5
    # the gen model differs from dense (layers skip the prompt) but is not the deleted-layer model either
    d = prompted_perplexity(dense, IDS, prompt_len=20, scored_len=8, progress=False).mean_nll
    g = prompted_perplexity(gen, IDS, prompt_len=20, scored_len=8, progress=False).mean_nll
    assert abs(d - g) > 1e-4


def test_gen_multiple_choice_scores_the_continuation_by_decoding(tmp_path: Path) -> None:
    dense_folder("llama", tmp_path / "dense")
    gen, _ = load_model(gen_folder(tmp_path / "dense", tmp_path / "gen", [1, 2]))
    requests = [(IDS[:15], IDS[15:19]), (IDS[:15], IDS[30:33]), (IDS[40:50], IDS[50:51])]
    got = continuation_loglikelihoods(gen, requests, batch_size=2, progress=False)
    want = [sum(stepwise_logprobs(gen, c, x)) for c, x in requests]
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-5
    # one forward over context + continuation (what the batched path does) skips for every token: different
    with torch.inference_mode():
        ids = torch.tensor([IDS[:19]])
        logp = torch.log_softmax(gen(ids, use_cache=False).logits[0, 14:18].float(), -1)
    one_forward = float(logp.gather(1, torch.tensor(IDS[15:19])[:, None]).sum())
    assert abs(one_forward - got[0]) > 1e-4


def test_eval_with_a_gen_variant_and_its_report_section(tmp_path: Path) -> None:
    from shortgpt_deploy.report import gen_section, load_run

    dense = dense_folder("llama", tmp_path / "dense")
    gen = gen_folder(dense, tmp_path / "gen", [1, 2])
    text = tmp_path / "heldout.txt"
    text.write_text(" ".join(["alpha beta gamma delta epsilon zeta eta theta"] * 60))
    spec = EvalSpec(
        text=str(text), context_len=64, stride=32, max_tokens=400, greedy_prompts=2, greedy_tokens=4, prompt_len=40,
        scored_len=8,
    )  # fmt: skip
    out = evaluate_variants({"dense": dense, "gen": gen}, spec, references={"gen": "dense"}, progress=False).to_dict()
    assert set(out["perplexity"]) == {"dense"}  # a whole-window forward would measure the pruned model
    assert set(out["prompted_perplexity"]) == {"dense", "gen"} and out["gen_variants"] == ["gen"]
    assert out["agreement"][0]["variant"] == "gen"
    run = tmp_path / "run"
    run.mkdir()
    (run / "eval.json").write_text(json.dumps(out))
    (run / "manifest.json").write_text(json.dumps({"variants": {"dense": str(dense), "gen": str(gen)}}))
    section = gen_section(load_run(run), {})
    assert "## ShortGPT-gen" in section and "| gen |" in section and "40-token prompt" in section
    assert "Served:" not in section  # not benchmarked

    # Benchmarked: TTFT against the prefill FLOP ideal, TPOT against dense.
    def result(ttft_ms: float) -> dict:  # the fields of a `vllm bench serve` result JSON that summarize reads
        return {"output_throughput": 100.0, "p50_ttft_ms": ttft_ms, "p50_tpot_ms": 60.0}

    summary = summarize([("dense", "c1", 1, result(40.0)), ("gen", "c1", 1, result(32.0))],
                        variants=["dense", "gen"], levels=["c1"], flops={"dense": 1, "gen": 1})  # fmt: skip
    summary |= {"workload": {"input_len": 1024}, "ttft_ideal_ratio": {"dense": 1.0, "gen": 1.3}}
    section = gen_section(dataclasses.replace(load_run(run), summary=BenchSummary.from_dict(summary)), {})
    assert "Served: gen/dense TTFT p50 at c1: 40.0 → 32.0 ms = 1.25× faster vs ideal 1.30×" in section
    assert "TPOT p50 60.0 → 60.0 ms (1.00× dense's" in section
