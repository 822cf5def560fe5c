"""The guarded selector: the largest n within a perplexity budget, found with few evaluations."""

import json

import pytest
import yaml
from test_build import recipe, words  # noqa: F401  (the tiny build recipe)
from tiny import tiny_llama

from shortgpt_deploy.budget import largest_within, select_by_perplexity
from shortgpt_deploy.errors import PlanError, RecipeError
from shortgpt_deploy.evaluate import perplexity
from shortgpt_deploy.modeling import layers_removed, load_model
from shortgpt_deploy.pipeline import build
from shortgpt_deploy.recipe import parse_recipe


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
    assert f"The amount was chosen by a budget: {chosen['n_remove']} layers" in report
