"""Commands that serve: serve (one checkpoint with vLLM) and bench (vLLM's load generator against variants)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import ShortGPTError
from ._common import (
    Verbose,
    append_bench_section,
    console,
    from_options,
    handles_errors,
    out,
    setup_logging,
)

PRESET_HELP = "serving/NAME.yaml (cpu, gpu, gpu-tp2, gpu-tp4, gpu-ray-2node, ...) or a YAML path; default: cpu or gpu."


@handles_errors
def serve(
    model_dir: Annotated[Path, typer.Argument(help="A checkpoint folder, e.g. runs/NAME/pruned.")],
    port: int = 8000,
    host: Annotated[str, typer.Option(help="Interface to bind; 127.0.0.1 keeps it on this machine.")] = "127.0.0.1",
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="VLLM_API_KEY",
            show_envvar=True,
            help="Require this bearer token (better: the variable "
            "or --api-key-file, which keep it out of `ps` and shell history).",
        ),
    ] = None,
    api_key_file: Annotated[Path | None, typer.Option(help="Read the bearer token from this file.")] = None,
    public_metrics: Annotated[bool, typer.Option(help="With a key: leave /metrics open, as vLLM does.")] = False,
    preset: Annotated[str | None, typer.Option(help=PRESET_HELP)] = None,
    max_model_len: Annotated[int | None, typer.Option(help="Longest prompt + completion, in tokens.")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto: float32 on CPUs without bf16 math, else bfloat16.")] = None,
    kv_cache_gib: Annotated[int | None, typer.Option(help="CPU: GiB of RAM for the KV cache.")] = None,
    cpu_cores: Annotated[str | None, typer.Option(help="CPU: cores for vLLM's threads, e.g. 0-1.")] = None,
    tensor_parallel_size: Annotated[int | None, typer.Option(help="GPU: shard each layer over N GPUs.")] = None,
    pipeline_parallel_size: Annotated[int | None, typer.Option(help="GPU: split the layers into N stages.")] = None,
    distributed_executor_backend: Annotated[
        str | None, typer.Option(help="GPU: mp (one machine) or ray (a Ray cluster started beforehand).")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Check the settings, print the vLLM command, start nothing.")] = False,
    log: Annotated[Path, typer.Option(help="Server log file.")] = Path("runs/serve.log"),
    verbose: Verbose = False,
) -> None:
    """Serve a checkpoint with vLLM's OpenAI-compatible API until Ctrl-C.

    Settings come from the preset (its defaults, then its entry for the folder's name: pruned, pruned-gptq, ...),
    then from the options given here.
    """
    setup_logging(verbose)
    import time

    from ..recipe import ServeSpec
    from ..serve import (
        VLLMServer,
        curl_example,
        dry_run_command,
        exposure_warnings,
        load_preset,
        mask,
        options_for,
        read_api_key,
    )  # fmt: skip

    given = {
        "max_model_len": max_model_len, "dtype": dtype, "kv_cache_gib": kv_cache_gib, "cpu_cores": cpu_cores,
        "tensor_parallel_size": tensor_parallel_size, "pipeline_parallel_size": pipeline_parallel_size,
        "distributed_executor_backend": distributed_executor_backend,
    }  # fmt: skip
    # Checked as a recipe's serve section is, so a bad value names its option (--tensor-parallel-size must be ...).
    given = from_options(lambda: ServeSpec(**{k: v for k, v in given.items() if v is not None})).model_dump()
    key = read_api_key(api_key, api_key_file)
    opts = options_for(
        model_dir, variant=model_dir.name, preset=load_preset(preset), overrides=given, host=host, port=port,
        api_key=key, public_metrics=public_metrics,
    )  # fmt: skip
    for warning in exposure_warnings(opts):
        console.print(f"[bold yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    if dry_run:
        out.print(escape(dry_run_command(opts)), soft_wrap=True, highlight=False)
        return
    console.print(f"starting vLLM on {model_dir} (log: {log}); this takes about a minute on a small CPU")
    with VLLMServer(opts, log) as server:
        out.print(f"serving {model_dir} at {opts.url}/v1  (Ctrl-C stops it)")
        if key:
            guarded = "/v1" + ("" if public_metrics else " and /metrics")
            out.print(f"{guarded} need the API key {mask(key)}; export VLLM_API_KEY=<key> for the example below")
        out.print(curl_example(opts), soft_wrap=True)
        while server.alive():
            time.sleep(1.0)
        raise ShortGPTError(f"vLLM exited unexpectedly; see {log}")


@handles_errors
def bench(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for bench/ (vLLM's JSON per run, summary.json).")],
    variant: Annotated[list[str] | None, typer.Option(help="NAME=DIR served here; the first is the baseline.")] = None,
    endpoint: Annotated[list[str] | None, typer.Option(help="NAME=URL of a running server (after --variant).")] = None,
    preset: Annotated[str | None, typer.Option(help=PRESET_HELP)] = None,
    dtype: Annotated[
        list[str] | None,
        typer.Option(help="NAME=DTYPE: serve --variant NAME in DTYPE (float32, bfloat16, ...); repeatable."),
    ] = None,
    input_len: int = 128,
    output_len: int = 64,
    num_prompts: int = 24,
    dataset: Annotated[Path | None, typer.Option(help="JSONL prompts ({'prompt': ...}) instead of random.")] = None,
    concurrency: Annotated[str | None, typer.Option(help="Max-concurrency levels (default 1,4).")] = None,
    request_rate: Annotated[str | None, typer.Option(help="Request-rate levels in req/s, e.g. 0.5,2.")] = None,
    repeats: Annotated[int, typer.Option(help="Repeats, interleaved across variants.")] = 2,
    warmups: int = 2,
    seed: int = 0,
    slo: Annotated[list[str] | None, typer.Option(help="Goodput SLO, e.g. ttft:500 (ms); repeatable.")] = None,
    tokenizer: Annotated[Path | None, typer.Option(help="Tokenizer for all variants (default: first DIR).")] = None,
    timeout_s: Annotated[float, typer.Option(help="Limit per vLLM client run.")] = 900.0,
    restart: Annotated[
        str, typer.Option(help="per_repeat: a fresh server per repeat; once: every server up, repeats alternating.")
    ] = "per_repeat",
    append_markdown: Annotated[Path | None, typer.Option(help="Append a Markdown section to this file.")] = None,
    verbose: Verbose = False,
) -> None:
    """Benchmark served variants with vLLM's `bench serve`: latency percentiles, throughput, ratios to the first.

    Each --variant is served with the preset's defaults, then its entry for the variant's name, then --dtype.
    """
    setup_logging(verbose)

    from .. import bench as b
    from .. import report as r
    from ..recipe import BenchSpec
    from ..serve import load_preset

    variants = [b.parse_variant(v) for v in variant or []] + [b.parse_variant(e, endpoint=True) for e in endpoint or []]
    per_variant = {name: {"dtype": d} for name, d in b.parse_dtypes(dtype or [], variants).items()}
    options = b.variant_options(load_preset(preset), {}, per_variant=per_variant)
    spec = from_options(  # the recipe's bench section, so a bad value names its option; its `variants` go unused
        lambda: BenchSpec(
            input_len=input_len, output_len=output_len, num_prompts=num_prompts, dataset=dataset,
            concurrency=_levels(concurrency), request_rates_per_s=_levels(request_rate), repeats=repeats,
            warmups=warmups, seed=seed, slos=slo or [], timeout_s=timeout_s, restart=restart,  # type: ignore[arg-type]
        ),
        request_rates_per_s="--request-rate",
        slos="--slo",
    )  # fmt: skip
    workload = b.Workload.from_spec(spec)

    def show(summary: dict[str, Any]) -> None:
        headers, rows = r.summary_rows(summary, metrics=("ttft", "tpot"), percentiles=(50, 99))  # all: summary.json
        table = Table(title=f"vLLM bench serve: medians over repeats ({out_dir / 'bench'})")
        for h in headers:
            table.add_column(h, justify="left" if h in ("variant", "level") else "right")
        for row in rows:
            table.add_row(*row)
        out.print(table)
        for line in r.verdicts(summary):
            out.print(line.replace("**", ""))

    try:
        result = b.run_benchmark(
            variants,
            workload,
            out_dir=out_dir,
            tokenizer=tokenizer,
            timeout_s=spec.timeout_s,
            options=options,
            restart=spec.restart,
        )
        summary = result.to_dict()
    except b.BenchIncompleteError as err:
        show(err.summary.to_dict())
        raise
    show(summary)
    if append_markdown is not None:
        append_bench_section(append_markdown, summary)


def _levels(text: str | None) -> list[Any] | None:
    """--concurrency/--request-rate "1,4" as the bench section's list: strings, which pydantic parses as the field's
    numbers (a bad one names the option)."""
    return None if text is None else [x.strip() for x in text.split(",") if x.strip()]
