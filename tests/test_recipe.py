"""Recipes: every shipped one loads; every kind of mistake fails at load time, naming the field."""

from pathlib import Path

import pytest
import yaml

from shortgpt_deploy.errors import RecipeError
from shortgpt_deploy.preflight import load_recipe, parse_recipe
from shortgpt_deploy.recipe import CalibrationSpec

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
PAPER_LAYERS = {
    "llama2-7b": [27, 26, 25, 28, 24, 29, 23, 21, 22],
    "llama2-13b": [33, 31, 32, 30, 29, 34, 28, 35, 27, 26],
    "baichuan2-7b": [26, 27, 25, 28, 24, 29, 23, 22, 30],
    "baichuan2-13b": [32, 31, 33, 30, 34, 29, 28, 35, 27, 26],
}


def base() -> dict:
    return yaml.safe_load((Path(__file__).parents[1] / "recipes" / "default.yaml").read_text())


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.output.dir


def test_the_shipped_recipes_cover_the_paper():
    names = {p.stem for p in RECIPES}
    assert {"default", "llama2-7b-gptq", *PAPER_LAYERS} <= names


@pytest.mark.parametrize("name,layers", PAPER_LAYERS.items())
def test_paper_recipes_note_the_table4_layers(name, layers):
    text = (Path(__file__).parents[1] / "recipes" / f"{name}.yaml").read_text()
    assert ", ".join(map(str, layers)) in text
    assert load_recipe(Path(__file__).parents[1] / "recipes" / f"{name}.yaml").prune.n_remove == len(layers)


def test_gptq_recipe_removes_the_paper_layers():
    recipe = load_recipe(Path(__file__).parents[1] / "recipes" / "llama2-7b-gptq.yaml")
    assert recipe.prune.layers == PAPER_LAYERS["llama2-7b"]


def test_typo_in_a_key_names_the_path_and_the_allowed_keys():
    data = base()
    data["prune"]["n_remov"] = 3
    with pytest.raises(RecipeError) as err:
        parse_recipe(data)
    assert "prune.n_remov: unknown field" in str(err.value)
    assert "n_remove" in str(err.value) and "ratio" in str(err.value)


def test_unknown_top_level_section():
    data = base()
    data["quantise"] = {}
    with pytest.raises(RecipeError, match="quantise: unknown field"):
        parse_recipe(data)


def test_unknown_metric_lists_the_allowed_values():
    data = base()
    data["prune"]["metric"] = "bii"
    with pytest.raises(RecipeError) as err:
        parse_recipe(data)
    assert "prune.metric" in str(err.value) and "'relative_magnitude'" in str(err.value)


def test_both_n_remove_and_ratio_is_an_error():
    data = base()
    data["prune"]["n_remove"] = 4
    with pytest.raises(RecipeError, match="exactly one of n_remove, ratio, layers or budget"):
        parse_recipe(data)


def test_none_of_n_remove_ratio_layers_is_an_error():
    data = base()
    del data["prune"]["ratio"]
    with pytest.raises(RecipeError, match="exactly one of n_remove, ratio, layers or budget"):
        parse_recipe(data)


def test_ratio_out_of_range():
    data = base()
    data["prune"]["ratio"] = 1.5
    with pytest.raises(RecipeError, match="prune.ratio"):
        parse_recipe(data)


def test_two_calibration_sources_is_an_error():
    data = base()
    data["calibration"]["files"] = ["a.txt"]
    with pytest.raises(RecipeError, match="exactly one of files, dataset or offline"):
        parse_recipe(data)


def test_iterative_needs_a_forward_metric():
    data = base()
    data["prune"].update(metric="sequential", iterative=True)
    with pytest.raises(RecipeError, match="iterative"):
        parse_recipe(data)


def test_ppl_greedy_is_a_prune_metric_that_is_already_iterative():
    data = base()
    data["prune"] = {"metric": "ppl_greedy", "n_remove": 3, "protect": [0, 1, -1], "mode": data["prune"]["mode"]}
    prune = parse_recipe(data).prune
    assert (prune.metric, prune.iterative, prune.protect) == ("ppl_greedy", False, [0, 1, -1])
    data["prune"] = {"metric": "ppl_greedy", "budget": {"max_ppl_increase_pct": 20}, "mode": data["prune"]["mode"]}
    assert parse_recipe(data).prune.budget.max_ppl_increase_pct == 20
    data["prune"] = {"metric": "ppl_greedy", "n_remove": 3, "iterative": True, "mode": data["prune"]["mode"]}
    with pytest.raises(RecipeError, match="ppl_greedy already re-evaluates .* removal; drop iterative: true"):
        parse_recipe(data)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


def test_calibration_spec_from_cli():
    assert CalibrationSpec.from_cli("austen:emma").offline == "austen:emma"
    assert CalibrationSpec.from_cli("hf:pg19").dataset.name == "pg19"
    assert CalibrationSpec.from_cli("some/file.txt").files == [Path("some/file.txt")]


# ---------------------------------------------------------------------- quantize / eval / serve / bench
def with_stages(**sections) -> dict:
    data = base()
    for key in ("quantize", "eval", "serve", "bench"):
        data.pop(key, None)
    return data | sections


def test_stage_sections_are_optional_and_typed():
    recipe = parse_recipe(with_stages())
    assert recipe.quantize is None and recipe.bench is None
    recipe = parse_recipe(with_stages(quantize={"scheme": "W4A16", "samples": 8}, bench={"slos": ["ttft: 500"]}))
    assert recipe.quantize.scheme == "w4a16" and recipe.quantize.variants == ["dense", "pruned"]
    assert recipe.bench.slos == ["ttft:500"]


def test_unknown_scheme_lists_the_known_ones():
    with pytest.raises(RecipeError, match=r"quantize\.scheme: unknown quantization scheme 'int3'.*auto, w4a16"):
        parse_recipe(with_stages(quantize={"scheme": "int3"}))


def test_w8a8_says_why_it_is_not_produced():
    with pytest.raises(RecipeError, match="compressed-tensors"):
        parse_recipe(with_stages(quantize={"scheme": "w8a8"}))


def test_bad_slo_in_a_recipe():
    with pytest.raises(RecipeError, match=r"bench\.slos: bad SLO 'ttft=5'"):
        parse_recipe(with_stages(bench={"slos": ["ttft=5"]}))


def test_benching_a_quantized_variant_needs_it_quantized():
    with pytest.raises(RecipeError, match="pruned-gptq need a quantize section"):
        parse_recipe(with_stages(bench={"variants": ["dense", "pruned-gptq"]}))
    with pytest.raises(RecipeError, match="dense-gptq need a quantize section that quantizes dense"):
        parse_recipe(with_stages(quantize={"variants": ["pruned"]}, bench={"variants": ["dense", "dense-gptq"]}))


def test_unknown_bench_variant_and_typo_in_a_stage():
    with pytest.raises(RecipeError, match=r"bench\.variants\.1"):
        parse_recipe(with_stages(bench={"variants": ["dense", "prunned"]}))
    with pytest.raises(RecipeError, match=r"serve\.kv_cache_gb: unknown field \(allowed here: preset, dtype"):
        parse_recipe(with_stages(serve={"kv_cache_gb": 4}))


def test_eval_text_must_be_held_out():
    with pytest.raises(RecipeError, match="eval.text austen:emma is the calibration text"):
        parse_recipe(with_stages(eval={"text": "austen:emma"}))
    with pytest.raises(RecipeError, match="stride"):
        parse_recipe(with_stages(eval={"context_len": 64, "stride": 128}))
