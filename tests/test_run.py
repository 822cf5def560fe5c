"""run.py owns the run folder: typed StageStatus and Manifest (old string statuses still read), schema-versioned
artifacts that load back, variant folders; stages.py's protocol and loop; analyses that never build."""

from __future__ import annotations

import ast
import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from shortgpt_deploy import stages
from shortgpt_deploy.budget import BudgetResult
from shortgpt_deploy.errors import ShortGPTError
from shortgpt_deploy.importance import LayerScores
from shortgpt_deploy.plan import make_plan
from shortgpt_deploy.quantize import QuantizedVariant, QuantizeResult
from shortgpt_deploy.records import BenchSummary, EvalResult, RunRecord
from shortgpt_deploy.report import write_report
from shortgpt_deploy.run import SCHEMA_VERSION, Manifest, RunDir, RunFolderError, StageStatus

PACKAGE = Path(__file__).resolve().parent.parent / "shortgpt_deploy"


# ---------------------------------------------------------------------------------------------- StageStatus
@pytest.mark.parametrize(
    ("legacy", "expected"),
    [
        ("complete", StageStatus("complete")),
        ("complete (dense ppl 34.5, pruned ppl 101.4)", StageStatus("complete", "dense ppl 34.5, pruned ppl 101.4")),
        ("failed: GPTQ ran out of memory", StageStatus("failed", "GPTQ ran out of memory")),
        ("skipped: no section in the recipe", StageStatus("skipped", "no section in the recipe")),
        ("skipped (dry run)", StageStatus("skipped", "dry run")),
        ("not run", StageStatus("not run")),
        ("interrupted", StageStatus("interrupted")),
        # before the servable flag, only the note said a quantized model was for quality only
        ("complete (pruned-gptq: w4a16 g128 in 3 s; w4a16 for a GPU, measured for quality only: no kernel)",
         StageStatus("complete", "pruned-gptq: w4a16 g128 in 3 s; w4a16 for a GPU, measured for quality only: no "
                     "kernel", servable=False)),
    ],
)  # fmt: skip
def test_old_status_strings_parse_into_a_typed_status(legacy, expected):
    status = StageStatus.from_json(legacy)
    assert status == expected
    assert StageStatus.from_json(status.to_json()) == status
    if status.state != "skipped" or status.note != "dry run":  # the one old form rendered differently now
        assert status.text() == legacy


def test_status_json_is_typed_and_keeps_servable():
    s = StageStatus("complete", "w4a16", servable=False)
    assert s.to_json() == {"state": "complete", "note": "w4a16", "servable": False}
    assert StageStatus("failed", "boom").to_json() == {"state": "failed", "note": "boom"}
    assert s.ok and not StageStatus("failed", "boom").ok


# ---------------------------------------------------------------------------------------------- manifest
def test_manifest_round_trip_and_an_old_manifest(tmp_path):
    run = RunDir(tmp_path)
    m = Manifest(inputs={"recipe": {"model": {"path": "offline:tiny"}}}, variants={"dense": "/abs/dense"})
    m.stages = {"prune": StageStatus("complete"), "quantize": StageStatus("failed", "no GPU")}
    run.save_manifest(m)
    on_disk = json.loads(run.manifest_path.read_text())
    assert on_disk["schema_version"] == SCHEMA_VERSION
    assert on_disk["stages"]["quantize"] == {"state": "failed", "note": "no GPU"}
    back = run.load_manifest()
    assert back is not None and back.stages == m.stages and back.variants == m.variants and back.inputs == m.inputs
    assert run.model_path() == "offline:tiny"

    # written before schema versions and typed statuses; and an unknown field from some other version
    old = {"status": "incomplete", "stages": {"eval": "failed: no text"}, "inputs": None, "someday": 1}
    run.manifest_path.write_text(json.dumps(old))
    back = run.load_manifest()
    assert back is not None and back.schema_version == 0 and back.status == "incomplete"
    assert back.stages == {"eval": StageStatus("failed", "no text")}
    assert back.machine == {} and back.git_revision is None and back.inputs == {}  # not this machine's


