"""The paper's analyses on a tiny model: the sweep starts at the dense model, orders give nested sets, the greedy
order's choices match brute force, normalisation and rank correlation are right, and every command writes its
JSON and a PNG; bad input fails with one clear error."""

import json
import math
import random

import pytest
import torch
from tiny import WORDS, tiny_llama
from typer.testing import CliRunner

from shortgpt_deploy.analyze import (
    ORDERS,
    AnalysisError,
    AnalysisSettings,
    load_context,
    min_max,
    ratio_sweep_analysis,
    spearman,
    sweep_grid,
)
from shortgpt_deploy.analyze_plots import markdown_section
from shortgpt_deploy.cli import app
from shortgpt_deploy.evaluate import perplexity
from shortgpt_deploy.greedy import ppl_greedy_order
from shortgpt_deploy.modeling import layers_removed
from shortgpt_deploy.multiple_choice import run_tasks
from shortgpt_deploy.recipe import CalibrationSpec

runner = CliRunner()
SMALL = ("--samples", "4", "--seq-len", "32", "--greedy-samples", "2", "--greedy-seq-len", "32")
SMALL += ("--context-len", "64", "--stride", "64", "--max-tokens", "200", "--no-progress")


def word_text(path, seed):
    rng = random.Random(seed)
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(2000)))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    tiny = tiny_llama(root / "tiny", num_layers=6, seed=1)
    return tiny, word_text(root / "calib.txt", 0), word_text(root / "held.txt", 1)


def settings(calib, held, **kw):
    spec = CalibrationSpec(files=[calib], samples=4, seq_len=32, batch_size=2)
    greedy = CalibrationSpec(files=[calib], samples=3, seq_len=24, batch_size=2)
    base = {"heldout": str(held), "max_tokens": 200, "context_len": 64, "stride": 64, "max_ratio": 0.7, "step": 1}
    return AnalysisSettings(calibration=spec, greedy_calibration=greedy, **(base | kw))


