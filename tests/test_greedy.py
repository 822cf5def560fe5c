"""`ppl_greedy` as a prune metric: scores.json says what its numbers are, the plan and the checkpoint follow the
greedy order, layers it never reached stay unscored, and a plan that would go past its end is refused."""

import json
import math

import pytest
import torch
from helpers import recipe
from tiny import tiny_llama
from typer.testing import CliRunner

from shortgpt_deploy.calibration import build_calibration, load_documents
from shortgpt_deploy.cli import app
from shortgpt_deploy.errors import PlanError
from shortgpt_deploy.greedy import calibration_nll, ppl_greedy_order, score_greedily
from shortgpt_deploy.importance import LayerScores
from shortgpt_deploy.modeling import layers_removed, load_model, tokenizer_adds_bos
from shortgpt_deploy.pipeline import build
from shortgpt_deploy.plan import make_plan
from shortgpt_deploy.preflight import parse_recipe

runner = CliRunner()


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    """A tiny 6-layer checkpoint whose layers matter enough that the greedy choices are well separated."""
    folder = tiny_llama(tmp_path_factory.mktemp("greedy") / "llama", num_layers=6, seed=1)
    model, tokenizer = load_model(folder)
    with torch.no_grad():
        for p in model.model.layers.parameters():
            p.mul_(4.0)
    model.save_pretrained(folder)
    return folder


def calibration_for(folder, spec):
    """The calibration set the build makes from `spec` (a local folder: BOS as its tokenizer does)."""
    model, tokenizer = load_model(folder)
    bos = tokenizer_adds_bos(tokenizer)
    return model, build_calibration(load_documents(spec), tokenizer, spec, add_bos=bos, source=spec.source)


def test_score_greedily_scores_only_the_layers_it_removes(sharp, tmp_path):
    r = recipe(tmp_path, sharp)
    model, calib = calibration_for(sharp, r.calibration)
    scores = score_greedily(model, calib, n_remove=2, protected=frozenset({0, 5}), progress=False)
    order = ppl_greedy_order(model, calib, n_remove=2, protected=frozenset({0, 5}), progress=False)
    assert scores.metric == "ppl_greedy" and scores.removal_order == order.removal_order
    first, second = scores.removal_order
    # A removed layer's score is the calibration perplexity with it and the layers chosen before it gone.
    with layers_removed(model, frozenset({first})):
        assert scores.scores[first] == pytest.approx(math.exp(calibration_nll(model, calib)), rel=1e-5)
    with layers_removed(model, frozenset({first, second})):
        assert scores.scores[second] == pytest.approx(math.exp(calibration_nll(model, calib)), rel=1e-5)
    step1 = scores.iterative[0]
    assert step1["removed"] == first and step1["score"] == scores.scores[first]
    assert min(step1["candidates"], key=lambda c: (step1["candidates"][c], int(c))) == str(first)
    assert set(step1["candidates"]) == {"1", "2", "3", "4"}  # protected layers are never candidates
    assert step1["calibration_perplexity_before"] == pytest.approx(math.exp(calibration_nll(model, calib)))
    unscored = [i for i in range(6) if i not in (first, second)]
    assert all(math.isnan(scores.scores[i]) for i in unscored)
    assert scores.greedy["steps"] == 2 and scores.greedy["protected"] == [0, 5]
    # scores.json: null (not NaN) for the unscored layers; it loads back the same.
    scores.save(tmp_path / "scores.json")
    data = json.loads((tmp_path / "scores.json").read_text())
    assert [data["scores"][i] for i in unscored] == [None] * 4 and "NaN" not in (tmp_path / "scores.json").read_text()
    loaded = LayerScores.load(tmp_path / "scores.json")
    assert loaded.removal_order == [first, second] and math.isnan(loaded.scores[unscored[0]])
    plan = make_plan(num_layers=6, scores=loaded, n_remove=2)
    assert plan.remove == (first, second) and "ppl_greedy=" in plan.reasons[first]