# ---------------------------------------------------------------------------------------------- artifacts
def test_artifacts_are_versioned_and_load_back(tmp_path):
    run = RunDir(tmp_path)
    scores = LayerScores("ppl_greedy", "tiny", 4, [0.5, math.nan, 0.1, 0.9], [2, 0], {"source": "x"})
    run.save_scores(scores)
    assert json.loads(run.scores_path.read_text())["schema_version"] == SCHEMA_VERSION
    back = run.load_scores()
    assert back is not None and back.scores[:1] == [0.5] and math.isnan(back.scores[1]) and back.removal_order == [2, 0]
    plan = make_plan(num_layers=4, layers=[1, 2])
    run.save_plan(plan)
    assert run.load_plan() == plan
    run.save_quantize({"pruned-gptq": QUANTIZED})
    assert json.loads(run.quantize_path.read_text())["schema_version"] == SCHEMA_VERSION
    assert run.load_quantize() == {"pruned-gptq": QUANTIZED}
    run.save_eval(EVAL)
    assert next(iter(json.loads(run.eval_path.read_text()))) == "schema_version"  # first
    assert run.load_eval() == EVAL
    json_path, png_path = run.save_analysis("ratio-sweep", {"analysis": "ratio-sweep"})
    assert (json_path.name, png_path.name) == ("ratio_sweep.json", "ratio_sweep.png")
    assert run.load_analysis("ratio-sweep") == {"schema_version": SCHEMA_VERSION, "analysis": "ratio-sweep"}
    assert run.load_budget() is None and run.load_repair() is None and run.load_bench_runs() == []
    assert run.load_bench_summary() is None


# Artifacts as the stages make them (typed), and the same files as earlier versions wrote them (no schema_version).
QUANTIZED = QuantizedVariant.of(
    QuantizeResult(Path("/abs/pruned-gptq"), "w4a16", 4, 128, "cpu", "gptqmodel 7.6.0", {"samples": 8}, 42.0),
    folder="pruned-gptq",
    source="pruned",
)
EVAL = EvalResult(
    text="austen:persuasion", context_len=64, stride=32, max_tokens=400, greedy_prompts=2, greedy_tokens=4,
    dtype="float32", perplexity={"dense": {"perplexity": 3.0, "nll_per_token": 1.1, "num_tokens": 399}},
    agreement=[{"variant": "pruned", "reference": "dense", "prompts": 2, "new_tokens": 4, "token_match": 0.5}],
    greedy_tokens_by_variant={"dense": [[1, 2, 3, 4]]}, prompted_perplexity={"gen": {"perplexity": 4.0}},
    gen_variants=["gen"], generation={"pruned": {"reference_perplexity": 9.0, "repetition_rate_4gram": 0.1}},
    tasks=["piqa"], limit=10, accuracy={"dense": {"average": {"acc": 0.6}, "tasks": {}}},
    retention_pct={"dense": 100.0},
    models={"dense": "/m/dense"}, provenance={"git_revision": "abc"},
)  # fmt: skip
PPL_BUDGET = BudgetResult(3, [4, 1, 2, 0], "perplexity", limit_ppl=11.0, baseline_ppl=10.0,
                          ppl_by_n={0: 10.0, 1: 10.2, 2: 10.5, 4: 12.0, 3: 10.9}, settings={"n_max": 4})  # fmt: skip
RETENTION_BUDGET = BudgetResult(
    1, [2, 0], "retention", min_retention_pct=90.0, baseline_acc=0.5, retention_by_n={0: 100.0, 1: 95.0, 2: 60.0},
    accuracy_by_n={0: {"average": {"acc": 0.5}}, 1: {"average": {"acc": 0.475}}, 2: {"average": {"acc": 0.3}}},
)  # fmt: skip
CELL = {"repeats": 1, "median": {"output_tokens_per_s": 100.0}, "tokens_per_s_range": [100.0, 100.0],
        "tokens_per_s_ratio": {"median": 1.0, "min": 1.0, "max": 1.0, "per_repeat": [1.0]}}  # fmt: skip
