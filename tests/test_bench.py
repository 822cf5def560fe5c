"""Serving benchmark: SLO parsing, the summary math, FLOP counting, run bookkeeping, serving options (preset,
--dtype) per variant, and one real vLLM run."""

import http.server
import json
import socket
import sys
import threading

import pytest
from helpers import hand_made_summary
from typer.testing import CliRunner

from shortgpt_deploy import bench
from shortgpt_deploy.bench import (
    BenchError,
    BenchIncompleteError,
    Level,
    Slo,
    Variant,
    Workload,
    flops_per_token,
    levels_from,
    parse_slo,
    parse_variant,
    prefill_flops_per_token,
    run_benchmark,
    summarize,
    ttft_ideal_ratios,
)
from shortgpt_deploy.cli import app
from shortgpt_deploy.plan import make_plan
from shortgpt_deploy.run import RunDir
from shortgpt_deploy.serving_tables import bench_context
from shortgpt_deploy.surgery import prune_checkpoint


# ------------------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize(
    ("text", "slo"),
    [("ttft:500", Slo("ttft", 500.0)), ("tpot:50.5", Slo("tpot", 50.5)), (" e2el : 2000 ", Slo("e2el", 2000.0))],
)
def test_good_slos(text, slo):
    assert parse_slo(text) == slo
    assert str(parse_slo(text)) == f"{slo.metric}:{slo.limit_ms:g}"  # what vLLM's --goodput receives


@pytest.mark.parametrize("text", ["ttft", "ttft=500", "ttft:abc", "itl:5", "TTFT:5", "ttft:-1", "ttft:0", "a:1:2", ""])
def test_bad_slos_name_the_string_and_the_form(text):
    with pytest.raises(BenchError, match=r"bad SLO .*expected METRIC:MILLISECONDS.*ttft, tpot, e2el") as err:
        parse_slo(text)
    assert repr(text) in str(err.value)


def test_levels_and_variants():
    assert [lv.label for lv in levels_from(None, None)] == ["c1", "c4"]
    assert [lv.argv() for lv in levels_from(None, "0.5,2")] == [["--request-rate", "0.5"], ["--request-rate", "2"]]
    for conc, rate in [("1,4", "2"), ("1,x", None), ("0", None)]:
        with pytest.raises(BenchError):
            levels_from(conc, rate)
    with pytest.raises(BenchError, match="each once"):
        Workload(levels=(Level(max_concurrency=1), Level(max_concurrency=1)))
    assert parse_variant("pruned=runs/x/pruned").model_dir.name == "pruned"
    assert parse_variant("far=http://127.0.0.1:9/", endpoint=True).endpoint == "http://127.0.0.1:9"
    for text in ["pruned", "=dir", "a b=dir"]:
        with pytest.raises(BenchError):
            parse_variant(text)


# ------------------------------------------------------------------------------------------ summary math
def test_medians_and_paired_ratios():
    s = hand_made_summary()
    assert s["baseline"] == "dense" and s["ideal_ratio"] == {"dense": 1.0, "pruned": 1.25}
    dense, pruned = s["variants"]["dense"]["c1"], s["variants"]["pruned"]["c1"]
    assert dense["median"]["output_tokens_per_s"] == 105.0 and dense["median"]["p50_ttft_ms"] == 45.0
    assert dense["median"]["p99_ttft_ms"] == pytest.approx(45.0 * 99 / 50)
    assert pruned["median"]["p90_tpot_ms"] == 100.0 and pruned["median"]["failed"] == 0
    # Per-repeat ratios 120/100 = 1.2 and 143/110 = 1.3, paired by repeat (not a ratio of medians).
    r = pruned["tokens_per_s_ratio"]
    assert r["per_repeat"] == pytest.approx([1.2, 1.3]) and r["median"] == pytest.approx(1.25)
    assert (r["min"], r["max"]) == pytest.approx((1.2, 1.3))
    assert dense["tokens_per_s_ratio"]["median"] == 1.0
    c4 = s["variants"]["pruned"]["c4"]
    assert c4["repeats"] == 1 and c4["tokens_per_s_ratio"]["per_repeat"] == pytest.approx([1.2])


# ------------------------------------------------------------------------------------------ FLOPs
LAYER = 16 * 16 * 2 + 16 * 8 * 2 + 3 * 16 * 32 + 2 * 16  # q,o + k,v (2 kv heads of 4) + mlp + 2 norms = 2336
HEAD = 100 * 16


