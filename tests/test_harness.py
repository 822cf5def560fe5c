"""`eval --lm-eval`: without lm-evaluation-harness, one clear error; with it, our loaded model is handed to the
harness with the settings asked for and its results come back in our layout. The harness itself is not installed
here (its tasks need the Hub), so a stand-in module records the call; the parsing is checked on the harness's
documented result keys ("acc,none", "acc_stderr,none", ...)."""

import json
import sys
import types

import pytest
from helpers import run

from shortgpt_deploy.harness import parse_results


@pytest.fixture
def fake_harness(monkeypatch):
    calls = {}

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size):
            calls["wrapped"] = (pretrained, tokenizer, batch_size)

    def simple_evaluate(model, tasks, num_fewshot, limit):
        calls["evaluate"] = {"model": model, "tasks": tasks, "num_fewshot": num_fewshot, "limit": limit}
        results = {t: {"alias": t, "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.75} for t in tasks}
        results["lambada_openai"] = {"perplexity,none": 12.0, "acc,none": 0.25}
        return {"results": results, "configs": {}}

    lm_eval = types.ModuleType("lm_eval")
    lm_eval.__version__ = "0.0-test"
    lm_eval.simple_evaluate = simple_evaluate
    models = types.ModuleType("lm_eval.models")
    huggingface = types.ModuleType("lm_eval.models.huggingface")
    huggingface.HFLM = HFLM
    monkeypatch.setitem(sys.modules, "lm_eval", lm_eval)
    monkeypatch.setitem(sys.modules, "lm_eval.models", models)
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", huggingface)
    return calls


def test_without_the_harness_one_clear_error(two_layer_llama, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import fails as if not installed
    code, output = run("eval", two_layer_llama, "--lm-eval", "piqa", "--no-progress")
    assert code == 2
    flat = " ".join(output.split())
    assert "lm-evaluation-harness is not installed: `pip install lm-eval`" in flat and "offline, use --tasks" in flat


def test_the_loaded_model_and_settings_reach_the_harness(two_layer_llama, fake_harness):
    args = ("--lm-eval", "piqa, arc_easy", "--limit", "7", "--shots", "1", "--batch-size", "3", "--json")
    code, output = run("eval", two_layer_llama, *args)
    assert code == 0, output
    report = json.loads(output[output.index("{") :])
    model, tokenizer, batch = fake_harness["wrapped"]
    assert type(model).__name__ == "LlamaForCausalLM" and len(model.model.layers) == 2 and batch == 3
    assert tokenizer is not None
    assert fake_harness["evaluate"] | {"model": None} == {
        "model": None,
        "tasks": ["piqa", "arc_easy"],
        "num_fewshot": 1,
        "limit": 7,
    }
    h = report["lm_eval"]
    assert h["harness"] == "lm-eval 0.0-test" and h["limit"] == 7 and h["shots"] == 1
    assert h["tasks"]["piqa"] == {"acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.75}
    assert "perplexity" not in report  # only asked for the harness


def test_parse_results_averages_only_what_tasks_report():
    parsed = parse_results(
        {
            "results": {
                "a": {"acc,none": 0.2, "acc_norm,none": 0.4, "alias": "a"},
                "b": {"acc,none": 0.6},
                "c": {"word_perplexity,none": 30.0},
            }
        }
    )
    assert set(parsed["tasks"]) == {"a", "b"}
    assert parsed["average"]["acc"] == pytest.approx(0.4) and parsed["average"]["acc_norm"] == pytest.approx(0.4)
