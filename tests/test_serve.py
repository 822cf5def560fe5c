"""Serving: the server's command line, its errors, and a real vLLM server answering like transformers."""

import asyncio
import json
import os
import signal
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from helpers import calibration
from tiny import tiny_llama

from shortgpt_deploy.errors import ModelLoadError
from shortgpt_deploy.plan import make_plan
from shortgpt_deploy.serve import (
    METRICS_GUARD,
    SERVING_DIR,
    ServeError,
    ServeOptions,
    VLLMServer,
    curl_example,
    exposure_warnings,
    load_preset,
    mask,
    options_for,
    read_api_key,
    server_env,
    vllm_argv,
)
from shortgpt_deploy.surgery import prune_checkpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_argv_binds_loopback_and_uses_our_entry_point(tmp_path):
    argv = vllm_argv(ServeOptions(model_dir=tmp_path / "m", port=8123, api_key="secret-key-123"))
    assert argv[1:4] == ["-m", "shortgpt_deploy.vllm_cli", "serve"]
    assert argv[4] == "m"  # the folder's name, never its absolute path (it shows in /v1/models)
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == "8123"
    assert argv[argv.index("--served-model-name") + 1] == "m"
    assert argv[argv.index("--dtype") + 1] in ("float32", "bfloat16", "auto")
    # The key travels in the environment: a command line is visible to every local user in `ps`.
    assert "--api-key" not in argv and not any("secret-key-123" in a for a in argv)
    assert argv[argv.index("--middleware") + 1] == METRICS_GUARD


def test_api_key_only_in_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "inherited")
    assert server_env(ServeOptions(model_dir=tmp_path, api_key="mine"))["VLLM_API_KEY"] == "mine"
    assert "VLLM_API_KEY" not in server_env(ServeOptions(model_dir=tmp_path))  # no stale key from the shell
    assert "--middleware" not in vllm_argv(ServeOptions(model_dir=tmp_path, api_key="k", public_metrics=True))
    assert "--middleware" not in vllm_argv(ServeOptions(model_dir=tmp_path))


@pytest.mark.parametrize("arg", ["--api-key", "--api-key=k", "--host", "--port"])
def test_extra_args_cannot_take_over_our_flags(tmp_path, arg):
    preset = {"defaults": {"extra_args": ["--enforce-eager", arg, "x"]}, "variants": {}}
    with pytest.raises(ServeError, match=f"extra_args may not set {arg.split('=')[0]}"):
        options_for(tmp_path, variant="pruned", preset=preset, overrides={})


def test_exposure_warnings(tmp_path):
    assert exposure_warnings(ServeOptions(model_dir=tmp_path)) == []
    assert exposure_warnings(ServeOptions(model_dir=tmp_path, host="localhost")) == []
    (open_to_all,) = exposure_warnings(ServeOptions(model_dir=tmp_path, host="0.0.0.0"))
    assert "no API key" in open_to_all and "--api-key-file" in open_to_all and "VLLM_API_KEY" in open_to_all
    assert exposure_warnings(ServeOptions(model_dir=tmp_path, host="0.0.0.0", api_key="k")) == []
    (metrics,) = exposure_warnings(ServeOptions(model_dir=tmp_path, host="10.0.0.5", api_key="k", public_metrics=True))
    assert "/metrics" in metrics


def test_read_api_key(tmp_path):
    assert read_api_key("k", None) == "k" and read_api_key(None, None) is None and read_api_key("", None) is None
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert read_api_key(None, key_file) == "from-file"
    with pytest.raises(ServeError, match="not both"):
        read_api_key("k", key_file)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ServeError, match="empty"):
        read_api_key(None, tmp_path / "empty")
    with pytest.raises(ServeError, match="cannot read"):
        read_api_key(None, tmp_path / "missing")


def test_mask_and_curl_keep_the_key_out():
    key = "sk-0123456789abcdef"
    assert key not in mask(key) and "sk-" in mask(key) and mask("short") == "****"
    opts = ServeOptions(model_dir=Path("/somewhere/pruned"), api_key=key)
    example = curl_example(opts)
    assert key not in example and "$VLLM_API_KEY" in example and '"model": "pruned"' in example


def _asgi_status(app, path: str, headers: list[tuple[bytes, bytes]]) -> int:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": path, "headers": headers, "method": "GET"}
    asyncio.run(app(scope, receive, send))
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