SUMMARY = BenchSummary(
    baseline="dense", levels=["c1"], flops_per_token={"dense": 300, "pruned": None},
    ideal_ratio={"dense": 1.0, "pruned": None}, variants={"dense": {"c1": CELL}, "pruned": {"c1": CELL}},
    workload={"input_len": 128, "repeats": 1}, ttft_ideal_ratio={"dense": 1.0, "pruned": None}, tokenizer="/tok",
    sources={"dense": "/m/dense", "pruned": "http://127.0.0.1:8000"}, provenance={"load_1min_start_end": [0.5, 1.0]},
)  # fmt: skip
RUNS = [RunRecord(1, "dense", "c1", "ok", "r1-dense-c1.json", 3.5, 0.7), RunRecord(1, "pruned", "c1", "failed",
        message="exit code 3")]  # fmt: skip


@pytest.mark.parametrize("budget", [PPL_BUDGET, RETENTION_BUDGET], ids=["perplexity", "retention"])
def test_budget_round_trip_and_old_files(tmp_path, budget):
    run = RunDir(tmp_path)
    run.save_budget(budget)
    on_disk = json.loads(run.budget_path.read_text())
    assert next(iter(on_disk)) == "schema_version" and on_disk == {"schema_version": SCHEMA_VERSION} | budget.to_dict()
    assert run.load_budget() == budget
    assert set(on_disk) & {"ppl_by_n", "retention_by_n"} == {"ppl_by_n" if budget is PPL_BUDGET else "retention_by_n"}
    run.budget_path.write_text(json.dumps(budget.to_dict()))  # as earlier builds wrote it: string keys, no version
    back = run.load_budget()
    assert back == budget and all(isinstance(n, int) for n in (back.ppl_by_n or back.retention_by_n))


def test_old_quantize_eval_and_bench_files_load(tmp_path):
    run = RunDir(tmp_path)
    entry = QUANTIZED.to_dict() | {"out_dir": str(tmp_path / "pruned-gptq")}  # earlier: an absolute out_dir
    run.quantize_path.write_text(json.dumps({"pruned-gptq": entry, "dense-gptq": entry | {"source": None}}))
    loaded = run.load_quantize()
    assert loaded["pruned-gptq"] == dataclasses.replace(QUANTIZED, out_dir=str(tmp_path / "pruned-gptq"))
    assert loaded["dense-gptq"].source is None and "source" not in loaded["dense-gptq"].to_dict()
    assert run.variant_folders(Manifest.from_json({}))["pruned-gptq"] == tmp_path / "pruned-gptq"
    # an early eval.json: no greedy settings, dtype or optional parts
    early = {"text": "t", "context_len": 512, "stride": 256, "max_tokens": 4096, "perplexity": {"dense": {}}}
    run.eval_path.write_text(json.dumps(early))
    e = run.load_eval()
    assert e is not None and (e.text, e.max_tokens, e.agreement, e.accuracy, e.generation) == ("t", 4096, [], {}, None)
    assert e.to_dict().items() >= early.items()
    # bench as bench.py wrote it before RunDir did: no schema_version, no trailing newline; a summary by hand
    run.bench.mkdir()
    run.bench_summary_path.write_text(json.dumps(SUMMARY.to_dict(), indent=2))
    run.bench_runs_path.write_text(json.dumps([r.to_dict() for r in RUNS], indent=2))
    assert run.load_bench_summary() == SUMMARY and run.load_bench_runs() == RUNS
    bare = {k: v for k, v in SUMMARY.to_dict().items() if k in ("baseline", "levels", "flops_per_token",
            "ideal_ratio", "variants")}  # fmt: skip
    run.bench_summary_path.write_text(json.dumps(bare))
    assert run.load_bench_summary().to_dict() == bare  # what it lacks stays absent
    run.bench_runs_path.write_text(json.dumps([{"repeat": 1, "variant": "a", "level": "c1", "status": "ok"}]))
    assert run.load_bench_runs() == [RunRecord(1, "a", "c1", "ok")]