def tiny_checkpoint(folder, tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=100,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("tied", [False, True])
def test_flops_per_token_and_ideal_ratio(tmp_path, tied):
    src = tiny_checkpoint(tmp_path / "src", tied)
    out = tmp_path / "pruned"
    prune_checkpoint(src, make_plan(num_layers=4, layers=[2]), out_dir=out, progress=False)
    assert flops_per_token(src) == 2 * 4 * LAYER + 2 * HEAD == 21888  # embedding lookups cost nothing
    assert flops_per_token(out) == 2 * 3 * LAYER + 2 * HEAD == 17216
    s = summarize([], variants=["dense", "pruned"], levels=["c1"], flops={"dense": 21888, "pruned": 17216})
    assert s["ideal_ratio"]["pruned"] == pytest.approx(21888 / 17216)


def test_prefill_flops_of_dense_pruned_and_gen_folders(tmp_path):
    """By hand for hidden 16, MLP 32, 4 heads of 4 (2 kv), a 10-token prompt: per layer qkv 2·16·8·4 = 1024,
    o_proj 2·16·16 = 512, MLP 2·3·16·32 = 3072, attention 4·16·5 = 320 → 4928; a skipped layer pays its qkv."""
    from shortgpt_deploy.gen import write_gen_checkpoint

    src = tiny_checkpoint(tmp_path / "src", tied=False)
    prune_checkpoint(src, make_plan(num_layers=4, layers=[1, 2]), out_dir=tmp_path / "pruned", progress=False)
    write_gen_checkpoint(src, make_plan(num_layers=4, layers=[1, 2]), out_dir=tmp_path / "gen")
    assert prefill_flops_per_token(src, 10) == 4 * 4928
    assert prefill_flops_per_token(tmp_path / "pruned", 10) == 2 * 4928
    assert prefill_flops_per_token(tmp_path / "gen", 10) == 2 * 4928 + 2 * 1024
    variants = [Variant(n, model_dir=tmp_path / n) for n in ("src", "pruned", "gen")] + [Variant("x", endpoint="u")]
    ratios = ttft_ideal_ratios(variants, 10)
    assert ratios == {"src": 1.0, "pruned": 2.0, "gen": pytest.approx(4 * 4928 / (2 * 4928 + 2 * 1024)), "x": None}
    assert set(ttft_ideal_ratios(variants, None).values()) == {None}  # prompts from a file: no single length


# ------------------------------------------------------------------------------------------ set-up errors
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_workload_from_the_recipe_section_and_from_the_cli(tmp_path, monkeypatch):
    from shortgpt_deploy.recipe import BenchSpec

    assert [lv.label for lv in Workload.from_spec(BenchSpec()).levels] == ["c1", "c4"]
    assert [lv.label for lv in Workload.from_spec(BenchSpec(concurrency=[])).levels] == ["c1", "c4"]
    spec = BenchSpec(request_rates_per_s=[0.5, 2.0], slos=["ttft:500"], num_prompts=5, dataset=None)
    assert Workload.from_spec(spec) == Workload(
        num_prompts=5, levels=levels_from(None, "0.5,2"), slos=(parse_slo("ttft:500"),)
    )
    got = {}

    def stop(variants, workload, **kwargs):
        got.update(workload=workload, **kwargs)
        raise BenchError("stopped by the test")

    monkeypatch.setattr(bench, "run_benchmark", stop)

    def cli(*args):
        got.clear()
        result = CliRunner().invoke(app, ["bench", "--out", str(tmp_path), "--variant", "a=x", *args])
        assert result.exit_code == 2, result.output
        return " ".join(result.output.split())

    assert "stopped by the test" in cli()
    assert got["workload"] == Workload() and got["timeout_s"] == 900.0  # the CLI's defaults, not the section's
    assert got["restart"] == "per_repeat" and BenchSpec().restart == "once"  # bench is the thorough one
    cli("--restart", "once")
    assert got["restart"] == "once"
    assert "--restart: Input should be 'per_repeat' or 'once'" in cli("--restart", "never") and not got
    cli("--concurrency", "2, 8", "--slo", "tpot:50", "--num-prompts", "3", "--timeout-s", "60")
    assert [lv.label for lv in got["workload"].levels] == ["c2", "c8"] and got["workload"].num_prompts == 3
    assert got["workload"].slos == (parse_slo("tpot:50"),) and got["timeout_s"] == 60.0
    cli("--request-rate", "0.5,2")
    assert [lv.label for lv in got["workload"].levels] == ["r0.5", "r2"]
    for args, message in [
        (["--input-len", "0"], "--input-len must be at least 1, got 0"),
        (["--warmups", "-1"], "--warmups must be at least 0, got -1"),
        (["--concurrency", "1,x"], "--concurrency: Input should be a valid integer"),
        (["--request-rate", "fast"], "--request-rate: Input should be a valid number"),
        (["--concurrency", "0"], "a load level is a positive max concurrency or request rate"),
        (["--slo", "ttft"], "bad SLO 'ttft'"),
    ]:
        assert message in cli(*args) and not got


def test_no_variants(tmp_path):
    with pytest.raises(BenchError, match="no variants to benchmark"):
        run_benchmark([], Workload(), out_dir=tmp_path)
    result = CliRunner().invoke(app, ["bench", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "no variants to benchmark" in result.output


def test_unreachable_endpoint(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(BenchError, match=f"endpoint remote at {url} is unreachable"):
        run_benchmark([Variant("remote", endpoint=url)], Workload(), out_dir=tmp_path, tokenizer=tmp_path)
    assert not (tmp_path / "bench").exists()  # checked before anything runs


# ------------------------------------------------------------------------------------------ run bookkeeping
class FakeServer(http.server.ThreadingHTTPServer):
    """Answers GET /v1/models like vLLM; shut it down to play a server that died."""

    def __init__(self) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                body = json.dumps({"data": [{"id": "fake-model"}]}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


@pytest.fixture
def fake():
    server = FakeServer()
    yield server
    if server.socket.fileno() != -1:
        server.stop()


def fake_client(code: str):
    """Replace vLLM's client by `python -c code`; the code sees the result path as sys.argv[1]."""

    def argv(plan, target, level, result_name, seed):
        assert target.model == "fake-model" and level.label in ("c1", "c4")
        return [sys.executable, "-c", code, str(plan.bench_dir / result_name)]

    return argv


def statuses(tmp_path) -> list[str]:
    return [r["status"] for r in json.loads((tmp_path / "bench" / "runs.json").read_text())]


def test_runs_are_interleaved_and_summarised(tmp_path, fake, monkeypatch):
    order = []
    code = "import json, sys; json.dump({'output_throughput': 100.0, 'failed': 0}, open(sys.argv[1], 'w'))"

    def argv(plan, target, level, result_name, seed):
        order.append(result_name)
        return fake_client(code)(plan, target, level, result_name, seed)

    monkeypatch.setattr(bench, "bench_argv", argv)
    variants = [Variant("a", endpoint=fake.url), Variant("b", endpoint=fake.url)]
    summary = run_benchmark(variants, Workload(repeats=2), out_dir=tmp_path, tokenizer=tmp_path)
    assert order == [f"r{r}-{v}-{c}.json" for r in (1, 2) for v in "ab" for c in ("c1", "c4")]
    assert statuses(tmp_path) == ["ok"] * 8
    assert summary.variants["b"]["c4"]["tokens_per_s_ratio"]["per_repeat"] == [1.0, 1.0]
    assert json.loads((tmp_path / "bench" / "summary.json").read_text())["baseline"] == "a"


def test_failed_and_timed_out_runs_are_recorded(tmp_path, fake, monkeypatch):
    monkeypatch.setattr(bench, "bench_argv", fake_client("import sys; print('boom'); sys.exit(3)"))
    with pytest.raises(BenchIncompleteError, match=r"4 of 4 benchmark runs did not succeed.*exit code 3: boom"):
        run_benchmark([Variant("a", endpoint=fake.url)], Workload(), out_dir=tmp_path, tokenizer=tmp_path)
    assert statuses(tmp_path) == ["failed"] * 4
    monkeypatch.setattr(bench, "bench_argv", fake_client("import time; time.sleep(60)"))
    with pytest.raises(BenchIncompleteError) as err:
        workload = Workload(levels=(Level(max_concurrency=1),), repeats=1)
        run_benchmark([Variant("a", endpoint=fake.url)], workload, out_dir=tmp_path, tokenizer=tmp_path, timeout_s=1)
    assert statuses(tmp_path) == ["timeout"] and err.value.summary.variants["a"]["c1"]["repeats"] == 0


def test_a_server_that_dies_skips_the_rest(tmp_path, fake, monkeypatch):
    good = "import json, sys; json.dump({'output_throughput': 50.0, 'failed': 0}, open(sys.argv[1], 'w'))"
    calls = []

    def argv(plan, target, level, result_name, seed):
        calls.append(result_name)
        if result_name == "r1-b-c1.json":  # the server of b dies during its first run
            fake.stop()
            return fake_client("import sys; sys.exit(1)")(plan, target, level, result_name, seed)
        return fake_client(good)(plan, target, level, result_name, seed)

    monkeypatch.setattr(bench, "bench_argv", argv)
    variants = [Variant("a", model_dir=tmp_path), Variant("b", endpoint=fake.url)]
    monkeypatch.setattr(bench, "serving", fake_serving(fake))
    with pytest.raises(BenchIncompleteError) as err:
        run_benchmark(variants, Workload(repeats=2), out_dir=tmp_path, tokenizer=tmp_path)
    assert statuses(tmp_path) == ["ok", "ok", "server_died", "skipped", "ok", "ok", "server_failed", "server_failed"]
    assert calls == ["r1-a-c1.json", "r1-a-c4.json", "r1-b-c1.json", "r2-a-c1.json", "r2-a-c4.json"]
    assert err.value.summary.variants["a"]["c4"]["repeats"] == 2  # partial results are kept
    assert (tmp_path / "bench" / "r1-a-c1.json").is_file()


def fake_serving(fake):
    """`serving` with variant a always up (no vLLM), and b behind the fake endpoint."""
    import contextlib

    real = bench.serving

    @contextlib.contextmanager
    def serving(variant, log_path, options=None):
        if variant.name == "a":
            yield bench.Target("http://127.0.0.1:9", "fake-model", lambda: True)
        else:
            with real(variant, log_path) as target:
                yield target

    return serving


# ------------------------------------------------------------------------------------------ real vLLM
@pytest.mark.vllm
def test_real_bench_of_a_tiny_model_and_its_pruned_copy(tmp_path):
    pytest.importorskip("vllm")
    from tiny import tiny_llama

    dense = tiny_llama(tmp_path / "dense", num_layers=4, hidden_size=128, num_heads=4)
    pruned = tmp_path / "pruned"
    prune_checkpoint(dense, make_plan(num_layers=4, layers=[2]), out_dir=pruned, progress=False)
    workload = Workload(
        input_len=16, output_len=8, num_prompts=4, levels=(Level(max_concurrency=1),), repeats=1, num_warmups=1
    )
    variants = [Variant("dense", model_dir=dense), Variant("pruned", model_dir=pruned)]
    summary = run_benchmark(variants, workload, out_dir=tmp_path / "out", timeout_s=300)
    for name in ("dense", "pruned"):
        result = json.loads((tmp_path / "out" / "bench" / f"r1-{name}-c1.json").read_text())
        assert result["completed"] == 4 and result["failed"] == 0 and result["model_id"] == name
    ratio = summary.variants["pruned"]["c1"]["tokens_per_s_ratio"]
    assert ratio["median"] > 0 and summary.ideal_ratio["pruned"] > 1
    assert summary.variants["pruned"]["c1"]["median"]["p50_ttft_ms"] > 0


def test_client_command_line(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n')
    workload = Workload(slos=(parse_slo("ttft:500"), parse_slo("tpot:50")), output_len=32)
    plan = bench.Plan(workload, RunDir(tmp_path), tmp_path / "tok", timeout_s=60)
    target = bench.Target("http://127.0.0.1:8123", "pruned", lambda: True)
    argv = bench.bench_argv(plan, target, Level(max_concurrency=4), "r1-pruned-c4.json", 0)
    assert argv[1:5] == ["-m", "shortgpt_deploy.vllm_cli", "bench", "serve"]
    joined = " ".join(argv)
    for part in [
        "--backend vllm --base-url http://127.0.0.1:8123 --model pruned",
        f"--tokenizer {tmp_path / 'tok'}",
        "--dataset-name random --random-input-len 128 --random-output-len 32 --num-prompts 24 --seed 0",
        "--max-concurrency 4 --num-warmups 2 --ignore-eos",
        "--percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,90,99 --goodput ttft:500 tpot:50",
        f"--save-result --result-dir {tmp_path / 'bench'} --result-filename r1-pruned-c4.json",
    ]:
        assert part in joined
    plan.workload = Workload(dataset_path=prompts)
    joined = " ".join(bench.bench_argv(plan, target, Level(request_rate_per_s=0.5), "x.json", 7))
    assert f"--dataset-name custom --dataset-path {prompts} --skip-chat-template --custom-output-len 64" in joined
    assert "--request-rate 0.5" in joined and "--goodput" not in joined and "--seed 7 " in joined


def test_one_benchmark_per_folder(tmp_path, fake):
    import fcntl

    (tmp_path / "bench").mkdir()
    with (tmp_path / "bench" / ".lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a benchmark still running would
        with pytest.raises(BenchError, match="another benchmark is writing to .*give another --out"):
            run_benchmark([Variant("a", endpoint=fake.url)], Workload(), out_dir=tmp_path, tokenizer=tmp_path)


# ------------------------------------------------------------------------------------------ dtypes per variant
def config_only(folder):
    """A model folder as far as serving options and argv go: config.json, no weights."""
    folder.mkdir(parents=True)
    config = {"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 1024, "num_hidden_layers": 2}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


class StartedServer:
    """Stands in for serve.VLLMServer in bench.serving: records the vLLM argv it would run, starts nothing."""

    argvs: list = []

    def __init__(self, opts, log_path, **kwargs):
        self.opts = opts

    def __enter__(self):
        from shortgpt_deploy.serve import vllm_argv

        StartedServer.argvs.append(vllm_argv(self.opts))
        return self

    def __exit__(self, *exc):
        pass

    def alive(self):
        return True


@pytest.fixture
def started(monkeypatch):
    """bench.serving with StartedServer, and a client that writes a result: the whole CLI path without vLLM."""
    StartedServer.argvs = []
    code = "import json, sys; json.dump({'output_throughput': 10.0, 'failed': 0}, open(sys.argv[1], 'w'))"
    monkeypatch.setattr(bench, "VLLMServer", StartedServer)
    monkeypatch.setattr(
        bench, "bench_argv", lambda plan, t, lv, name, seed: [sys.executable, "-c", code, str(plan.bench_dir / name)]
    )
    monkeypatch.setattr(bench, "free_port", lambda: 9001)
    return StartedServer


def bench_cli(tmp_path, *args):
    result = CliRunner().invoke(
        app, ["bench", "--out", str(tmp_path / "out"), "--repeats", "1", "--concurrency", "1", *args]
    )
    return result.exit_code, " ".join(result.output.split())


def test_one_folder_in_two_dtypes_is_one_command(tmp_path, started):
    from shortgpt_deploy.serving_tables import summary_rows

    model = config_only(tmp_path / "m")
    code, output = bench_cli(
        tmp_path, "--preset", "cpu", "--variant", f"fp32={model}", "--variant", f"bf16={model}",
        "--dtype", "fp32=float32", "--dtype", "bf16=bfloat16",
    )  # fmt: skip
    assert code == 0, output

    def argv(dtype, name):  # the folder by name, run from its parent; the context capped at the model's 1024
        return [sys.executable, "-m", "shortgpt_deploy.vllm_cli", "serve", "m", "--host", "127.0.0.1", "--port",
                "9001", "--dtype", dtype, "--max-model-len", "1024", "--served-model-name", name]  # fmt: skip

    assert started.argvs == [argv("float32", "fp32"), argv("bfloat16", "bf16")]
    summary = RunDir(tmp_path / "out").load_bench_summary()
    assert summary.dtypes == {"fp32": "float32", "bf16": "bfloat16"}
    assert [row[0] for row in summary_rows(summary.to_dict())[1]] == ["fp32 (float32)", "bf16 (bfloat16)"]


def test_the_presets_variant_entries_apply_and_dtype_wins(tmp_path, started):
    model = config_only(tmp_path / "m")
    preset = tmp_path / "ab.yaml"
    preset.write_text(
        "defaults: {dtype: auto, max_model_len: 512}\nvariants:\n  a: {dtype: float32}\n  b: {dtype: float16}\n"
    )
    code, output = bench_cli(tmp_path, "--preset", str(preset), "--variant", f"a={model}", "--variant", f"b={model}")
    assert code == 0, output
    dtypes = [argv[argv.index("--dtype") + 1] for argv in started.argvs]
    assert dtypes == ["float32", "float16"] and all("512" in argv for argv in started.argvs)
    started.argvs.clear()
    code, output = bench_cli(
        tmp_path, "--preset", str(preset), "--variant", f"a={model}", "--variant", f"b={model}", "--dtype", "b=bfloat16"
    )
    assert code == 0, output
    assert [argv[argv.index("--dtype") + 1] for argv in started.argvs] == ["float32", "bfloat16"]


def test_variant_options_layers(tmp_path):
    """preset defaults < its variants: entry < the recipe's serve section < the variant's own (--dtype)."""
    model = config_only(tmp_path / "m")
    preset = {"defaults": {"dtype": "auto", "max_model_len": 4096}, "variants": {"a": {"dtype": "float16"}}}
    a, b = Variant("a", model_dir=model), Variant("b", model_dir=model)
    opts = bench.variant_options(preset, {})
    assert (opts(a, 1).dtype, opts(b, 1).dtype, opts(a, 1).max_model_len) == ("float16", "auto", 1024)
    opts = bench.variant_options(preset, {"dtype": "bfloat16", "cpu_cores": None})
    assert (opts(a, 1).dtype, opts(b, 1).dtype) == ("bfloat16", "bfloat16")
    opts = bench.variant_options(preset, {"dtype": "bfloat16"}, per_variant={"b": {"dtype": "float32"}})
    assert (opts(a, 1).dtype, opts(b, 1).dtype, opts(b, 7).port, opts(b, 7).served_model_name) == (
        "bfloat16", "float32", 7, "b"
    )  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dtype", "c=float32"], "--dtype 'c=float32': no --variant is named 'c'; name one of: a"),
        (["--dtype", "far=float32"], "--dtype 'far=float32': far is an --endpoint, a server started elsewhere"),
        (["--dtype", "a=fp32"], "--dtype 'a=fp32': vLLM takes no dtype 'fp32'; use one of auto, half, float16"),
        (["--dtype", "float32"], "--dtype 'float32': expected NAME=DTYPE"),
        (["--dtype", "a=float32", "--dtype", "a=bfloat16"], "variant a is given two dtypes (float32, bfloat16)"),
    ],
)
def test_bad_dtype_options_are_refused_before_anything_runs(tmp_path, args, message, monkeypatch):
    monkeypatch.setattr(bench, "run_benchmark", lambda *a, **k: pytest.fail("ran despite a bad --dtype"))
    code, output = bench_cli(tmp_path, "--variant", "a=x", "--endpoint", "far=http://127.0.0.1:9", *args)
    assert code == 2 and message in output
    assert not (tmp_path / "out").exists()


def test_an_endpoints_dtype_is_unknown_and_an_old_summary_has_none(tmp_path, fake, monkeypatch):
    from shortgpt_deploy.serving_tables import summary_rows

    code = "import json, sys; json.dump({'output_throughput': 100.0, 'failed': 0}, open(sys.argv[1], 'w'))"
    monkeypatch.setattr(bench, "bench_argv", fake_client(code))
    summary = run_benchmark(
        [Variant("a", endpoint=fake.url)], Workload(repeats=1), out_dir=tmp_path, tokenizer=tmp_path
    )
    assert summary.dtypes == {"a": None}
    old = {k: v for k, v in summary.to_dict().items() if k != "dtypes"}  # summary.json before dtypes were recorded
    (tmp_path / "bench" / "summary.json").write_text(json.dumps(old))
    loaded = RunDir(tmp_path).load_bench_summary()
    assert loaded.dtypes is None and "dtypes" not in loaded.to_dict()
    assert [row[0] for row in summary_rows(loaded.to_dict())[1]] == ["a", "a"]


# ------------------------------------------------------------------------------------------ restart: once
@pytest.fixture
def tracked(started, monkeypatch):
    """Servers that record when they start and stop, and a client that records each run and its seed, all in one
    list of events; plenty of memory unless a test says otherwise."""
    events: list[tuple] = []

    class Tracked(StartedServer):
        def __enter__(self):
            if self.opts.served_model_name == "broken":
                raise bench.ServeError("vLLM exited with code 1 while starting broken")
            events.append(("start", self.opts.served_model_name))
            return super().__enter__()

        def __exit__(self, *exc):
            events.append(("stop", self.opts.served_model_name))

    code = "import json, sys; json.dump({'output_throughput': 10.0, 'failed': 0}, open(sys.argv[1], 'w'))"

    def argv(plan, target, level, name, seed):
        events.append(("run", name.removesuffix(".json"), seed))
        return [sys.executable, "-c", code, str(plan.bench_dir / name)]

    monkeypatch.setattr(bench, "VLLMServer", Tracked)
    monkeypatch.setattr(bench, "bench_argv", argv)
    monkeypatch.setattr(bench, "available_memory_gib", lambda: 1000.0)
    return events


def two_variants(tmp_path, *names):
    model = config_only(tmp_path / "m")
    return [Variant(n, model_dir=model) for n in names]


def test_restart_once_keeps_every_server_up_and_alternates_the_repeats(tmp_path, tracked):
    summary = run_benchmark(two_variants(tmp_path, "a", "b"), Workload(repeats=2), out_dir=tmp_path, restart="once")
    levels = list(enumerate(["c1", "c4"]))
    runs = [("run", f"r{r}-{v}-{lv}", 2 * (r - 1) + i) for r in (1, 2) for v in "ab" for i, lv in levels]
    assert tracked == [("start", "a"), ("start", "b"), *runs, ("stop", "b"), ("stop", "a")]
    assert summary.restart == "once" and summary.server_starts == {"a": 1, "b": 1}
    assert statuses(tmp_path) == ["ok"] * 8
    saved = json.loads((tmp_path / "bench" / "summary.json").read_text())
    assert saved["restart"] == "once" and saved["server_starts"] == {"a": 1, "b": 1}
    workload = bench_context(saved)[1]  # what BENCHMARKS.md and report.md say about it
    assert "every variant's server started once and kept up, the repeats alternating between them (2 " in workload
    assert "seed 0 + the run's index per (repeat, level)" in workload


def test_restart_per_repeat_starts_a_server_per_repeat_with_the_same_seeds(tmp_path, tracked):
    summary = run_benchmark(two_variants(tmp_path, "a", "b"), Workload(repeats=2), out_dir=tmp_path)
    expected = []
    for r in (1, 2):
        for v in "ab":
            runs = [("run", f"r{r}-{v}-{lv}", 2 * (r - 1) + i) for i, lv in enumerate(["c1", "c4"])]
            expected += [("start", v), *runs, ("stop", v)]
    assert tracked == expected  # one server up at a time; each (repeat, level) has its own prompts, alike for a, b
    assert summary.restart == "per_repeat" and summary.server_starts == {"a": 2, "b": 2}
    assert "one server start per variant and repeat (4 server starts)" in bench_context(summary.to_dict())[1]
    runs = json.loads((tmp_path / "bench" / "runs.json").read_text())
    assert [r["seed"] for r in runs] == [0, 1, 0, 1, 2, 3, 2, 3]


def test_restart_once_falls_back_where_the_servers_would_not_fit(tmp_path, tracked, monkeypatch, caplog):
    monkeypatch.setattr(bench, "available_memory_gib", lambda: 5.0)  # two servers: 2 x (2 GiB KV + 2 GiB) > 5
    summary = run_benchmark(two_variants(tmp_path, "a", "b"), Workload(repeats=2), out_dir=tmp_path, restart="once")
    assert summary.restart == "per_repeat" and summary.server_starts == {"a": 2, "b": 2}
    assert "2 servers up together need about 8.0 GiB, 5.0 GiB is available: restart per_repeat" in caplog.text
    monkeypatch.setattr(bench, "available_memory_gib", lambda: 8.5)
    assert bench.restart_mode("once", two_variants(tmp_path / "x", "a", "b"), bench.default_options) == "once"
    monkeypatch.setattr(bench, "on_gpu", lambda: True)
    assert bench.restart_mode("once", two_variants(tmp_path / "y", "a", "b"), bench.default_options) == "per_repeat"
    with pytest.raises(BenchError, match="bench restart 'sometimes': use one of per_repeat, once"):
        bench.restart_mode("sometimes", [], bench.default_options)


def test_restart_once_with_a_server_that_will_not_start(tmp_path, tracked):
    variants = two_variants(tmp_path, "a", "broken")
    with pytest.raises(BenchIncompleteError, match="4 of 8 benchmark runs did not succeed"):
        run_benchmark(variants, Workload(repeats=2), out_dir=tmp_path, restart="once")
    assert statuses(tmp_path) == ["ok", "ok", "server_failed", "server_failed"] * 2
    assert [e for e in tracked if e[0] != "run"] == [("start", "a"), ("stop", "a")]
    assert RunDir(tmp_path).load_bench_summary().server_starts == {"a": 1, "broken": 0}