def test_metrics_guard(monkeypatch):
    from shortgpt_deploy.metrics_guard import MetricsGuard

    async def inner(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    monkeypatch.setenv("VLLM_API_KEY", "right")
    guard = MetricsGuard(inner)
    assert _asgi_status(guard, "/metrics", []) == 401
    assert _asgi_status(guard, "/metrics", [(b"authorization", b"Bearer wrong")]) == 401
    assert _asgi_status(guard, "/metrics", [(b"authorization", b"Bearer right")]) == 200
    assert _asgi_status(guard, "/health", []) == 200  # only /metrics is ours to guard


def test_env_binds_all_our_cores(tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    env = server_env(ServeOptions(model_dir=tmp_path))
    if not torch.cuda.is_available():
        assert env["VLLM_CPU_OMP_THREADS_BIND"].split(",") == [str(c) for c in sorted(os.sched_getaffinity(0))]


def test_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        VLLMServer(ServeOptions(model_dir=tmp_path), tmp_path / "log").start()


def test_port_in_use(tmp_path):
    model = tiny_llama(tmp_path / "m")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ServeError, match=f"port {port} on 127.0.0.1 is in use.*--port"):
            VLLMServer(ServeOptions(model_dir=model, port=port), tmp_path / "log").start()


@pytest.mark.parametrize("name", sorted(p.stem for p in SERVING_DIR.glob("*.yaml")))
def test_every_shipped_preset_gives_options(name, tmp_path):
    preset = load_preset(name)
    for variant in ("dense", "pruned", "dense-gptq", "pruned-gptq"):
        opts = options_for(tmp_path, variant=variant, preset=preset, overrides={}, port=9000)
        assert opts.host == "127.0.0.1" and opts.port == 9000


def test_preset_then_variant_then_recipe_override(tmp_path):
    preset = load_preset("cpu")
    assert options_for(tmp_path, variant="pruned", preset=preset, overrides={}).dtype == "auto"
    assert options_for(tmp_path, variant="pruned-gptq", preset=preset, overrides={}).dtype == "bfloat16"
    opts = options_for(
        tmp_path, variant="pruned-gptq", preset=preset, overrides={"dtype": "float16", "kv_cache_gib": None}
    )
    assert opts.dtype == "float16" and opts.kv_cache_gib == 2  # None means "not given": the preset's value stays
    tp = options_for(tmp_path, variant="dense", preset=load_preset("gpu-tp2"), overrides={})
    assert tp.tensor_parallel_size == 2 and "--gpu-memory-utilization" in tp.extra_args


def test_unknown_preset_and_unknown_preset_key(tmp_path):
    with pytest.raises(ServeError, match="serving preset 'tpu' not found.*known presets: cpu, gpu"):
        load_preset("tpu")
    bad = tmp_path / "mine.yaml"
    bad.write_text("defaults: {kv_cache_gb: 4}\n")
    with pytest.raises(ServeError, match="unknown key.*kv_cache_gb"):
        load_preset(str(bad))


def test_preset_values_are_checked_by_the_recipes_serve_model(tmp_path):
    bad = tmp_path / "mine.yaml"
    bad.write_text("defaults: {max_model_len: 2048}\nvariants:\n  pruned: {kv_cache_gib: 0}\n")
    with pytest.raises(ServeError, match=r"mine.yaml: variants\.pruned\.kv_cache_gib: .*greater than or equal to 1"):
        load_preset(str(bad))


@pytest.mark.vllm
def test_server_that_dies_while_starting_reports_its_log(tmp_path):
    pytest.importorskip("vllm")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    server = VLLMServer(ServeOptions(model_dir=bad, port=free_port()), tmp_path / "log")
    with pytest.raises(ServeError, match="vLLM exited with code") as err:
        server.start()
    assert "last lines of" in str(err.value)
    assert not server.alive()
    with pytest.raises(ProcessLookupError):  # nothing of its process group is left, engine included
        os.killpg(server.proc.pid, 0)


def get(url: str, key: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, ""


def completion(url: str, model: str, prompt: list[int], n: int, key: str | None = None) -> list[int]:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": n,
        "temperature": 0.0,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    req = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(), headers)
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())["choices"][0]["token_ids"]