def test_bench_files_keep_their_layout(tmp_path):
    run = RunDir(tmp_path)
    run.save_bench_summary(SUMMARY)
    run.save_bench_runs(RUNS)
    keys = ["schema_version", "baseline", "levels", "flops_per_token", "ideal_ratio", "variants", "workload",
            "ttft_ideal_ratio", "tokenizer", "sources", "provenance"]  # fmt: skip
    assert list(json.loads(run.bench_summary_path.read_text())) == keys
    assert run.load_bench_summary() == SUMMARY
    runs = json.loads(run.bench_runs_path.read_text())  # a list, as earlier reports read it
    assert list(runs[0]) == [
        "repeat",
        "variant",
        "level",
        "status",
        "result_file",
        "duration_s",
        "load_1min",
        "message",
        "seed",
    ]
    assert run.load_bench_runs() == RUNS
    assert run.bench_result("r1-dense-c1") == run.bench / "r1-dense-c1.json"
    assert run.bench_log("r1-dense-server") == run.bench_logs / "r1-dense-server.log"


@pytest.mark.parametrize(
    ("path", "content", "load"),
    [
        ("budget.json", {"criterion": "perplexity"}, lambda r: r.load_budget()),
        ("budget.json", {"n_remove": 2, "order": [1, 0], "ppl_by_n": {"one": 1.0}}, lambda r: r.load_budget()),
        ("quantize.json", {"pruned-gptq": {"scheme": "w4a16"}}, lambda r: r.load_quantize()),
        ("quantize.json", {"pruned-gptq": "w4a16"}, lambda r: r.load_quantize()),
        ("eval.json", {"ok": True}, lambda r: r.load_eval()),
        ("eval.json", ["not", "an", "object"], lambda r: r.load_eval()),
        ("bench/summary.json", {"baseline": "a", "levels": []}, lambda r: r.load_bench_summary()),
        ("bench/runs.json", {"runs": []}, lambda r: r.load_bench_runs()),
        ("bench/runs.json", [{"status": "ok"}], lambda r: r.load_bench_runs()),
        ("ratio_sweep.json", ["x"], lambda r: r.load_analysis("ratio-sweep")),
    ],
)
def test_a_foreign_artifact_is_a_run_folder_error(tmp_path, path, content, load):
    (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / path).write_text(json.dumps(content))
    with pytest.raises(RunFolderError, match=rf"{path} is not a file shortgpt-deploy wrote .*; re-run .* or delete it"):
        load(RunDir(tmp_path))


