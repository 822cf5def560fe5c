"""The repair stage in a build, the `repair` command, and the recipe rules for the repaired variant."""

import json
from pathlib import Path

import pytest
from helpers import recipe
from typer.testing import CliRunner

from shortgpt_deploy.cli import app
from shortgpt_deploy.pipeline import build
from shortgpt_deploy.preflight import parse_recipe
from shortgpt_deploy.recipe import RecipeError

runner = CliRunner()


def test_build_with_repair_adds_the_repaired_variant_everywhere(tmp_path, build_llama):
    r = recipe(tmp_path, build_llama, repair={"method": ["linear", "scale"], "samples": 8, "seq_len": 64}, eval={})
    r = r.model_copy(update={"prune": r.prune.model_copy(update={"n_remove": 2})})
    build(r, recipe_text="", progress=False)
    run = tmp_path / "run"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["variants"]["repaired"] == "repaired" and manifest["stages"]["repair"]["state"] == "complete"
    repair = json.loads((run / "repair.json").read_text())
    assert repair["methods"] == ["linear", "scale"] and [s["method"] for s in repair["steps"]] == ["linear", "scale"]
    assert all(g["fit_rel_error"] < g["fit_rel_error_before"] for g in repair["steps"][0]["gaps"])
    # A stock checkpoint with the pruned one's tensors, names and shapes.
    from safetensors import safe_open

    def shapes(folder: Path) -> dict[str, tuple[int, ...]]:
        with safe_open(folder / "model.safetensors", "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118

    assert shapes(run / "repaired") == shapes(run / "pruned")
    ev = json.loads((run / "eval.json").read_text())
    assert set(ev["perplexity"]) == {"dense", "pruned", "repaired"}
    assert {(a["variant"], a["reference"]) for a in ev["agreement"]} == {("pruned", "dense"), ("repaired", "dense")}
    report = (run / "report.md").read_text()
    assert "## Repair" in report and "linear then scale" in report and "**scale**" in report
    assert "| repaired | 2 |" in report  # layers: the pruned count


def test_repair_command_writes_a_checkpoint_and_refuses_unknown_methods(tmp_path, build_llama):
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(["the cat sat on the mat and looked at the dog"] * 200))
    pruned = tmp_path / "pruned"
    assert runner.invoke(app, ["prune", str(build_llama), "--out", str(pruned), "--layers", "1"]).exit_code == 0
    args = ["repair", str(pruned), "--dense", str(build_llama), "--calibration", str(text), "--samples", "4",
            "--seq-len", "32", "--no-progress"]  # fmt: skip
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "fixed")])
    assert result.exit_code == 0, result.output
    assert "gap [1]: fit error" in result.output and (tmp_path / "fixed" / "shortgpt_repair.json").is_file()
    bad = runner.invoke(app, [*args, "--out", str(tmp_path / "bad"), "--method", "distil"])
    assert bad.exit_code == 2 and bad.output.startswith(
        "error: --method: Input should be 'linear', 'scale' or 'distill', got 'distil'"
    )
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"repair": {"method": ["linear", "linear"]}}, "each method once"),
        ({"repair": {"method": []}}, "repair.method"),
        ({"quantize": {"variants": ["repaired"]}}, "no repair section"),
    ],
)
def test_recipe_rules_for_repair(tmp_path, build_llama, section, message):
    data = {
        "model": {"path": str(build_llama)},
        "calibration": {"offline": "austen:emma"},
        "prune": {"n_remove": 1},
        "output": {"dir": str(tmp_path / "run")},
        **section,
    }
    with pytest.raises(RecipeError, match=message):
        parse_recipe(data)


def test_a_single_method_may_be_written_without_a_list(tmp_path):
    data = {
        "model": {"path": "x"},
        "calibration": {"offline": "austen:emma"},
        "prune": {"n_remove": 1},
        "repair": {"method": "linear"},
        "output": {"dir": str(tmp_path)},
    }
    assert parse_recipe(data).repair.method == ["linear"]


def test_build_chains_linear_then_distill(tmp_path, build_llama):
    distill = {"max_steps": 4, "eval_every": 2, "lr": 1e-3}
    section = {"method": ["linear", "distill"], "samples": 8, "seq_len": 64, "batch_size": 2, "distill": distill}
    build(recipe(tmp_path, build_llama, repair=section), recipe_text="", progress=False)
    repair = json.loads((tmp_path / "run" / "repair.json").read_text())
    linear, distilled = repair["steps"]
    assert (linear["method"], distilled["method"]) == ("linear", "distill")
    (record,) = distilled["gaps"]
    assert 1 <= record["steps"] <= 4 and record["heldout_loss_best"] <= record["heldout_loss_before"]
    assert "**distill**" in (tmp_path / "run" / "report.md").read_text()


def test_recipe_distill_settings_are_the_librarys():
    import dataclasses

    from shortgpt_deploy.recipe import DistillSpec
    from shortgpt_deploy.repair_distill import DistillOptions

    assert set(DistillSpec.model_fields) == {f.name for f in dataclasses.fields(DistillOptions)}
    defaults = DistillOptions()
    assert all(getattr(defaults, k) == v for k, v in DistillSpec().model_dump().items())


def test_distill_settings_need_the_distill_method(tmp_path):
    data = {
        "model": {"path": "x"},
        "calibration": {"offline": "austen:emma"},
        "prune": {"n_remove": 1},
        "repair": {"method": ["linear"], "distill": {"max_steps": 3}},
        "output": {"dir": str(tmp_path)},
    }
    with pytest.raises(RecipeError, match="method does not include distill"):
        parse_recipe(data)