@pytest.mark.vllm
def test_served_pruned_and_repaired_model_answers_like_transformers(tmp_path):
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM

    from shortgpt_deploy.repair import repair_checkpoint

    src = tiny_llama(tmp_path / "src", num_layers=6, seed=2, hidden_size=128, num_heads=4)
    pruned = tmp_path / "pruned"
    prune_checkpoint(src, make_plan(num_layers=6, layers=[1, 4]), out_dir=pruned, progress=False)
    # Served: the pruned model repaired (linear), a stock checkpoint with some weights changed.
    out = tmp_path / "repaired"
    repair_checkpoint(src, pruned, out_dir=out, calibration=calibration(vocab=70), method="linear", progress=False)
    from safetensors.torch import load_file

    before, after = load_file(pruned / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    prompts, n = [[1, 5, 9, 13, 40, 22], [1, 70, 8, 8, 33]], 10
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    expected = []
    for p in prompts:
        ids = torch.tensor([p])
        gen = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False
        )
        expected.append(gen[0, len(p) :].tolist())

    key = "test-key-0123456789"
    opts = ServeOptions(
        model_dir=out, port=free_port(), dtype="float32", max_model_len=256, kv_cache_gib=1, api_key=key
    )
    with VLLMServer(opts, tmp_path / "serve.log") as server:
        pgid = os.getpgid(server.proc.pid)
        got = [completion(opts.url, "repaired", p, n, key) for p in prompts]
        # Exposure: the model goes by its folder's name, the key is needed for /v1 and /metrics alike, and no
        # process of the server shows the key on its command line.
        status, models = get(opts.url + "/v1/models", key)
        assert status == 200 and json.loads(models)["data"][0]["id"] == "repaired"
        assert str(tmp_path) not in models
        assert get(opts.url + "/v1/models")[0] == 401
        assert get(opts.url + "/metrics")[0] == 401
        status, metrics = get(opts.url + "/metrics", key)
        assert status == 200 and "vllm:" in metrics
        cmdlines = [p.read_bytes() for p in Path("/proc").glob("[0-9]*/cmdline") if _in_group(p.parent, pgid)]
        assert len(cmdlines) >= 2 and not any(key.encode() in c for c in cmdlines)  # API server and engine core
    assert got == expected
    with pytest.raises(ProcessLookupError):  # the whole process group is gone, workers included
        os.killpg(pgid, signal.SIGCONT)
    assert Path(tmp_path / "serve.log").read_text()


def _in_group(proc_dir: Path, pgid: int) -> bool:
    try:
        return os.getpgid(int(proc_dir.name)) == pgid
    except (ProcessLookupError, PermissionError):
        return False


def test_fit_to_model_caps_the_context_at_the_models_own(tmp_path):
    from shortgpt_deploy.serve import fit_to_model

    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 2, "max_position_embeddings": 512}))
    assert fit_to_model(ServeOptions(tmp_path, max_model_len=2048)).max_model_len == 512
    assert fit_to_model(ServeOptions(tmp_path, max_model_len=256)).max_model_len == 256
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))  # no limit stated: left as asked
    assert fit_to_model(ServeOptions(tmp_path, max_model_len=2048)).max_model_len == 2048


def test_gen_checkpoint_is_served_without_prefix_caching(tmp_path):
    """A cached prompt would be recomputed from its last token only, which runs every layer: the gen rule would
    depend on earlier requests. Off for gen folders, unless extra_args decides."""
    gen = {"format": 1, "skip_prefill_layers": [1], "rotate_skipped_keys": True, "architecture": "LlamaForCausalLM"}
    config = {"architectures": ["ShortGPTGenLlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 3}
    (tmp_path / "gen").mkdir()
    (tmp_path / "gen" / "config.json").write_text(json.dumps({**config, "shortgpt_gen": gen}))
    (tmp_path / "dense").mkdir()
    (tmp_path / "dense" / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"]}))
    assert "--no-enable-prefix-caching" in vllm_argv(ServeOptions(model_dir=tmp_path / "gen"))
    assert "--no-enable-prefix-caching" not in vllm_argv(ServeOptions(model_dir=tmp_path / "dense"))
    chosen = vllm_argv(ServeOptions(model_dir=tmp_path / "gen", extra_args=("--enable-prefix-caching",)))
    assert "--no-enable-prefix-caching" not in chosen and "--enable-prefix-caching" in chosen
