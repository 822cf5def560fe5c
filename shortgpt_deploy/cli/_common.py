"""What every command shares: the typer app, the two consoles, logging setup, the error handler, option types and
small parsing helpers. The commands live in the group modules (prune, quality, serving, report); __init__ lists
them in `--help` order.
"""

from __future__ import annotations

import functools
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

from ..errors import ShortGPTError
from ..runtime import CONSOLE

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Depth-prune LLMs by Block Influence (ShortGPT) and ship the result to transformers and vLLM.",
)
console = Console(file=CONSOLE)  # stderr, and still the terminal while libraries' output goes to a log
out = Console()
F = TypeVar("F", bound=Callable[..., Any])
S = TypeVar("S")


def setup_logging(verbose: bool, *, stage_lines: bool = False) -> None:
    """Our records on the console (DEBUG with --verbose); `stage_lines` (build without --verbose): only warnings,
    errors and one line per stage there, the rest in the stages' log files (runtime.stage_lines_only)."""
    from ..runtime import stage_lines_only, transient_bars

    transient_bars(False)  # a command before this one (in one process: tests) may have set them
    handler = RichHandler(console=console, show_path=False, show_time=False)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=stage_lines_only(handler) if stage_lines and not verbose else [handler],
        force=True,
    )
    for noisy in ("httpx", "huggingface_hub", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def handles_errors(fn: F) -> F:
    """Turn project errors into one red line and exit code 2; Ctrl-C, SIGTERM and SIGHUP into 128 + the signal's
    number, after every clean-up ran (servers stopped, temporary folders removed)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ..processes import exit_code_of, raise_on_termination

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


def cache_log(command: str) -> Path:
    """The log of a command that writes no output folder (each run replaces the last)."""
    from ..modeling import cache_dir

    return cache_dir() / "logs" / f"{command}.log"


def ints(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ShortGPTError(f"{what} must be comma-separated integers, e.g. 2,5,7 (got {text!r})") from None


def from_options(build: Callable[[], S], **options: str) -> S:
    """A recipe section built from command-line options; a value out of range names the option and the range
    (`--samples must be at least 1, got 0`), not the field. `options` maps a field to its option where the two
    names differ."""
    from pydantic import ValidationError

    from ..recipe import option_errors

    try:
        return build()
    except ValidationError as err:
        raise ShortGPTError(option_errors(err, options)) from None


Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]
NoProgress = Annotated[bool, typer.Option("--no-progress", help="Hide progress bars.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of tables.")]


def print_table(title: str, headers: list[str], rows: list[list[str]], *, left: tuple[str, ...] = ()) -> None:
    """A rich table on stdout; columns right-aligned except those named in `left`."""
    table = Table(title=title)
    for h in headers:
        table.add_column(h, justify="left" if h in left else "right")
    for row in rows:
        table.add_row(*row)
    out.print(table)


def print_scores(values: list[float], order: list[int], metric: str, removed: set[int] | None = None) -> None:
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


def append_bench_section(path: Path, summary: dict[str, Any]) -> None:
    import shlex
    import time

    from ..serving_tables import append_markdown, render_markdown

    command = shlex.join(["shortgpt-deploy", *sys.argv[1:]])
    append_markdown(path, render_markdown(summary, command=command, date=time.strftime("%Y-%m-%d %H:%M %Z")))
    console.print(f"appended the benchmark results to {path}")
