"""`analyze --what orthogonality`: the four checkpoints of a run measured alike, the independence predictions
computed from them, a clear error when a run lacks one, and a model given instead: built with real GPTQ (~20 s)."""

import json
import random
import shutil

import pytest
from tiny import WORDS, tiny_llama
from typer.testing import CliRunner

from shortgpt_deploy.cli import app
from shortgpt_deploy.evaluate import evaluate_perplexity
from shortgpt_deploy.multiple_choice import evaluate_tasks
from shortgpt_deploy.orthogonality import FOUR, orthogonality_table, verdict

runner = CliRunner()
HELD = ("--context-len", "64", "--stride", "64", "--max-tokens", "200", "--limit", "4", "--no-progress")


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder laid out as a build leaves it: the dense model outside, the other three inside."""
    root = tmp_path_factory.mktemp("ortho")
    dense = tiny_llama(root / "dense-model", num_layers=6, seed=1)
    folder = root / "run"
    for name, layers, seed in (("pruned", 4, 2), ("dense-gptq", 6, 3), ("pruned-gptq", 4, 4)):
        tiny_llama(folder / name, num_layers=layers, seed=seed)
    variants = {"dense": str(dense), "pruned": "pruned", "dense-gptq": "dense-gptq", "pruned-gptq": "pruned-gptq"}
    manifest = {"inputs": {"recipe": {"model": {"path": str(dense)}}}, "variants": variants}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    rng = random.Random(0)
    held = root / "held.txt"
    held.write_text(" ".join(rng.choice(WORDS) for _ in range(1500)))
    return folder, held


def test_four_checkpoints_measured_and_predictions_from_them(run_dir, data_dir):
    run_folder, held = run_dir
    code, output = run(
        "analyze", run_folder, "--what", "orthogonality", "--heldout", held, "--tasks", "piqa,mmlu", *HELD
    )
    assert code == 0, output
    data = json.loads((run_folder / "orthogonality.json").read_text())  # written into the run folder
    assert (run_folder / "orthogonality.png").read_bytes().startswith(b"\x89PNG")
    rows = data["variants"]
    assert list(rows) == list(FOUR) and data["tasks"] == ["piqa", "mmlu"]
    assert [rows[v]["layers"] for v in FOUR] == [6, 6, 4, 4]
    manifest = json.loads((run_folder / "manifest.json").read_text())
    for v in FOUR:
        folder = run_folder / manifest["variants"][v]
        ppl = evaluate_perplexity(folder, text=str(held), context_len=64, stride=64, max_tokens=200, progress=False)
        assert rows[v]["perplexity"] == pytest.approx(ppl.perplexity, rel=1e-5)
        acc = evaluate_tasks(folder, tasks=["piqa", "mmlu"], limit=4, progress=False)["average"]["acc"]
        assert rows[v]["mc_acc"] == pytest.approx(acc)
    p = data["predicted_if_independent"]
    ppl = {v: rows[v]["perplexity"] for v in FOUR}
    assert p["perplexity"] == pytest.approx(ppl["pruned"] * ppl["dense-gptq"] / ppl["dense"])
    assert data["interaction"]["perplexity"] == pytest.approx(ppl["pruned-gptq"] / p["perplexity"])
    flat = " ".join(output.split())
    assert " ".join(data["verdict"].split()) in flat and "independence prediction" in flat
    assert "pruning × GPTQ (paper Table 2)" in flat  # the table, with every measured perplexity
    assert all(f"{rows[v]['perplexity']:.2f}" in flat for v in FOUR)
    report = (run_folder / "report.md").read_text()  # the run's report now shows the analysis
    assert "### Pruning × GPTQ (paper Table 2)" in report and "![orthogonality](orthogonality.png)" in report
    assert data["verdict"] in report and f"| dense | 6 | {rows['dense']['perplexity']:.2f} |" in report


def test_a_run_with_the_repaired_pair_measures_it_too(run_dir, tmp_path, data_dir):
    run_folder, held = run_dir
    folder = tmp_path / "run"
    shutil.copytree(run_folder, folder)
    for name, seed in (("repaired", 5), ("repaired-gptq", 6)):
        tiny_llama(folder / name, num_layers=4, seed=seed)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["variants"] |= {"repaired": "repaired", "repaired-gptq": "repaired-gptq"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    code, output = run("analyze", folder, "--what", "orthogonality", "--heldout", held, "--tasks", "piqa", *HELD)
    assert code == 0, output
    data = json.loads((folder / "orthogonality.json").read_text())
    assert list(data["variants"]) == list(FOUR)  # the paper's four, as before
    rep = data["repaired"]
    assert list(rep["variants"]) == ["dense", "dense-gptq", "repaired", "repaired-gptq"]
    ppl = {v: r["perplexity"] for v, r in rep["variants"].items()}
    assert rep["predicted_if_independent"]["perplexity"] == pytest.approx(
        ppl["repaired"] * ppl["dense-gptq"] / ppl["dense"]
    )
    flat = " ".join(output.split())
    assert rep["verdict"].startswith("repaired-gptq perplexity") and " ".join(rep["verdict"].split()) in flat
    assert "The repaired model and its GPTQ" in (folder / "report.md").read_text()


def test_a_run_without_the_gptq_checkpoints(run_dir, tmp_path, data_dir):
    run_folder, held = run_dir
    partial = tmp_path / "run"
    shutil.copytree(run_folder, partial)
    shutil.rmtree(partial / "pruned-gptq")
    for old in partial.glob("orthogonality.*"):  # from the test above
        old.unlink()
    code, output = run("analyze", partial, "--what", "orthogonality", "--heldout", held, *HELD)
    assert code == 2
    assert "has no pruned-gptq checkpoint: build it with a quantize section" in " ".join(output.split())
    assert not (partial / "orthogonality.json").exists()


def _evaluated(ppl, acc, stderr=0.01):
    return {
        "tasks": ["t"],
        "perplexity": {v: {"perplexity": ppl[v]} for v in ppl},
        "accuracy": {
            v: {"average": {"acc": acc[v]}, "tasks": {"t": {"acc": acc[v], "acc_norm": acc[v], "acc_stderr": stderr}}}
            for v in acc
        },
    }


def test_table_predictions_and_verdicts_by_hand():
    ppl = {"dense": 10.0, "dense-gptq": 12.0, "pruned": 30.0, "pruned-gptq": 36.0}
    acc = {"dense": 0.5, "dense-gptq": 0.45, "pruned": 0.4, "pruned-gptq": 0.36}
    table = orthogonality_table(_evaluated(ppl, acc))
    assert table["predicted_if_independent"]["perplexity"] == pytest.approx(36.0)
    assert table["predicted_if_independent"]["retention_pct"] == pytest.approx(80.0 * 90.0 / 100)
    assert table["interaction"]["perplexity"] == pytest.approx(1.0)
    assert table["interaction"]["retention_gap_points"] == pytest.approx(0.0)
    assert table["interaction"]["retention_stderr_points"] == pytest.approx(2.0)  # 0.01 / 0.5 × 100
    assert "no interaction detectable" in table["verdict"]
    worse = orthogonality_table(_evaluated(ppl, acc | {"pruned-gptq": 0.30}))
    assert "worse than independent" in worse["verdict"]
    assert "from the prediction" in verdict(1.1, -3.0, None)


def test_the_repaired_pair_has_its_own_prediction():
    ppl = {"dense": 10.0, "dense-gptq": 12.0, "pruned": 30.0, "pruned-gptq": 36.0, "repaired": 20.0,
           "repaired-gptq": 30.0}  # fmt: skip
    acc = {"dense": 0.5, "dense-gptq": 0.45, "pruned": 0.4, "pruned-gptq": 0.36, "repaired": 0.45,
           "repaired-gptq": 0.405}  # fmt: skip
    table = orthogonality_table(_evaluated(ppl, acc), "repaired")
    assert set(table["variants"]) == {"dense", "dense-gptq", "repaired", "repaired-gptq"}
    assert table["predicted_if_independent"]["perplexity"] == pytest.approx(24.0)  # 20 × 12 / 10
    assert table["interaction"]["perplexity"] == pytest.approx(30.0 / 24.0)
    assert table["verdict"].startswith("repaired-gptq perplexity is 1.25×")


def test_from_a_model_builds_the_four_with_gptq(tmp_path, data_dir):
    pytest.importorskip("gptqmodel")
    model = tiny_llama(tmp_path / "model", num_layers=4, hidden_size=128, num_heads=4)
    rng = random.Random(0)
    calib, held = tmp_path / "calib.txt", tmp_path / "held.txt"
    calib.write_text(" ".join(rng.choice(WORDS) for _ in range(20000)))
    held.write_text(" ".join(rng.choice(WORDS) for _ in range(1500)))
    code, output = run(
        "analyze", model, "--what", "orthogonality", "--calibration", calib, "--heldout", held, "--out",
        tmp_path / "out", "--tasks", "piqa", *HELD,
    )  # fmt: skip
    assert code == 0, output
    data = json.loads((tmp_path / "out" / "orthogonality.json").read_text())
    assert data["run_dir"] == str(tmp_path / "out" / "checkpoints")
    assert [data["variants"][v]["layers"] for v in FOUR] == [4, 4, 3, 3]
    assert json.loads((tmp_path / "out" / "checkpoints" / "pruned-gptq" / "config.json").read_text())[
        "quantization_config"
    ]
