"""What config.json and the calibration files alone decide fails before any model loads, in a dry run too; an
explicit layer list is pruned without scoring unless the plot is asked for."""

import pytest
import yaml
from tiny import tiny_llama
from typer.testing import CliRunner

from shortgpt_deploy import importance, modeling
from shortgpt_deploy.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")  # 6 layers


@pytest.fixture
def no_model(monkeypatch):
    """Loading or scoring a model fails the test."""
    # stages and pipeline import load_model from modeling when they run
    monkeypatch.setattr(modeling, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(importance, "score_layers", lambda *a, **k: pytest.fail("the model was scored"))


def recipe_file(tmp_path, ckpt, prune):
    (tmp_path / "text.txt").write_text(("she was not the one to think of it and he had said so . " * 60).strip())
    data = {
        "model": {"path": str(ckpt)},
        "calibration": {"files": [str(tmp_path / "text.txt")], "samples": 4, "seq_len": 32, "batch_size": 2},
        "prune": prune,
        "output": {"dir": str(tmp_path / "run")},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, " ".join(result.output.split())


@pytest.mark.parametrize(
    ("prune", "message"),
    [
        ({"layers": [99]}, "layer index 99 is out of range: the model has layers 0..5"),
        ({"layers": [3, 3]}, "layer list [3, 3] names a layer twice"),
        ({"layers": [0, 2]}, "layer 0 is protected"),
        ({"n_remove": 6, "protect": []}, "cannot remove 6 of 6 layers: at least one layer must stay"),
        ({"n_remove": 5}, "cannot remove 5 layers: only 4 of 6 are not protected"),
        ({"ratio": 0.9}, "cannot remove 5 layers: only 4 of 6 are not protected"),
        ({"n_remove": 1, "protect": [9]}, "protected layer 9 is out of range"),
        ({"metric": "angular", "n_remove": 3, "protect": [0, 2, -1]}, "no block of 3 contiguous layers avoids"),
    ],
)
@pytest.mark.parametrize("dry_run", [False, True])
def test_plan_errors_in_a_recipe_fail_before_any_model_loads(tmp_path, ckpt, no_model, prune, message, dry_run):
    code, output = run("build", recipe_file(tmp_path, ckpt, prune), *(["--dry-run"] if dry_run else []))
    assert code == 2 and message in output, output
    assert "Traceback" not in output
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob(".run.*"))


def test_explicit_layers_are_pruned_without_scoring(tmp_path, ckpt, no_model):
    code, output = run("build", recipe_file(tmp_path, ckpt, {"layers": [2, 3]}), "--no-progress")
    assert code == 0, output
    run_dir = tmp_path / "run"
    assert (run_dir / "pruned" / "config.json").is_file() and (run_dir / "plan.json").is_file()
    assert not (run_dir / "scores.json").exists() and not (run_dir / "bi.png").exists()
    assert "remove 2 of 6 layers (explicit): [2, 3]" in output


def test_prune_command_with_layers_does_not_score(tmp_path, ckpt, no_model):
    code, output = run("prune", ckpt, "--out", tmp_path / "out", "--layers", "2,3", "--no-progress")
    assert code == 0, output
    assert (tmp_path / "out" / "config.json").is_file()


def test_explicit_layers_with_plot_are_scored_and_plotted(tmp_path, ckpt):
    code, output = run("build", recipe_file(tmp_path, ckpt, {"layers": [2, 3], "plot": True}), "--no-progress")
    assert code == 0, output
    assert (tmp_path / "run" / "scores.json").is_file() and (tmp_path / "run" / "bi.png").is_file()


def test_plot_only_applies_to_explicit_layers(tmp_path, ckpt):
    code, output = run("build", recipe_file(tmp_path, ckpt, {"n_remove": 2, "plot": True}))
    assert code == 2 and "prune: plot only applies to an explicit layer list: n_remove always scores" in output


def test_binary_calibration_file_fails_in_preflight_even_without_scoring(tmp_path, ckpt, no_model):
    path = recipe_file(tmp_path, ckpt, {"layers": [2]})  # no scoring, but GPTQ would read the text later
    (tmp_path / "text.txt").write_bytes(b"\0" * 512)
    code, output = run("build", path, "--dry-run")
    assert code == 2 and f"{tmp_path / 'text.txt'} is not text" in output, output
    assert not (tmp_path / "run").exists()