def test_build_with_ppl_greedy_prunes_the_greedy_prefix(sharp, tmp_path):
    r = recipe(tmp_path, sharp).model_dump(mode="json")
    r["prune"] = {"metric": "ppl_greedy", "ratio": 0.3}  # 0.3 × 6 layers → 2
    result = build(parse_recipe(r), recipe_text="", progress=False)
    run = tmp_path / "run"
    data = json.loads((run / "scores.json").read_text())
    model, calib = calibration_for(sharp, parse_recipe(r).calibration)
    assert data["calibration"] == calib.describe()  # the same blocks the build scored on
    expected = ppl_greedy_order(model, calib, n_remove=2, protected=frozenset({0, 5}), progress=False)
    assert data["metric"] == "ppl_greedy" and data["removal_order"] == expected.removal_order
    assert [s["removed"] for s in data["iterative"]] == expected.removal_order
    assert sum(v is not None for v in data["scores"]) == 2 and "calibration perplexity" in data["greedy"]["scores"]
    plan = json.loads((run / "plan.json").read_text())
    assert plan["remove"] == expected.removal_order == list(result.plan.remove) and plan["metric"] == "ppl_greedy"
    # The checkpoint loads, and computes what the dense model computes with those layers removed in memory.
    pruned, _ = load_model(run / "pruned")
    assert pruned.config.num_hidden_layers == 4
    ids = calib.batches[0].input_ids[:2]
    with torch.inference_mode(), layers_removed(model, frozenset(expected.removal_order)):
        want = model(ids).logits
    with torch.inference_mode():
        assert torch.allclose(pruned(ids).logits, want, atol=1e-5)
    assert "ppl_greedy" in (run / "report.md").read_text()


def test_score_then_prune_cannot_go_past_the_greedy_order(sharp, tmp_path):
    calib_file = tmp_path / "calib.txt"
    recipe(tmp_path, sharp)  # writes calib.txt
    scores = tmp_path / "scores.json"
    args = ["score", sharp, "--calibration", calib_file, "--out", scores, "--samples", 4, "--seq-len", 32]
    res = runner.invoke(app, [str(a) for a in [*args, "--metric", "ppl_greedy", "--n-remove", 2, "--no-progress"]])
    assert res.exit_code == 0, res.output
    order = json.loads(scores.read_text())["removal_order"]
    assert len(order) == 2
    prune = ["prune", sharp, "--scores", scores, "--dry-run"]
    res = runner.invoke(app, [str(a) for a in [*prune, "--out", tmp_path / "p", "--n-remove", 2]])
    assert res.exit_code == 0 and f"[{order[0]}, {order[1]}]" in res.output, res.output
    res = runner.invoke(app, [str(a) for a in [*prune, "--out", tmp_path / "p", "--n-remove", 3]])
    assert res.exit_code != 0 and "rank only 2 removable layers but the plan removes 3" in res.output
    res = runner.invoke(app, [str(a) for a in [*prune, "--out", tmp_path / "p", "--n-remove", 1, "--protect",
                                                f"0,-1,{order[0]}"]])  # fmt: skip
    assert res.exit_code != 0 and f"layer {order[0]} is protected but was removed at step 1" in res.output
    res = runner.invoke(app, [str(a) for a in [*args, "--metric", "bi", "--n-remove", 2]])
    assert res.exit_code != 0 and "n_remove only applies to ppl_greedy" in res.output


def test_greedy_scoring_stops_before_work_when_the_plan_cannot_fit(sharp, tmp_path, monkeypatch):
    from shortgpt_deploy import greedy

    monkeypatch.setattr(greedy, "ppl_greedy_order", lambda *a, **k: pytest.fail("scored anyway"))
    r = recipe(tmp_path, sharp).model_dump(mode="json")
    r["prune"] = {"metric": "ppl_greedy", "n_remove": 5}  # 6 layers, 2 protected
    with pytest.raises(PlanError, match="cannot remove 5 layers: only 4 of 6 are not protected"):
        build(parse_recipe(r), recipe_text="", progress=False)
    assert not (tmp_path / "run").exists()
