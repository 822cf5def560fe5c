"""Bad input: one clear error (exit code 2), naming the problem and the fix, and nothing left behind."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny import tiny_llama
from typer.testing import CliRunner

from shortgpt_deploy.cli import app
from shortgpt_deploy.errors import UnsupportedArchitectureError
from shortgpt_deploy.modeling import resolve_checkpoint

runner = CliRunner()
ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def recipe_file(tmp_path, ckpt, **prune):
    data = {
        "model": {"path": str(ckpt)},
        "calibration": {"files": [str(tmp_path / "text.txt")], "samples": 4, "seq_len": 32, "batch_size": 2},
        "prune": prune or {"n_remove": 2},
        "output": {"dir": str(tmp_path / "run")},
    }
    (tmp_path / "text.txt").write_text(("she was not the one to think of it and he had said so . " * 60).strip())
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial" in p.name or p.name in ("run", "out"))


def test_build_works_on_a_tiny_model(tmp_path, ckpt):
    code, output = run("build", recipe_file(tmp_path, ckpt), "--no-progress")
    assert code == 0, output
    run_dir = tmp_path / "run"
    for name in ("recipe.yaml", "manifest.json", "scores.json", "plan.json", "bi.png", "pruned/config.json"):
        assert (run_dir / name).exists(), name
    assert "remove 2 of 6 layers" in output


def test_recipe_typo(tmp_path, ckpt):
    path = recipe_file(tmp_path, ckpt, n_remov=2)
    code, output = run("build", path)
    assert code == 2
    assert "prune.n_remov: unknown field" in output
    assert leftovers(tmp_path) == []


def test_both_n_remove_and_ratio(tmp_path, ckpt):
    code, output = run("build", recipe_file(tmp_path, ckpt, n_remove=2, ratio=0.5))
    assert code == 2 and "exactly one of n_remove, ratio, layers or budget" in output


def test_removing_all_layers(tmp_path, ckpt):
    code, output = run("prune", ckpt, "--out", tmp_path / "out", "--layers", "0,1,2,3,4,5", "--protect", "")
    assert code == 2 and "cannot remove all 6 layers" in output
    assert leftovers(tmp_path) == []


def test_removing_a_protected_layer(tmp_path, ckpt):
    code, output = run("prune", ckpt, "--out", tmp_path / "out", "--layers", "5")
    assert code == 2 and "layer 5 is protected" in output and "--protect" in output
    assert leftovers(tmp_path) == []


def test_layer_index_out_of_range(tmp_path, ckpt):
    code, output = run("prune", ckpt, "--out", tmp_path / "out", "--layers", "2,17")
    assert code == 2 and "layer index 17 is out of range: the model has layers 0..5" in output
    assert leftovers(tmp_path) == []


def test_missing_model_path(tmp_path):
    code, output = run("prune", tmp_path / "no-such-model", "--out", tmp_path / "out", "--layers", "1")
    assert code == 2 and "model path not found" in output
    assert leftovers(tmp_path) == []


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    code, output = run("prune", tmp_path / "empty", "--out", tmp_path / "out", "--layers", "1")
    assert code == 2 and "no config.json" in output


def test_gguf_of_an_unsupported_architecture(tmp_path):
    import gguf

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "notanarch")
    writer.add_block_count(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedArchitectureError, match="notanarch"):
        resolve_checkpoint(str(path))


def test_empty_calibration_text(tmp_path, ckpt):
    (tmp_path / "empty.txt").write_text("  \n")
    code, output = run("score", ckpt, "--calibration", tmp_path / "empty.txt", "--out", tmp_path / "s.json")
    assert code == 2 and "contains no text" in output
    assert not (tmp_path / "s.json").exists()


def test_too_short_calibration_text(tmp_path, ckpt):
    (tmp_path / "short.txt").write_text("she was not the one " * 10)
    code, output = run(
        "score",
        ckpt,
        "--calibration",
        tmp_path / "short.txt",
        "--samples",
        "8",
        "--seq-len",
        "32",
        "--out",
        tmp_path / "s.json",
    )
    assert code == 2 and "calibration text too short" in output and "calibration.samples" in output
    assert not (tmp_path / "s.json").exists()


def test_missing_calibration_file(tmp_path, ckpt):
    code, output = run("score", ckpt, "--calibration", tmp_path / "nope.txt", "--out", tmp_path / "s.json")
    assert code == 2 and "calibration file not found" in output


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (random.Random(0).randbytes(4096), "is not UTF-8 text (byte 0x"),  # random bytes are never valid UTF-8
        (b"\0" * 4096, "is not text: 4096 of its 4096 characters are control characters"),  # valid UTF-8
    ],
)
def test_binary_calibration_file_is_refused_before_the_model_loads(tmp_path, ckpt, monkeypatch, content, message):
    from shortgpt_deploy import modeling

    monkeypatch.setattr(modeling, "load_model", lambda *a, **k: pytest.fail("model loaded before the text check"))
    path = tmp_path / "data.bin"
    path.write_bytes(content)
    code, output = run("score", ckpt, "--calibration", path, "--out", tmp_path / "s.json")
    assert code == 2 and f"{path} {message}" in " ".join(output.split()), output
    assert not (tmp_path / "s.json").exists()
    monkeypatch.setattr(modeling, "load_model", lambda *a, **k: pytest.fail("model loaded before the text check"))
    code, output = run("analyze", ckpt, "--what", "metrics", "--calibration", path, "--out", tmp_path / "a")
    assert code == 2 and message in " ".join(output.split()), output
    recipe = recipe_file(tmp_path, ckpt)
    (tmp_path / "text.txt").write_bytes(content)  # the recipe's calibration file
    code, output = run("build", recipe)
    assert code == 2 and message in " ".join(output.split()), output
    assert leftovers(tmp_path) == []


def test_utf8_text_with_a_byte_order_mark_and_accents_is_read(tmp_path):
    from shortgpt_deploy.calibration import read_text_file

    path = tmp_path / "t.txt"
    path.write_bytes("\ufeffÉmile était là.\n\tFin.\f\n".encode())
    assert read_text_file(path) == "Émile était là.\n\tFin.\f\n"


def scores_file(tmp_path):
    data = {"metric": "bi", "model": "tiny", "num_layers": 6, "scores": [0.5, 0.1, 0.2, 0.3, 0.4, 0.6]}
    data |= {"removal_order": [1, 2, 3, 4, 0, 5], "calibration": {}}
    (tmp_path / "scores.json").write_text(json.dumps(data))
    return tmp_path / "scores.json"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["score", "CKPT", "--samples", "0"], "--samples must be at least 1, got 0"),
        (["score", "CKPT", "--seq-len", "-5"], "--seq-len must be at least 8, got -5"),
        (["score", "CKPT", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["score", "CKPT", "--metric", "ppl_greedy", "--n-remove", "0"], "--n-remove must be at least 1, got 0"),
        (["score", "CKPT", "--dtype", "fp8"], "--dtype: Input should be 'float32', 'bfloat16' or 'float16', got 'fp8'"),
        (["prune", "CKPT", "--out", "OUT", "--scores", "SCORES", "--ratio", "1.5"],
         "--ratio must be greater than 0 and less than 1, got 1.5"),
        (["prune", "CKPT", "--out", "OUT", "--scores", "SCORES", "--n-remove", "0"],
         "--n-remove must be at least 1, got 0"),
        (["prune", "CKPT", "--out", "OUT", "--scores", "SCORES", "--n-remove", "2", "--ratio", "0.5"],
         "give exactly one of --layers, --n-remove or --ratio (got --n-remove, --ratio)"),
        (["quantize", "CKPT", "--out", "OUT", "--seq-len", "4"], "--seq-len must be at least 8, got 4"),
        (["analyze", "CKPT", "--what", "metrics", "--samples", "0"], "--samples must be at least 1, got 0"),
        (["analyze", "CKPT", "--what", "ratio-sweep", "--greedy-seq-len", "4"],
         "--greedy-seq-len must be at least 8, got 4"),
    ],
)  # fmt: skip
def test_option_out_of_range_names_the_option_and_the_range(tmp_path, ckpt, monkeypatch, args, message):
    from shortgpt_deploy import modeling, pipeline

    for module in (modeling, pipeline):
        monkeypatch.setattr(module, "resolve_checkpoint", lambda *a, **k: pytest.fail("went on past a bad option"))
    names = {"CKPT": ckpt, "OUT": tmp_path / "out", "SCORES": scores_file(tmp_path)}
    code, output = run(*(names.get(a, a) for a in args))
    assert code == 2 and message in output, output
    assert "pydantic" not in output and "Traceback" not in output
    assert len(output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_recipe_out_of_range_names_the_field_path(tmp_path, ckpt):
    path = recipe_file(tmp_path, ckpt)
    data = yaml.safe_load(path.read_text())
    data["calibration"]["samples"] = 0
    path.write_text(yaml.safe_dump(data))
    code, output = run("build", path)
    assert code == 2 and "calibration.samples: Input should be greater than or equal to 1" in output, output
    assert "pydantic" not in output


def test_output_folder_exists(tmp_path, ckpt):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, output = run("prune", ckpt, "--out", out, "--layers", "2")
    assert code == 2 and "already exists" in output and "--force" in output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    code, output = run("prune", ckpt, "--out", out, "--layers", "2", "--force", "--no-progress")
    assert code == 0, output
    assert (out / "config.json").exists() and not (out / "keep.txt").exists()


def test_build_refuses_an_existing_run_folder(tmp_path, ckpt):
    (tmp_path / "run").mkdir()
    code, output = run("build", recipe_file(tmp_path, ckpt))
    assert code == 2 and "already exists" in output


def test_hub_id_without_network(tmp_path):
    # A closed local port stands in for an unreachable hub; the message must say how to work offline.
    env = {
        **os.environ,
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(tmp_path / "hf"),
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "shortgpt_deploy",
            "prune",
            "some-org/some-model",
            "--out",
            str(tmp_path / "o"),
            "--layers",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "could not download 'some-org/some-model'" in proc.stderr
    assert "local folder" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_score_then_prune_by_scores(tmp_path, ckpt):
    recipe_file(tmp_path, ckpt)  # writes text.txt
    code, output = run(
        "score",
        ckpt,
        "--calibration",
        tmp_path / "text.txt",
        "--samples",
        "4",
        "--seq-len",
        "32",
        "--out",
        tmp_path / "scores.json",
        "--no-progress",
    )
    assert code == 0, output
    data = json.loads((tmp_path / "scores.json").read_text())
    assert data["metric"] == "bi" and data["num_layers"] == 6 and len(data["scores"]) == 6
    assert sorted(data["removal_order"]) == list(range(6))
    assert data["calibration"]["num_tokens"] > 0 and data["calibration"]["seed"] == 0
    expected = [i for i in data["removal_order"] if i not in (0, 5)][:2]

    code, output = run(
        "prune", ckpt, "--out", tmp_path / "out", "--scores", tmp_path / "scores.json", "--n-remove", "2", "--dry-run"
    )
    assert code == 0 and "dry run: nothing written" in output and not (tmp_path / "out").exists()
    code, output = run(
        "prune",
        ckpt,
        "--out",
        tmp_path / "out",
        "--scores",
        tmp_path / "scores.json",
        "--n-remove",
        "2",
        "--no-progress",
    )
    assert code == 0, output
    plan = json.loads((tmp_path / "out" / "shortgpt_plan.json").read_text())
    assert plan["remove"] == expected
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 4


def test_n_remove_without_scores(tmp_path, ckpt):
    code, output = run("prune", ckpt, "--out", tmp_path / "out", "--n-remove", "2")
    assert code == 2 and "--scores" in output


def test_build_dry_run_writes_plan_but_no_checkpoint(tmp_path, ckpt):
    code, output = run("build", recipe_file(tmp_path, ckpt), "--dry-run", "--no-progress")
    assert code == 0, output
    assert (tmp_path / "run" / "plan.json").exists() and not (tmp_path / "run" / "pruned").exists()


def test_serve_with_an_unknown_preset(tmp_path, ckpt):
    code, output = run("serve", ckpt, "--preset", "tpu", "--log", tmp_path / "serve.log")
    assert code == 2 and "serving preset 'tpu' not found" in output and "known presets: cpu, gpu" in output
    assert not (tmp_path / "serve.log").exists()  # failed before starting anything


def test_report_of_a_folder_that_is_not_a_run(tmp_path):
    code, output = run("report", tmp_path)
    assert code == 2 and "not a run folder" in output and "shortgpt-deploy build RECIPE" in output