@pytest.fixture(scope="module")
def ctx(files):
    tiny, calib, held = files
    context, _ = load_context(str(tiny), settings(calib, held), progress=False)
    with torch.no_grad():  # random layers barely matter; sharper ones make the greedy choices well separated
        for p in context.model.model.layers.parameters():
            p.mul_(4.0)
    return context


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_min_max_and_spearman():
    assert min_max([3.0, 1.0, 2.0]) == [1.0, 0.0, 0.5]
    assert min_max([2.0, 2.0]) == [0.0, 0.0]
    assert spearman([1.0, 5.0, 9.0], [0.1, 0.2, 7.0]) == pytest.approx(1.0)
    assert spearman([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert spearman([1.0, 2.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]) == pytest.approx(0.9486833, abs=1e-6)  # ties
    assert spearman([1.0, 1.0], [1.0, 2.0]) is None


def test_sweep_grid_includes_the_25_percent_point():
    assert sweep_grid(30, 28, max_ratio=0.5, step=2) == ([0, 2, 4, 6, 8, 10, 12, 14], 8)
    assert sweep_grid(32, 30, max_ratio=0.5, step=3) == ([0, 3, 6, 8, 9, 12, 15], 8)
    assert sweep_grid(6, 4, max_ratio=0.9, step=1)[0] == [0, 1, 2, 3, 4]  # capped by the unprotected layers


def test_sweep_starts_at_the_dense_model_and_orders_are_nested(ctx):
    data = ratio_sweep_analysis(ctx)
    dense = perplexity(ctx.model, ctx.heldout_ids(), context_len=64, stride=64, progress=False).perplexity
    assert data["grid"] == [0, 1, 2, 3, 4] and data["n_at_25_percent"] == 2
    for name in ORDERS:
        points = data["points"][name]
        assert points[0]["n"] == 0 and points[0]["perplexity"] == pytest.approx(dense, rel=1e-6)
        for p in points:
            assert len(p["removed"]) == p["n"] and not {0, 5} & set(p["removed"])
        if name != "angular":  # a block is chosen afresh for each n
            for a, b in zip(points, points[1:], strict=False):
                assert set(a["removed"]) <= set(b["removed"]), name
    assert data["orders"]["sequential"]["removal_order"] == [1, 2, 3, 4]
    assert data["orders"]["reverse"]["removal_order"] == [4, 3, 2, 1]
    blocks = [data["points"]["angular"][n]["removed"] for n in (2, 3)]
    assert all(b == list(range(b[0], b[0] + len(b))) for b in blocks)  # contiguous
    assert data["at_25_percent"]["bi"] == data["perplexity_table"]["bi"]["2"]


def brute_force_nll(model, calibration, removed):
    """Mean next-token NLL over the calibration blocks, computed plainly with the layers removed."""
    total, count = 0.0, 0
    with layers_removed(model, frozenset(removed)), torch.inference_mode():
        for batch in calibration.batches:
            logits = model(batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch.input_ids[:, 1:], reduction="none")
            keep = batch.attention_mask[:, 1:].bool()
            total, count = total + float(nll[keep].double().sum()), count + int(keep.sum())
    return total / count


def test_ppl_greedy_picks_what_brute_force_picks(ctx):
    calibration = ctx.greedy_calibration
    result = ppl_greedy_order(ctx.model, calibration, n_remove=2, protected=frozenset({0, 5}), progress=False)
    first = {c: brute_force_nll(ctx.model, calibration, {c}) for c in (1, 2, 3, 4)}
    assert result.removal_order[0] == min(first, key=first.get)
    step = result.steps[0]
    assert math.log(step["calibration_perplexity_before"]) == pytest.approx(brute_force_nll(ctx.model, calibration, ()))
    for c, ppl in step["candidates"].items():  # layers in front of the candidate replay recorded outputs
        assert math.log(ppl) == pytest.approx(first[int(c)], rel=1e-5)
    pick = result.removal_order[0]
    second = {c: brute_force_nll(ctx.model, calibration, {pick, c}) for c in (1, 2, 3, 4) if c != pick}
    assert result.removal_order[1] == min(second, key=second.get)
    assert result.forward_passes == 1 + 4 + 1 + 3


@pytest.mark.parametrize("what", ["metrics", "single-layer", "ratio-sweep"])
def test_each_analysis_writes_json_and_png(files, tmp_path, what):
    tiny, calib, held = files
    extra = ("--max-ratio", "0.4", "--orders", "bi,angular,ppl_greedy") if what == "ratio-sweep" else ()
    code, output = run(
        "analyze", tiny, "--what", what, "--calibration", calib, "--heldout", held, "--out", tmp_path, *SMALL, *extra
    )
    assert code == 0, output
    stem = what.replace("-", "_")
    data = json.loads((tmp_path / f"{stem}.json").read_text())
    assert data["analysis"] == what and data["model"] == str(tiny)
    assert {"git_revision", "packages", "machine", "command"} <= set(data["provenance"])
    assert data["calibration"]["num_tokens"] > 0
    png = (tmp_path / f"{stem}.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / f"{stem}.png").shape[2] in (3, 4)
    if what == "metrics":
        for name, values in data["normalised"].items():
            if len(set(data["raw"][name])) > 1:
                assert min(values) == 0.0 and max(values) == 1.0
                assert values.index(0.0) == data["raw"][name].index(min(data["raw"][name]))
        assert data["spearman_with_bi"]["bi"] == pytest.approx(1.0)
        assert data["heldout"] is None  # metrics measure nothing on held-out text
    if what == "single-layer":
        assert [r["layer"] for r in data["layers"]] == list(range(6))
        assert data["heldout"]["text"] == str(held) and data["heldout"]["max_tokens"] == 200
    if what == "ratio-sweep":
        assert list(data["perplexity_table"]) == ["bi", "angular", "ppl_greedy"]
        assert "at 25% (2 of 6 layers removed)" in output
        assert "ascending layer index among unprotected" in data["protection"]


def test_unknown_what_lists_the_known_ones(files):
    code, output = run("analyze", files[0], "--what", "everything")
    assert code == 2 and "unknown analysis 'everything'" in output
    assert "single-layer, ratio-sweep, metrics" in output


def test_a_folder_that_is_not_a_model(tmp_path, files):
    code, output = run("analyze", tmp_path, "--what", "metrics", "--calibration", files[1], "--heldout", files[2])
    assert code == 2 and "is not a model folder (no config.json)" in output


def test_unknown_task(files):
    code, output = run("analyze", files[0], "--what", "single-layer", "--tasks", "trivia", *SMALL)
    assert code == 2 and "unknown task 'trivia'; known:" in output and "piqa" in output


@pytest.mark.parametrize("ratio", ["0", "1", "1.5", "-0.2"])
def test_max_ratio_out_of_range(files, ratio):
    code, output = run("analyze", files[0], "--what", "ratio-sweep", "--max-ratio", ratio)
    assert code == 2 and "--max-ratio must be between 0 and 1" in output


def test_settings_refuse_unknown_orders_and_calibration_as_heldout(files):
    _, calib, held = files
    with pytest.raises(AnalysisError, match="unknown removal order.*known: bi, relative_magnitude"):
        settings(calib, held, orders=("bi", "random"))
    with pytest.raises(AnalysisError, match="is the calibration text: give --heldout another text"):
        settings(calib, calib)
    with pytest.raises(AnalysisError, match="is the calibration text"):
        AnalysisSettings(
            calibration=CalibrationSpec.from_cli("austen:emma"),
            greedy_calibration=CalibrationSpec.from_cli("austen:emma"),
            heldout="austen:emma",
        )


# ------------------------------------------------------------------------------- multiple-choice tasks
def _mc_of(context, removed):
    """MC average accuracy of the context's model with `removed` layers gone, computed directly."""
    with layers_removed(context.model, frozenset(removed)):
        got = run_tasks(
            context.model, context.tokenizer, context.tasks, batch_size=4, add_bos=context.add_bos, progress=False
        )
    return got["average"]["acc"]


@pytest.mark.parametrize("tasks_at", ["all", "25"])
def test_ratio_sweep_with_tasks(files, data_dir, tasks_at):
    tiny, calib, held = files
    s = settings(calib, held, tasks=("piqa", "mmlu"), limit=4, tasks_at=tasks_at, orders=("bi", "reverse"))
    context, _ = load_context(str(tiny), s, progress=False)
    data = ratio_sweep_analysis(context)
    n25, grid = data["n_at_25_percent"], data["grid"]
    measured = grid if tasks_at == "all" else [0, n25]
    for name in ("bi", "reverse"):
        assert sorted(map(int, data["mc_table"][name])) == measured
        for point in data["points"][name]:
            assert ("mc_acc" in point) == (point["n"] in measured)
            if "mc_acc" in point:
                assert set(point["tasks"]) == {"piqa", "mmlu"}
        removed = next(p["removed"] for p in data["points"][name] if p["n"] == n25)
        assert data["at_25_percent_mc"][name] == pytest.approx(_mc_of(context, removed))
        assert data["retention_at_25_percent"][name] == pytest.approx(
            100 * data["at_25_percent_mc"][name] / data["dense_mc_acc"]
        )
    assert data["dense_mc_acc"] == pytest.approx(_mc_of(context, ()))
    doc = {**data, "analysis": "ratio-sweep", "model": "tiny", "duration_s": 3, "provenance": {"command": ["x", "a"]}}
    section = markdown_section(doc, "ratio_sweep.png")  # as the run's report shows it
    bi = f"| bi | {data['at_25_percent']['bi']:.2f} | {data['at_25_percent_mc']['bi']:.3f} |"
    assert "| order | perplexity | MC average | retention |" in section and bi in section


def test_single_layer_with_tasks_in_json_plot_and_table(files, data_dir, tmp_path):
    tiny, calib, held = files
    code, output = run(
        "analyze", tiny, "--what", "single-layer", "--calibration", calib, "--heldout", held, "--out", tmp_path,
        "--tasks", "piqa", "--limit", "5", *SMALL,
    )  # fmt: skip
    assert code == 0, output
    data = json.loads((tmp_path / "single_layer.json").read_text())
    assert data["tasks"][0]["name"] == "piqa" and data["tasks"][0]["items"] == 5 and data["limit"] == 5
    assert all(0 <= r["mc_acc"] <= 1 and set(r["tasks"]) == {"piqa"} for r in data["layers"])
    assert "MC acc" in output
    assert (tmp_path / "single_layer.png").read_bytes().startswith(b"\x89PNG")


def test_tasks_at_must_be_all_or_25(files):
    _, calib, held = files
    with pytest.raises(AnalysisError, match="--tasks-at must be one of all, 25"):
        settings(calib, held, tasks_at="half")


# ------------------------------------------------------------------------------------------- attention heads
def test_ablating_a_head_equals_zeroing_its_columns_of_o_proj(files):
    from transformers import AutoModelForCausalLM

    from shortgpt_deploy.modeling import attention_heads, heads_removed

    model = AutoModelForCausalLM.from_pretrained(files[0]).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    heads, width = attention_heads(model)
    assert (heads, width) == (4, 8)
    with torch.no_grad():
        dense = model(ids).logits
        with heads_removed(model, {(1, 2), (3, 0)}):
            ablated = model(ids).logits
        assert torch.equal(model(ids).logits, dense)  # restored on exit
        for layer, head in ((1, 2), (3, 0)):
            model.model.layers[layer].self_attn.o_proj.weight[:, head * width : (head + 1) * width] = 0
        by_weights = model(ids).logits
    assert not torch.allclose(ablated, dense)
    assert torch.allclose(ablated, by_weights, atol=1e-6)


def test_heads_analysis_writes_a_layers_by_heads_grid(files, tmp_path):
    tiny, calib, held = files
    code, output = run(
        "analyze", tiny, "--what", "heads", "--calibration", calib, "--heldout", held, "--out", tmp_path, *SMALL
    )
    assert code == 0, output
    data = json.loads((tmp_path / "heads.json").read_text())
    assert data["num_heads"] == 4 and len(data["perplexity"]) == 6 and all(len(r) == 4 for r in data["perplexity"])
    dense = data["dense"]["perplexity"]
    assert data["increase_pct"][2][1] == pytest.approx(100 * (data["perplexity"][2][1] / dense - 1))
    top = data["most_important_head"]
    assert top["perplexity"] == max(max(r) for r in data["perplexity"])
    assert f"most important head: layer {top['layer']} head {top['head']}" in output
    assert (tmp_path / "heads.png").read_bytes().startswith(b"\x89PNG")
