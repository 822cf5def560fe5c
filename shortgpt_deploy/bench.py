"""Serving benchmark: vLLM's own load generator (`vllm bench serve`) against each variant; its JSON, summarised.

Repeats are interleaved across variants (repeat 1: dense, pruned; repeat 2: dense, pruned; ...) so that drift of
a shared machine falls on every variant alike, and ratios to the baseline (the first variant) are paired by
repeat. One tokenizer drives every variant, so all see the same prompts; each (repeat, level) run draws its own
(seed + its index), so that no run finds its prompts in the prefix cache of an earlier run on the same server.

Two ways to keep servers (`restart`): `per_repeat` starts each variant's server for each repeat and stops it
after (one server up at a time); `once` starts every variant's server first and keeps them all up, the repeats
alternating between them (only one receives load at a time), which saves (variants x (repeats - 1)) starts.
BENCHMARKS.md ("A server that stays up") measured whether that changes the numbers. `once` needs memory for every
server at once and falls back to `per_repeat` where it would not fit, or on a GPU (each server takes most of
its memory). Written under OUT/bench/:
`r{repeat}-{variant}-{level}.json` (vLLM's result, as each run completes), `runs.json` (status of every planned
run, rewritten after each), `summary.json`, and `logs/` (server and client output), each path and file through
run.RunDir; the records themselves (RunRecord, BenchSummary) are in records.py. Tables, Markdown and plots
made from a summary are in serving_tables.py and report.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import re
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import read_config, read_config_layers, read_layer_tensors, text_config
from .errors import ShortGPTError
from .gen import read_gen_config
from .manifest import provenance
from .processes import spawn, stop_group
from .records import BenchSummary, RunRecord
from .run import RunDir
from .runtime import on_gpu, tqdm
from .serve import (
    VLLM_DTYPES,
    ServeError,
    ServeOptions,
    VLLMServer,
    fit_to_model,
    log_tail,
    options_for,
    served_dtype,
)

if TYPE_CHECKING:
    from .recipe import BenchSpec

logger = logging.getLogger(__name__)

RESTART_MODES = ("per_repeat", "once")  # bench.restart: a server start per variant and repeat, or per variant
# Beside its KV cache and weights, an idle vLLM CPU server (API server + engine process, torch loaded) holds about
# this much RAM (measured: BENCHMARKS.md, "A server that stays up"); used to decide whether `once` fits.
SERVER_OVERHEAD_GIB = 2.0  # measured 1.8 GiB (4.3 GiB RSS with a 2 GiB KV cache and 0.5 GiB of weights)
SLO_METRICS = ("ttft", "tpot", "e2el")  # the request-level metrics vLLM's --goodput accepts
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
PERCENTILES = (50, 90, 99)


class BenchError(ShortGPTError):
    """A benchmark that cannot be set up (bad SLO, no variants, unreachable endpoint, ...)."""


class BenchIncompleteError(BenchError):
    """Some runs did not succeed; `summary` holds what the others measured (also written to summary.json)."""

    def __init__(self, message: str, summary: BenchSummary):
        super().__init__(message)
        self.summary = summary


@dataclass(frozen=True)
class Slo:
    metric: str
    limit_ms: float

    def __str__(self) -> str:  # the form vLLM's --goodput takes
        return f"{self.metric}:{self.limit_ms:g}"


def parse_slo(text: str) -> Slo:
    m = re.fullmatch(r"\s*([a-z0-9]+)\s*:\s*(\d+(?:\.\d*)?|\.\d+)\s*", text)
    if m is None or m.group(1) not in SLO_METRICS or float(m.group(2)) <= 0:
        raise BenchError(
            f"bad SLO {text!r}: expected METRIC:MILLISECONDS with METRIC one of {', '.join(SLO_METRICS)} and a "
            "positive number, e.g. ttft:500 or tpot:50"
        )
    return Slo(m.group(1), float(m.group(2)))


@dataclass(frozen=True)
class Level:
    """One load level: at most N requests in flight, or Poisson arrivals at N requests/s."""

    max_concurrency: int | None = None
    request_rate_per_s: float | None = None

    def __post_init__(self) -> None:
        value = self.max_concurrency if self.request_rate_per_s is None else self.request_rate_per_s
        if (self.max_concurrency is None) == (self.request_rate_per_s is None) or value is None or value <= 0:
            raise BenchError(f"a load level is a positive max concurrency or request rate, exactly one (got {self})")

    @property
    def label(self) -> str:
        return f"c{self.max_concurrency}" if self.request_rate_per_s is None else f"r{self.request_rate_per_s:g}"

    def argv(self) -> list[str]:
        if self.request_rate_per_s is None:
            return ["--max-concurrency", str(self.max_concurrency)]
        return ["--request-rate", f"{self.request_rate_per_s:g}"]


def levels_from(concurrency: str | None, request_rates_per_s: str | None) -> tuple[Level, ...]:
    """Levels from comma-separated text: "1,4" (max concurrency, the default) or "0.5,2" (requests/s)."""
    if concurrency and request_rates_per_s:
        raise BenchError("give load levels as max concurrency or as request rates, not both")
    text = request_rates_per_s or concurrency or "1,4"
    try:
        if request_rates_per_s:
            return tuple(Level(request_rate_per_s=float(x)) for x in text.split(",") if x.strip())
        return tuple(Level(max_concurrency=int(x)) for x in text.split(",") if x.strip())
    except ValueError:
        raise BenchError(f"load levels must be comma-separated numbers, e.g. 1,4 (got {text!r})") from None


@dataclass(frozen=True)
class Workload:
    """Random prompts of input_len tokens, or prompts from a JSONL file (one {"prompt": ...} a line)."""

    input_len: int = 128
    output_len: int = 64
    num_prompts: int = 24
    seed: int = 0
    dataset_path: Path | None = None
    levels: tuple[Level, ...] = (Level(max_concurrency=1), Level(max_concurrency=4))
    num_warmups: int = 2
    repeats: int = 2
    slos: tuple[Slo, ...] = ()

    def __post_init__(self) -> None:
        if min(self.input_len, self.output_len, self.num_prompts, self.repeats) < 1 or self.num_warmups < 0:
            raise BenchError("input/output length, prompts and repeats must be >= 1, warmups >= 0")
        if not self.levels or len({lv.label for lv in self.levels}) != len(self.levels):
            raise BenchError("give at least one load level, each once")
        if self.dataset_path is not None and not Path(self.dataset_path).is_file():
            raise BenchError(f"prompt file {self.dataset_path} does not exist")

    @classmethod
    def from_spec(cls, spec: BenchSpec) -> Workload:
        """The workload of a bench section (the recipe's, or the one `bench` builds from its options): its level
        lists as levels_from reads them (none or an empty list: the default 1,4), its SLOs parsed."""

        def text(values: list[int] | list[float] | None) -> str | None:
            return ",".join(map(str, values)) if values else None

        return cls(
            input_len=spec.input_len,
            output_len=spec.output_len,
            num_prompts=spec.num_prompts,
            seed=spec.seed,
            dataset_path=spec.dataset,
            levels=levels_from(text(spec.concurrency), text(spec.request_rates_per_s)),
            num_warmups=spec.warmups,
            repeats=spec.repeats,
            slos=tuple(parse_slo(x) for x in spec.slos),
        )

    def dataset_argv(self) -> list[str]:
        if self.dataset_path is None:
            return ["--dataset-name", "random", "--random-input-len", str(self.input_len)]
        # Prompts go as they are: no chat template, whose extra tokens would depend on the tokenizer.
        return ["--dataset-name", "custom", "--dataset-path", str(self.dataset_path), "--skip-chat-template"]


@dataclass(frozen=True)
class Variant:
    """A model folder (served here on a free loopback port) or the URL of a server that is already running."""

    name: str
    model_dir: Path | None = None
    endpoint: str | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise BenchError(f"variant name {self.name!r}: use letters, digits, '.', '_' or '-'")
        if (self.model_dir is None) == (self.endpoint is None):
            raise BenchError(f"variant {self.name}: give a model folder or an endpoint URL (exactly one)")


def parse_variant(text: str, *, endpoint: bool = False) -> Variant:
    name, sep, value = text.partition("=")
    if not sep or not value:
        raise BenchError(f"{text!r}: expected NAME={'URL' if endpoint else 'DIR'}, e.g. pruned=runs/x/pruned")
    return Variant(name, endpoint=value.rstrip("/")) if endpoint else Variant(name, model_dir=Path(value))


def parse_dtypes(texts: list[str], variants: list[Variant]) -> dict[str, str]:
    """`--dtype NAME=DTYPE` options as {variant: dtype}; NAME is a variant served here (a model folder), DTYPE one
    that vLLM's --dtype takes. An endpoint runs with whatever dtype it was started with, so it takes none."""
    served = [v.name for v in variants if v.model_dir is not None]
    endpoints = {v.name for v in variants if v.endpoint is not None}
    dtypes: dict[str, str] = {}
    for text in texts:
        name, sep, dtype = (part.strip() for part in text.partition("="))
        if not sep or not name or not dtype:
            raise BenchError(f"--dtype {text!r}: expected NAME=DTYPE, e.g. --dtype bf16=bfloat16")
        if dtype not in VLLM_DTYPES:
            raise BenchError(f"--dtype {text!r}: vLLM takes no dtype {dtype!r}; use one of {', '.join(VLLM_DTYPES)}")
        if name in endpoints:
            raise BenchError(
                f"--dtype {text!r}: {name} is an --endpoint, a server started elsewhere with its own dtype; set the "
                f"dtype where that server starts, or give the folder as --variant {name}=DIR"
            )
        if name not in served:
            raise BenchError(
                f"--dtype {text!r}: no --variant is named {name!r}; name one of: {', '.join(served) or '(none given)'}"
            )
        if dtypes.get(name, dtype) != dtype:
            raise BenchError(f"--dtype: variant {name} is given two dtypes ({dtypes[name]}, {dtype}); give one")
        dtypes[name] = dtype
    return dtypes


def endpoint_model(variant: Variant, timeout_s: float = 5.0) -> str:
    """The id of the (first) model an endpoint serves, from /v1/models."""
    try:
        with urllib.request.urlopen(f"{variant.endpoint}/v1/models", timeout=timeout_s) as r:  # noqa: S310
            return json.loads(r.read())["data"][0]["id"]
    except (OSError, ValueError, LookupError) as err:  # URLError is an OSError
        raise BenchError(
            f"endpoint {variant.name} at {variant.endpoint} is unreachable or serves no model "
            f"(GET /v1/models: {getattr(err, 'reason', err)}); start the server first or fix the URL"
        ) from None


def flops_per_token(model_dir: Path) -> int:
    """Forward FLOPs per token from the safetensors headers: 2 × decoder-layer params + 2 × LM-head params.

    Each weight does one multiply-add (2 FLOPs) per token. The LM head is the input embedding when they are tied
    (or no `lm_head` tensor exists). Embedding lookups are gathers and cost no FLOPs; the final norm is
    negligible. Attention over the context (about 4 × context × hidden per layer) is left out: it shrinks with
    the layer count too, so the ideal speed-up derived from this is a slight underestimate. GPTQ `qweight` counts
    32/bits weights per int32; scales and zeros are not counted.
    """
    config = json.loads((Path(model_dir) / "config.json").read_text())
    bits = (config.get("quantization_config") or {}).get("bits", 4)
    headers, prefix = read_layer_tensors(Path(model_dir), read_config_layers(model_dir))
    sizes = {
        name: math.prod(meta["shape"]) * (32 // bits if name.endswith("qweight") else 1)
        for header in headers.values()
        for name, meta in header.items()
        if not name.endswith(("qzeros", "scales", "g_idx"))
    }
    head = [n for name, n in sizes.items() if name.startswith("lm_head.")]
    if not head or text_config(config).get("tie_word_embeddings", config.get("tie_word_embeddings")):
        head = [n for name, n in sizes.items() if re.search(r"embed_tokens\.q?weight$", name)]
    return 2 * sum(n for name, n in sizes.items() if name.startswith(prefix)) + 2 * sum(head)


def prefill_flops_per_token(model_dir: Path, prompt_len: int) -> float | None:
    """FLOPs per prompt token of a `prompt_len`-token prefill, from config.json (None where its fields are not
    a dense decoder's): per decoder layer 2 × (the q, k, v and output projections + the gated MLP's three
    matrices) + causal attention over prompt_len / 2 keys on average (QKᵀ and AV: 4 × heads × head_dim each).
    A layer that a ShortGPT-gen checkpoint skips for the prompt still pays its q/k/v projection (vLLM's fused
    qkv_proj, gen_vllm_models). The LM head runs for the last prompt token only and is left out.
    Dense ÷ variant is the TTFT speed-up if prefill time followed FLOPs.
    """
    model_dir = Path(model_dir)
    config = text_config(read_config(model_dir))
    try:
        h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
        heads = config["num_attention_heads"]
        kv = config.get("num_key_value_heads") or heads
        hd = config.get("head_dim") or h // heads
    except (KeyError, TypeError, ZeroDivisionError):
        return None
    qkv = 2 * h * (heads + 2 * kv) * hd
    layer = qkv + 2 * heads * hd * h + 2 * 3 * h * inter + 4 * heads * hd * prompt_len / 2
    spec = read_gen_config(model_dir)
    skipped = len(spec.skip_prefill_layers) if spec else 0
    return (layers - skipped) * layer + skipped * qkv


def ttft_ideal_ratios(variants: list[Variant], prompt_len: int | None) -> dict[str, float | None]:
    """Baseline (the first variant) ÷ each variant's prefill FLOPs per token: the ideal TTFT speed-up."""
    if prompt_len is None:
        return {v.name: None for v in variants}

    def flops(v: Variant) -> float | None:
        try:
            return prefill_flops_per_token(v.model_dir, prompt_len) if v.model_dir else None
        except (ShortGPTError, OSError, ValueError) as err:
            logger.warning("no prefill FLOP count for %s: %s", v.name, err)
            return None

    counts = {v.name: flops(v) for v in variants}
    base = counts[variants[0].name]
    return {n: base / f if base and f else None for n, f in counts.items()}


# ------------------------------------------------------------------------------------------------- runs
@dataclass
class Target:
    url: str
    model: str
    alive: Callable[[], bool]
    dtype: str | None = None  # vLLM's --dtype for a server started here; None for an endpoint (not ours to know)


OptionsFactory = Callable[[Variant, int], ServeOptions]  # (variant, free port) → how to serve it


def default_options(variant: Variant, port: int) -> ServeOptions:
    """serve.py's defaults, with the context capped at 2048 tokens (or the model's own limit, if shorter)."""
    assert variant.model_dir is not None
    return fit_to_model(ServeOptions(variant.model_dir, port=port, served_model_name=variant.name, max_model_len=2048))


def variant_options(
    preset: dict[str, dict], overrides: dict[str, object], *, per_variant: dict[str, dict[str, object]] | None = None
) -> OptionsFactory:
    """How the build's bench stage and the `bench` command serve each variant: the preset's defaults, then its
    `variants:` entry for the variant's name, then `overrides` (the recipe's serve section), then the variant's
    own entry in `per_variant` (`bench --dtype NAME=DTYPE`); the context capped at the model's own."""

    def options(variant: Variant, port: int) -> ServeOptions:
        assert variant.model_dir is not None
        given = {**overrides, **(per_variant or {}).get(variant.name, {})}
        opts = options_for(
            variant.model_dir, variant=variant.name, preset=preset, overrides=given, port=port,
            served_model_name=variant.name,
        )  # fmt: skip
        return fit_to_model(opts)

    return options


@dataclass
class Plan:
    workload: Workload
    run: RunDir  # the results go to its bench/ (run.RunDir knows the paths)
    tokenizer: Path
    timeout_s: float
    options: OptionsFactory = default_options
    records: list[RunRecord] = field(default_factory=list)
    dtypes: dict[str, str] = field(default_factory=dict)  # variant → vLLM's --dtype, once its server has started
    server_starts: dict[str, int] = field(default_factory=dict)  # variant → servers started here (endpoints: 0)
    bar: Any = None  # runtime.tqdm over the runs, when given

    def advance(self, what: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(what, refresh=False)
            self.bar.update(1)

    @property
    def bench_dir(self) -> Path:
        return self.run.bench

    def save(self) -> None:
        self.run.save_bench_runs(self.records)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(variant: Variant, log_path: Path, options: OptionsFactory = default_options) -> Iterator[Target]:
    """The variant's server for the duration of the block: started here (model_dir) or already running."""
    if variant.model_dir is None:
        yield Target(str(variant.endpoint), endpoint_model(variant), lambda: _reachable(variant))
        return
    opts = options(variant, free_port())
    dtype = served_dtype(opts)
    # VLLMServer.stop() also stops the engine and workers of an API server that already died.
    with VLLMServer(opts, log_path) as server:
        yield Target(opts.url, str(opts.served_model_name), server.alive, dtype)


def _reachable(variant: Variant) -> bool:
    with contextlib.suppress(BenchError):
        return bool(endpoint_model(variant))
    return False


def bench_argv(plan: Plan, target: Target, level: Level, result_name: str, seed: int) -> list[str]:
    w = plan.workload
    argv = [sys.executable, "-m", "shortgpt_deploy.vllm_cli", "bench", "serve", "--backend", "vllm"]
    argv += ["--base-url", target.url, "--model", target.model, "--tokenizer", str(plan.tokenizer)]
    argv += w.dataset_argv() + ["--random-output-len" if w.dataset_path is None else "--custom-output-len"]
    argv += [str(w.output_len), "--num-prompts", str(w.num_prompts), "--seed", str(seed), *level.argv()]
    argv += ["--num-warmups", str(w.num_warmups), "--ignore-eos", "--temperature", "0", "--disable-tqdm"]
    argv += ["--percentile-metrics", ",".join(LATENCY_METRICS), "--metric-percentiles", "50,90,99"]
    argv += ["--goodput", *map(str, w.slos)] if w.slos else []
    return argv + ["--save-result", "--result-dir", str(plan.bench_dir), "--result-filename", result_name]


def run_one(plan: Plan, rec: RunRecord, target: Target, level: Level) -> None:
    """Run vLLM's client once and record how it went; its process group is killed on timeout or Ctrl-C."""
    name = f"r{rec.repeat}-{rec.variant}-{rec.level}"
    result, log_path = plan.run.bench_result(name), plan.run.bench_log(name)
    result.unlink(missing_ok=True)  # never mistake an older run's file for this one's
    logger.info("repeat %d, %s at %s: vllm bench serve (log: %s)", rec.repeat, rec.variant, rec.level, log_path)
    start, argv = time.monotonic(), bench_argv(plan, target, level, result.name, rec.seed)
    with log_path.open("wb") as log:
        proc = spawn(argv, log=log)
        try:
            rc: int | None = proc.wait(timeout=plan.timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
        finally:  # the client has its own session, so Ctrl-C does not reach it
            stop_group(proc, grace_s=0)
    rec.duration_s, rec.load_1min = round(time.monotonic() - start, 2), round(os.getloadavg()[0], 2)
    if rc == 0 and result.is_file():
        failed = json.loads(result.read_text()).get("failed", 0)
        rec.result_file, rec.status = result.name, "requests_failed" if failed else "ok"
        rec.message = f"{failed} of {plan.workload.num_prompts} requests failed" if failed else ""
    else:
        rec.status = "timeout" if rc is None else "failed"
        rec.message = f"after {plan.timeout_s:g} s" if rc is None else f"exit code {rc}: {log_tail(log_path, 5)}"
    if rec.status != "ok" and not target.alive():
        rec.status, rec.message = "server_died", f"server gone ({rec.message})"


def run_levels(plan: Plan, variant: Variant, repeat: int, target: Target) -> None:
    """All levels of one variant in one repeat, against its server (while it stays alive)."""
    if target.dtype is not None:
        plan.dtypes[variant.name] = target.dtype
    todo = [r for r in plan.records if r.repeat == repeat and r.variant == variant.name]
    for rec, level in zip(todo, plan.workload.levels, strict=True):
        if target.alive():
            run_one(plan, rec, target, level)
        else:
            rec.status, rec.message = "skipped", "the server had died"
        plan.save()
        plan.advance(f"r{repeat} {variant.name} {level.label}: {rec.status}")


def _server(
    stack: contextlib.ExitStack, plan: Plan, variant: Variant, log_name: str, repeat: int | None = None
) -> Target | None:
    """The variant's server, kept up until `stack` closes; None if it would not start, its pending runs (of
    `repeat`, or all) then marked server_failed."""
    try:
        target = stack.enter_context(serving(variant, plan.run.bench_log(log_name), plan.options))
    except (ServeError, BenchError) as err:
        _mark_pending(plan, variant.name, "server_failed", str(err).splitlines()[0], repeat)
        return None
    if variant.model_dir is not None:
        plan.server_starts[variant.name] = plan.server_starts.get(variant.name, 0) + 1
    return target


def _mark_pending(plan: Plan, variant: str, status: str, why: str, repeat: int | None = None) -> None:
    for rec in plan.records:
        if rec.variant == variant and rec.status == "pending" and repeat in (None, rec.repeat):
            rec.status, rec.message = status, why
    plan.save()


def run_per_repeat(plan: Plan, variants: list[Variant], reps: range) -> None:
    """restart: per_repeat. Each variant's server started for each repeat and stopped after it, one up at a time;
    one that would not start is not tried again (its later runs are skipped)."""
    broken: set[str] = set()
    for repeat in reps:
        for v in (v for v in variants if v.name not in broken):
            with contextlib.ExitStack() as stack:
                if (target := _server(stack, plan, v, f"r{repeat}-{v.name}-server", repeat)) is None:
                    broken.add(v.name)
                    _mark_pending(plan, v.name, "skipped", "its server failed to start earlier")
                else:
                    run_levels(plan, v, repeat, target)


def run_kept_up(plan: Plan, variants: list[Variant], reps: range) -> None:
    """restart: once. Every variant's server started first and kept up together; the repeats alternate between
    them as in per_repeat, one server receiving load at a time. All stop when the last run is done."""
    with contextlib.ExitStack() as stack:
        targets = {v.name: _server(stack, plan, v, f"{v.name}-server") for v in variants}
        for repeat in reps:
            for v in variants:
                if (target := targets[v.name]) is not None:
                    run_levels(plan, v, repeat, target)


def restart_mode(requested: str, variants: list[Variant], options: OptionsFactory) -> str:
    """`requested`, or per_repeat where `once` cannot keep every server up: on a GPU (each vLLM server takes most
    of its memory), or where their KV caches, weights and SERVER_OVERHEAD_GIB each exceed the RAM available."""
    if requested not in RESTART_MODES:
        raise BenchError(f"bench restart {requested!r}: use one of {', '.join(RESTART_MODES)}")
    served = [v for v in variants if v.model_dir is not None]
    if requested == "per_repeat" or len(served) < 2:
        return requested
    if on_gpu():
        logger.warning("bench: restart once would keep several servers on one GPU, which cannot hold them: per_repeat")
        return "per_repeat"
    need_gib = sum(options(v, 0).kv_cache_gib + _weights_gib(v) + SERVER_OVERHEAD_GIB for v in served)
    free_gib = available_memory_gib()
    if free_gib is not None and need_gib > free_gib:
        logger.warning(
            "bench: %d servers up together need about %.1f GiB, %.1f GiB is available: restart per_repeat instead "
            "(or lower serve.kv_cache_gib)", len(served), need_gib, free_gib,
        )  # fmt: skip
        return "per_repeat"
    return requested


def _weights_gib(variant: Variant) -> float:
    assert variant.model_dir is not None
    files = Path(variant.model_dir).glob("*.safetensors")
    return sum(f.stat().st_size for f in files) / 2**30  # a gen folder's hard links count in full: it maps them


def available_memory_gib() -> float | None:
    """MemAvailable of /proc/meminfo (None where there is none)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        lines = Path("/proc/meminfo").read_text().splitlines()
        return int(next(x for x in lines if x.startswith("MemAvailable:")).split()[1]) / 2**20
    return None


def run_benchmark(
    variants: list[Variant],
    workload: Workload,
    *,
    out_dir: Path,
    tokenizer: Path | None = None,
    timeout_s: float = 900.0,
    options: OptionsFactory = default_options,
    restart: str = "per_repeat",
    progress: bool = True,
) -> BenchSummary:
    """Every variant at every level, `workload.repeats` times interleaved; writes and returns the summary.

    `options` says how to serve each variant given a free loopback port (default: serve.py's defaults);
    `restart` whether each repeat starts the servers again (per_repeat) or they stay up (once; restart_mode);
    `progress` a bar over the runs.

    Raises BenchIncompleteError (after writing runs.json and summary.json) if any run did not succeed.
    """
    if not variants:
        raise BenchError("no variants to benchmark: give --variant NAME=DIR (the first is the baseline) or --endpoint")
    if len({v.name for v in variants}) != len(variants):
        raise BenchError("variant names must differ")
    for v in variants:
        if v.endpoint is not None:
            endpoint_model(v)  # fail now, not after the other variants have run
    dirs = [v.model_dir for v in variants if v.model_dir is not None]
    if tokenizer is None and not dirs:
        raise BenchError("only endpoints given: name a tokenizer folder with --tokenizer")
    restart = restart_mode(restart, variants, options)
    plan = Plan(workload, RunDir(out_dir), Path(tokenizer or dirs[0]), timeout_s, options)
    plan.run.bench_logs.mkdir(parents=True, exist_ok=True)
    load_at_start, reps = os.getloadavg()[0], range(1, workload.repeats + 1)
    plan.records = [
        RunRecord(r, v.name, lv.label, seed=workload.seed + (r - 1) * len(workload.levels) + i)
        for r in reps
        for v in variants
        for i, lv in enumerate(workload.levels)
    ]
    with (
        _locked(plan.run.bench_lock),
        tqdm(total=len(plan.records), desc="bench", unit="run", disable=not progress) as bar,
    ):
        plan.bar = bar
        (run_kept_up if restart == "once" else run_per_repeat)(plan, variants, reps)
        return finish(plan, variants, load_1min=(load_at_start, os.getloadavg()[0]), restart=restart)


@contextlib.contextmanager
def _locked(lock: Path) -> Iterator[None]:
    """One benchmark per folder: a second one would overwrite its logs and results (the lock dies with us)."""
    bench_dir = lock.parent
    with lock.open("w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BenchError(
                f"another benchmark is writing to {bench_dir}: wait for it, or give another --out"
            ) from None
        yield


def finish(
    plan: Plan, variants: list[Variant], load_1min: tuple[float, float] = (0.0, 0.0), restart: str = "per_repeat"
) -> BenchSummary:
    """Summarise the runs that succeeded, write summary.json, and raise if any run did not succeed."""
    ok = [r for r in plan.records if r.status == "ok" and r.result_file]
    results = [
        (r.variant, r.level, r.repeat, json.loads(plan.run.bench_result(Path(str(r.result_file)).stem).read_text()))
        for r in ok
    ]
    names, levels = [v.name for v in variants], [lv.label for lv in plan.workload.levels]
    prompt_len = None if plan.workload.dataset_path else plan.workload.input_len  # a prompt file's lengths vary
    summary = BenchSummary(
        **summarize(results, variants=names, levels=levels, flops={v.name: _flops_or_none(v) for v in variants}),
        workload=json.loads(json.dumps(asdict(plan.workload), default=str)),
        ttft_ideal_ratio=ttft_ideal_ratios(variants, prompt_len),
        tokenizer=str(plan.tokenizer),
        sources={v.name: str(v.model_dir or v.endpoint) for v in variants},
        dtypes={v.name: plan.dtypes.get(v.name) for v in variants},
        restart=restart,
        server_starts={v.name: plan.server_starts.get(v.name, 0) for v in variants},
        provenance=provenance() | {"load_1min_start_end": list(load_1min)},
    )
    plan.run.save_bench_summary(summary)
    bad = [r for r in plan.records if r.status != "ok"]
    if bad:
        what = "; ".join(f"r{r.repeat} {r.variant} {r.level}: {r.status} {r.message}".strip() for r in bad[:4])
        raise BenchIncompleteError(
            f"{len(bad)} of {len(plan.records)} benchmark runs did not succeed ({what}); see "
            f"{plan.run.bench_runs_path} and {plan.run.bench_logs}",
            summary,
        )
    return summary


def _flops_or_none(variant: Variant) -> int | None:
    try:
        return flops_per_token(variant.model_dir) if variant.model_dir else None
    except (ShortGPTError, OSError, ValueError, KeyError) as err:
        logger.warning("no FLOP count for %s: %s", variant.name, err)
        return None


# ---------------------------------------------------------------------------------------------- summary
def run_metrics(result: dict[str, Any]) -> dict[str, float | None]:
    """The numbers reported from one `vllm bench serve` result JSON (keys p50_ttft_ms, output_throughput, ...)."""
    m = {f"p{p}_{k}_ms": result.get(f"p{p}_{k}_ms") for k in LATENCY_METRICS for p in PERCENTILES}
    m["output_tokens_per_s"], m["requests_per_s"] = result.get("output_throughput"), result.get("request_throughput")
    m["goodput_requests_per_s"], m["failed"] = result.get("request_goodput"), result.get("failed", 0)
    return m


def median_metrics(runs: list[dict[str, float | None]]) -> dict[str, float | None]:
    """Each metric's median over repeats (missing values ignored)."""
    values = {k: [r[k] for r in runs if r.get(k) is not None] for k in runs[0]}
    return {k: statistics.median(v) if v else None for k, v in values.items()}  # type: ignore[type-var]


def paired_ratios(values: dict[int, float], baseline: dict[int, float]) -> dict[str, Any] | None:
    """variant / baseline per repeat (the two measured minutes apart), with their median, min and max."""
    ratios = [values[r] / baseline[r] for r in sorted(values) if baseline.get(r)]
    if not ratios:
        return None
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "per_repeat": ratios}


def summarize(
    results: list[tuple[str, str, int, dict[str, Any]]],
    *,
    variants: list[str],
    levels: list[str],
    flops: dict[str, int | None],
) -> dict[str, Any]:
    """results: (variant, level, repeat, vLLM result JSON). The first variant is the baseline of every ratio.

    ideal_ratio[v] = flops[baseline] / flops[v]: the output tokens/s ratio if time per token followed FLOPs.
    """
    per: dict[tuple[str, str], dict[int, dict[str, float | None]]] = {}
    for variant, level, repeat, result in results:
        per.setdefault((variant, level), {})[repeat] = run_metrics(result)

    def tps(v: str, lv: str) -> dict[int, float]:
        return {r: m["output_tokens_per_s"] for r, m in per.get((v, lv), {}).items() if m["output_tokens_per_s"]}

    def cell(v: str, lv: str) -> dict[str, Any]:
        runs = list(per.get((v, lv), {}).values())
        ratio = paired_ratios(tps(v, lv), tps(variants[0], lv))
        t = list(tps(v, lv).values())
        return {
            "repeats": len(runs),
            "median": median_metrics(runs) if runs else None,
            "tokens_per_s_range": [min(t), max(t)] if t else None,
            "tokens_per_s_ratio": ratio,
        }

    base_flops = flops.get(variants[0])
    ideal = {v: base_flops / f if base_flops and (f := flops.get(v)) else None for v in variants}
    table = {v: {lv: cell(v, lv) for lv in levels} for v in variants}
    return {
        "baseline": variants[0],
        "levels": levels,
        "flops_per_token": flops,
        "ideal_ratio": ideal,
        "variants": table,
    }