@pytest.mark.parametrize("path", ["budget.json", "eval.json", "bench/summary.json", "metrics.json"])
def test_a_newer_or_damaged_artifact_is_a_run_folder_error(tmp_path, path):
    run = RunDir(tmp_path)
    load = {"budget.json": run.load_budget, "eval.json": run.load_eval, "bench/summary.json": run.load_bench_summary,
            "metrics.json": lambda: run.load_analysis("metrics")}[path]  # fmt: skip
    (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / path).write_text(json.dumps({"schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(RunFolderError, match=rf"{path} has schema_version {SCHEMA_VERSION + 1}, newer .*upgrade"):
        load()
    (tmp_path / path).write_text('{"baseline": ')
    with pytest.raises(RunFolderError, match=rf"cannot read .*{path}.*re-run the stage that writes it"):
        load()


def test_scores_without_a_schema_version_still_load(tmp_path):
    scores = LayerScores("bi", "tiny", 2, [0.1, 0.2], [0, 1], {})
    scores.save(tmp_path / "scores.json")  # the format `shortgpt-deploy score` and earlier builds wrote
    assert "schema_version" not in json.loads((tmp_path / "scores.json").read_text())
    assert RunDir(tmp_path).load_scores() == scores


def test_variant_folders_from_the_manifest_or_from_what_an_old_folder_has(tmp_path):
    run = RunDir(tmp_path / "run")
    (run.root / "pruned").mkdir(parents=True)
    run.save_quantize({"pruned-gptq": QUANTIZED})
    old = Manifest.from_json({"inputs": {"checkpoint": {"path": "/models/dense"}}})
    assert run.variant_folders(old) == {
        "dense": Path("/models/dense"), "pruned": run.root / "pruned", "pruned-gptq": run.root / "pruned-gptq"
    }  # fmt: skip
    new = Manifest.from_json({"variants": {"dense": "/models/d2", "gen": "gen"}})
    assert run.variant_folders(new)["gen"] == run.root / "gen"
    assert run.variant_folders(new)["dense"] == Path("/models/d2")


def test_not_a_run_folder_and_a_damaged_artifact(tmp_path):
    with pytest.raises(RunFolderError, match="not a run folder: it does not exist; run `shortgpt-deploy build"):
        RunDir(tmp_path / "nope").require()
    run = RunDir(tmp_path)
    run.eval_path.write_text("{")
    with pytest.raises(RunFolderError, match="cannot read .*eval.json.*re-run the stage that writes it"):
        run.load_eval()


def test_the_report_reads_servable_from_the_typed_status(tmp_path):
    run = RunDir(tmp_path)
    run.save_plan(make_plan(num_layers=4, layers=[1]))
    m = Manifest.from_json({"status": "complete"})
    m.stages["quantize"] = StageStatus("complete", "w4a16 for a GPU, made elsewhere", servable=False)
    run.save_manifest(m)
    report = write_report(run.root).read_text()
    assert "Quantize stage: w4a16 for a GPU, made elsewhere." in report  # no "quality only" in it
    assert "| quantize | complete (w4a16 for a GPU, made elsewhere) |" in report
    m.stages["quantize"] = StageStatus("complete", "w4a16 for a GPU, made elsewhere", servable=True)
    run.save_manifest(m)
    assert "Quantize stage:" not in write_report(run.root).read_text()


# ---------------------------------------------------------------------------------------------- stages
def _ctx(tmp_path: Path, **sections) -> stages.StageContext:
    return stages.StageContext(SimpleNamespace(**sections), RunDir(tmp_path), Manifest.from_json({}), progress=False)


def test_the_stages_are_one_ordered_list():
    names = [s.name for s in stages.STAGES]
    assert names == ["score", "plan", "prune", "repair", "quantize", "eval", "bench"]
    assert [s.name for s in stages.STAGES if s.makes_folder] == ["score", "plan", "prune"]
    assert all(callable(s.run) and isinstance(s.needs, tuple) for s in stages.STAGES)
    # the stages that make the folder come first: build runs them in its transaction, then the rest
    assert [s.makes_folder for s in stages.STAGES] == sorted((s.makes_folder for s in stages.STAGES), reverse=True)


def test_a_stage_without_the_checkpoint_it_needs_fails_without_running(tmp_path):
    ran = []
    ctx = _ctx(tmp_path, repair={})
    ctx.manifest.variants = {"dense": "/models/dense"}
    status = stages.run_stage(stages.SectionStage("repair", ("dense", "pruned"), lambda c: ran.append(1)), ctx)
    assert ran == [] and status.state == "failed" and "the pruned checkpoint was not built" in status.note
    assert ctx.run.load_manifest().stages["repair"] == status  # recorded and saved


def test_a_stage_that_makes_the_folder_propagates_its_error(tmp_path):
    def broken(ctx):
        raise ShortGPTError("calibration file is empty")

    ctx = _ctx(tmp_path, prune=SimpleNamespace(layers=[1], plot=False))
    with pytest.raises(ShortGPTError, match="calibration file is empty"):
        stages.run_stage(stages.FolderStage("plan", broken), ctx)
    skipped = stages.run_stage(stages.STAGES[0], ctx)  # score: explicit layers without a plot need no scores
    assert skipped == StageStatus("skipped", "explicit layers: nothing to score")


def test_run_stage_skips_records_failures_and_marks_an_interruption(tmp_path):
    def wrote(ctx):
        ctx.run.save_eval(EVAL)
        return StageStatus("complete", "measured")

    def broken(ctx):
        raise ShortGPTError("the text is missing; give eval.text")

    ctx = _ctx(tmp_path, eval={}, bench=None)
    assert stages.run_stage(stages.SectionStage("bench", (), wrote), ctx) == StageStatus(
        "skipped", "no section in the recipe"
    )
    assert stages.run_stage(stages.SectionStage("eval", (), wrote), ctx) == StageStatus("complete", "measured")
    assert ctx.run.load_eval() is not None and "eval" in ctx.manifest.timings_s
    assert stages.run_stage(stages.SectionStage("eval", (), broken), ctx) == StageStatus(
        "failed", "the text is missing; give eval.text"
    )

    def interrupted(ctx):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stages.run_stage(stages.SectionStage("eval", (), interrupted), ctx)
    saved = ctx.run.load_manifest()
    assert saved is not None and saved.status == "interrupted" and saved.stages["eval"].state == "interrupted"


def test_variant_dir_names_a_missing_checkpoint(tmp_path):
    ctx = _ctx(tmp_path)
    ctx.add_variant("repaired")
    assert ctx.variant_dir("repaired") == tmp_path / "repaired"
    assert ctx.run.load_manifest().variants == {"repaired": "repaired"}  # saved at once
    with pytest.raises(ShortGPTError, match="the pruned checkpoint was not built"):
        ctx.variant_dir("pruned")


# ---------------------------------------------------------------------------------------------- one direction
def _imports(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {a.name for a in node.names}
    return found


@pytest.mark.parametrize("module", ["analyze", "orthogonality", "analyze_plots", "report", "serving_tables"])
def test_analyses_and_the_report_never_build(module):
    """analyze → orthogonality → pipeline → report → analyze was a cycle: readers of run folders import no
    pipeline, no stage runner, and the report no analysis."""
    imported = _imports(module)
    assert not imported & {"pipeline", "stages"}, imported
    if module == "report":
        assert "analyze" not in imported and "orthogonality" not in imported, imported


def test_analysis_names_cover_the_analyzers():
    from shortgpt_deploy.analyze import ANALYZERS
    from shortgpt_deploy.analyze_plots import PLOTTERS
    from shortgpt_deploy.run import ANALYSES

    assert set(ANALYSES) == set(ANALYZERS) | {"orthogonality"} == set(PLOTTERS)


def test_orthogonality_of_a_model_is_built_by_the_pipeline_then_analyzed(tmp_path, monkeypatch):
    """Only pipeline.analyze_model builds; the analysis gets the run folder it built."""
    from shortgpt_deploy import analyze, orthogonality, pipeline

    calls = []
    monkeypatch.setattr(orthogonality, "check_tasks", lambda settings: calls.append("tasks") or ("mmlu",))

    def built(model, settings, run_dir, *, progress):
        calls.append(("build", model, run_dir))
        return run_dir

    monkeypatch.setattr(pipeline, "orthogonality_checkpoints", built)
    monkeypatch.setattr(analyze, "run_analysis", lambda model, **kw: calls.append(("analyze", model, kw["out_dir"])))
    out = tmp_path / "out"
    pipeline.analyze_model("offline:tiny", what="orthogonality", settings=SimpleNamespace(), out_dir=out)
    run = out / "checkpoints"
    assert calls == ["tasks", ("build", "offline:tiny", run), ("analyze", str(run), out)]
    calls.clear()
    pipeline.analyze_model("offline:tiny", what="metrics", settings=SimpleNamespace(), out_dir=out)
    assert calls == [("analyze", "offline:tiny", out)]  # the other analyses load the model themselves


def test_the_orthogonality_analysis_wants_a_run_folder(tmp_path, monkeypatch):
    from shortgpt_deploy import orthogonality

    monkeypatch.setattr(orthogonality, "check_tasks", lambda settings: ("mmlu",))
    with pytest.raises(orthogonality.OrthogonalityError, match="not a build's run folder; give one with the four"):
        orthogonality.orthogonality_analysis(str(tmp_path), SimpleNamespace(), progress=False)
