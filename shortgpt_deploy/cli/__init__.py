"""The `shortgpt-deploy` command: parse, call one library function, print a summary.

Commands by group: prune.py (score, prune, build, repair, quantize), quality.py (eval, analyze), serving.py (serve,
bench), report.py (report, models); what they share is in _common.py. Registered here, in `--help` order. Heavy
imports (torch, transformers) happen inside the commands so that `--help` answers at once.
"""

from __future__ import annotations

import sys

from . import prune, quality, report, serving
from ._common import app

app.command()(prune.score)
app.command()(prune.prune)
app.command()(prune.build)
app.command()(prune.repair)
app.command()(prune.quantize)
app.command("eval")(quality.evaluate)
app.command()(serving.serve)
app.command()(serving.bench)
app.command()(report.report)
app.command()(quality.analyze)
app.command()(report.models)

__all__ = ["app", "main"]


def main() -> None:  # pragma: no cover - console script entry
    sys.exit(app())
