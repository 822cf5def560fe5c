"""Commands that make checkpoints: score, prune, build (a whole recipe), repair, quantize."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..errors import ShortGPTError
from ._common import (
    AsJson,
    NoProgress,
    Verbose,
    append_bench_section,
    cache_log,
    console,
    from_options,
    handles_errors,
    ints,
    out,
    print_scores,
    print_table,
    setup_logging,
)

if TYPE_CHECKING:
    from ..importance import LayerScores
    from ..pipeline import BuildResult
    from ..recipe import PruneSpec, RepairSpec
    from ..repair import RepairResult


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
    stream: Annotated[
        bool | None,
        typer.Option(
            "--stream/--no-stream",
            help="Score one decoder layer at a time, read from the files (models larger than memory); default: "
            "only when the weights do not fit.",
        ),
    ] = None,
    verbose: Verbose = False,
    no_progress: NoProgress = False,
) -> None:
    """Score every decoder layer (Block Influence by default) and write scores.json."""
    setup_logging(verbose)
    from ..pipeline import score_model
    from ..recipe import CalibrationSpec, ModelSpec
    from ..runtime import third_party_output

    calib = from_options(
        lambda: CalibrationSpec.from_cli(
            calibration, samples=samples, seq_len=seq_len, batch_size=batch_size, seed=seed
        )
    )
    spec = from_options(lambda: ModelSpec(path=model, dtype=dtype))  # type: ignore[arg-type]
    if n_remove is not None and n_remove < 1:
        raise ShortGPTError(f"--n-remove must be at least 1, got {n_remove}")
    with third_party_output(out.with_suffix(".log")):
        scores = score_model(
            spec, calib, metric=metric, out=out, n_remove=n_remove, progress=not no_progress,
            stream={None: "auto", True: "on", False: "off"}[stream],
        )  # fmt: skip
    print_scores(scores.scores, scores.removal_order, scores.metric)
    console.print(f"wrote {out} ({scores.calibration['num_tokens']} calibration tokens, {scores.duration_s:.1f} s)")


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
    setup_logging(verbose)
    from ..pipeline import prune_model
    from ..recipe import ModelSpec
    from ..runtime import third_party_output

    loaded, spec = _prune_spec(layers, scores, n_remove, ratio, protect, mode, rotate_skipped_keys)
    with third_party_output(cache_log("prune") if dry_run else out_dir.with_name(out_dir.name + ".log")):
        plan, notes = prune_model(
            ModelSpec(path=model), out_dir=out_dir, prune=spec, scores=loaded, dry_run=dry_run, force=force,
            progress=not no_progress,
        )  # fmt: skip
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


def _prune_spec(
    layers: str | None,
    scores: Path | None,
    n_remove: int | None,
    ratio: float | None,
    protect: str,
    mode: str,
    rotate_skipped_keys: bool,
) -> tuple[LayerScores | None, PruneSpec]:
    """prune's options as the scores they choose by and the recipe's prune section (its checks, option names)."""
    from ..importance import LayerScores
    from ..recipe import PruneSpec

    if (n_remove is not None or ratio is not None) and scores is None:
        raise ShortGPTError("--n-remove and --ratio choose by score: give --scores scores.json (from `score`)")
    given = [name for name, v in (("--layers", layers), ("--n-remove", n_remove), ("--ratio", ratio)) if v is not None]
    if len(given) != 1:
        raise ShortGPTError(f"give exactly one of --layers, --n-remove or --ratio (got {', '.join(given) or 'none'})")
    loaded = LayerScores.load(scores) if scores is not None else None
    spec = from_options(
        lambda: PruneSpec(
            metric=loaded.metric if loaded else "bi",  # type: ignore[arg-type]
            n_remove=n_remove,
            ratio=ratio,
            layers=ints(layers, "--layers"),
            protect=ints(protect, "--protect") or [],
            mode=mode,  # type: ignore[arg-type]
            # given only where it means something, so that --no-rotate-skipped-keys without gen is refused
            **({"rotate_skipped_keys": rotate_skipped_keys} if mode == "gen" or not rotate_skipped_keys else {}),
        )
    )
    return loaded, spec


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
    """Run a recipe: score → plan → prune, then its quantize, eval and bench sections, then report.md.

    The console shows one line per stage (with progress bars while it runs), warnings and errors, then the
    headline table and the report's path; everything else, ours and the libraries', is in the run's logs/
    (--verbose: all of ours on the console too)."""
    setup_logging(verbose, stage_lines=True)
    from ..pipeline import build as run_build
    from ..preflight import load_recipe
    from ..run import RunDir

    parsed = load_recipe(recipe)
    result = run_build(
        parsed, recipe_text=recipe.read_text(), out_dir=out_dir, force=force, dry_run=dry_run,
        progress=not no_progress,
    )  # fmt: skip
    if append_markdown is not None and (summary := RunDir(result.run_dir).load_bench_summary()) is not None:
        append_bench_section(append_markdown, summary.to_dict())
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        _print_build(result)


def _print_build(result: BuildResult) -> None:
    """The plan, the headline table (quality, size and serving speed per variant) and where the rest is."""
    from ..report import load_run, variant_infos
    from ..serving_tables import fmt

    out.print(result.plan.summary())
    run = load_run(result.run_dir)
    infos, summary = variant_infos(run), run.summary.to_dict() if run.summary else None
    prompted = run.evaluation.prompted_perplexity if run.evaluation else {}
    level = summary["levels"][0] if summary else None
    headers = ["variant", "layers", "weights MB", "perplexity"]
    headers += [f"out tok/s {level}", f"÷ {summary['baseline']}", f"TTFT p50 ms {level}"] if summary else []
    rows = []
    for name, info in infos.items():
        ppl = (
            fmt(info.perplexity, ".2f") if info.perplexity else fmt((prompted.get(name) or {}).get("perplexity"), ".2f")
        )
        row = [name, fmt(info.layers, "d"), fmt(info.weight_bytes / 1e6 if info.weight_bytes else None, ".0f"), ppl]
        if summary is not None:
            cell = summary["variants"].get(name, {}).get(level) or {}
            median, ratio = cell.get("median") or {}, cell.get("tokens_per_s_ratio") or {}
            row += [fmt(median.get("output_tokens_per_s")), fmt(ratio.get("median"), ".2f")]
            row += [fmt(median.get("p50_ttft_ms"), ".0f")]
        rows.append(row)
    print_table("headline (all of it: report.md)", headers, rows, left=("variant",))
    if any(name in prompted and not info.perplexity for name, info in infos.items()):
        out.print("perplexity of a gen variant: its prompted perplexity (its layers skip the prompt only)")
    out.print(f"report: {run.dir.report}")
    out.print(f"logs:   {run.dir.logs}/ (libraries' output and ours, one file per stage)")


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
    setup_logging(verbose)
    from ..modeling import resolve_checkpoint
    from ..recipe import CalibrationSpec, ModelSpec
    from ..repair import repair_pruned
    from ..runtime import third_party_output

    calib = from_options(lambda: CalibrationSpec.from_cli(calibration, samples=samples, seq_len=seq_len))
    spec = _repair_spec(method, objective, ridge, samples, seq_len, batch_size, distill_steps, distill_time_s,
                        distill_trainable)  # fmt: skip
    model = from_options(lambda: ModelSpec(path=dense))
    with third_party_output(out_dir.with_name(out_dir.name + ".log")):
        source = resolve_checkpoint(model.path, revision=model.revision)
        result = repair_pruned(
            source.path, pruned_dir, out_dir=out_dir, repair=spec, calibration=calib, add_bos=source.add_bos,
            force=force, progress=not no_progress,
        )  # fmt: skip
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    _print_repair(result, out_dir)


def _repair_spec(
    method: str,
    objective: str,
    ridge: float,
    samples: int,
    seq_len: int,
    batch_size: int,
    distill_steps: int,
    distill_time_s: float,
    distill_trainable: str,
) -> RepairSpec:
    """repair's options as the recipe's repair section (its checks; errors name the options)."""
    from ..recipe import DistillSpec, RepairSpec

    return from_options(
        lambda: RepairSpec(
            method=[m.strip() for m in method.split(",") if m.strip()],  # type: ignore[arg-type]
            objective=objective,  # type: ignore[arg-type]
            ridge=ridge,
            samples=samples,
            seq_len=seq_len,
            batch_size=batch_size,
            distill=from_options(
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


def _print_repair(result: RepairResult, out_dir: Path) -> None:
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
    setup_logging(verbose)
    from ..quantize import quantize_checkpoint
    from ..recipe import CalibrationSpec
    from ..runtime import third_party_output

    calib = from_options(lambda: CalibrationSpec.from_cli(calibration, samples=samples, seq_len=seq_len))
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
