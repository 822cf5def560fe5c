"""Multiple-choice accuracy as lm-evaluation-harness scores it: each choice by the summed log-probability of its
tokens after the prompt; acc takes the best sum, acc_norm the best sum per character of the choice. The items come
from tasks.py; `evaluate_tasks` scores a checkpoint folder, `run_tasks` a loaded model (the eval stage, the budget
search and the analyses share it).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import EvalError
from .gen import continuation_logprobs, is_gen_checkpoint

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .tasks import LoadedTask, MCItem

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskResult:
    task: str
    acc: float
    acc_norm: float
    n: int  # items
    acc_stderr: float
    acc_norm_stderr: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, context: str, continuation: str, *, add_bos: bool
) -> tuple[list[int], list[int]]:
    """Token ids of a context and of its continuation, as lm-evaluation-harness splits them: trailing spaces of
    the context move to the continuation, then context+continuation is encoded whole and the continuation is
    what follows the context's own tokens (so a tokenizer's merges across the boundary stay as in the text)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    bos = [tokenizer.bos_token_id] if add_bos else []
    whole = bos + tokenizer(context + continuation, add_special_tokens=False, verbose=False)["input_ids"]
    ctx = bos + tokenizer(context, add_special_tokens=False, verbose=False)["input_ids"]
    if not ctx or len(whole) <= len(ctx):
        raise EvalError(f"cannot score {continuation!r} after {context[-40:]!r}: the context or choice is empty")
    return ctx, whole[len(ctx) :]


def continuation_loglikelihoods(
    model: PreTrainedModel,
    requests: list[tuple[list[int], list[int]]],
    *,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "loglikelihood",
) -> list[float]:
    """Σ_j log p(continuation_j | context, continuation_<j) for each (context_ids, continuation_ids).

    The model reads (context + continuation)[:-1], left-truncated to its context length. Requests with the same
    input share one row (the 4 one-token answers " A".." D" after one MMLU prompt are one forward). Rows are
    batched longest first with right padding, and only the positions that predict a continuation token are sent
    through the LM head.
    """
    from .runtime import tqdm

    if batch_size < 1:
        raise EvalError(f"batch size must be at least 1, got {batch_size}")
    max_len = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    if is_gen_checkpoint(model.config):  # one forward over context + continuation would skip layers for every token
        return _gen_loglikelihoods(model, requests, max_len=max_len, progress=progress, desc=desc)
    rows: dict[tuple[int, ...], list[int]] = {}  # input ids → the requests that read them
    for i, (ctx, cont) in enumerate(requests):
        rows.setdefault(tuple((ctx + cont)[-(max_len + 1) : -1]), []).append(i)
    order = sorted(rows, key=lambda ids: (-len(ids), ids))
    device = next(model.parameters()).device
    out = [0.0] * len(requests)
    batches = range(0, len(order), batch_size)
    with torch.inference_mode():
        for start in tqdm(batches, desc=desc, unit="batch", disable=not progress):
            batch = order[start : start + batch_size]
            # Right padding needs no attention mask: under the causal mask a real token never sees the pads that
            # follow it, and positions count from 0 as unpadded. Without a mask SDPA takes its fused causal kernel,
            # about 3x faster on 2,000-token MMLU prompts than with one.
            ids = torch.zeros(len(batch), len(batch[0]), dtype=torch.long)
            for b, row in enumerate(batch):
                ids[b, : len(row)] = torch.tensor(row)
            # Row b's continuation of k tokens is predicted at positions len(row)-k .. len(row)-1; only those
            # go through the LM head (its vocabulary-wide output is most of the memory).
            keep = sorted(
                {p for row in batch for i in rows[row] for p in range(len(row) - len(requests[i][1]), len(row))}
            )
            column = {p: c for c, p in enumerate(keep)}
            logits = model(ids.to(device), logits_to_keep=torch.tensor(keep), use_cache=False).logits
            logp = torch.log_softmax(logits.float(), dim=-1)
            for b, row in enumerate(batch):
                for i in rows[row]:
                    cont = requests[i][1]
                    cols = [column[len(row) - len(cont) + j] for j in range(len(cont))]
                    out[i] = float(logp[b, cols, cont].double().sum())
    return out


def _gen_loglikelihoods(
    model: PreTrainedModel, requests: list[tuple[list[int], list[int]]], *, max_len: int, progress: bool, desc: str
) -> list[float]:
    """continuation_loglikelihoods for a ShortGPT-gen model, as generation would score each choice: the context
    as the prompt (one skipping forward), then one decoding step per continuation token. One request at a time."""
    from .runtime import tqdm

    out = []
    for ctx, cont in tqdm(requests, desc=desc, unit="request", disable=not progress):
        ctx = ctx[-max(max_len - len(cont), 1) :]
        logp = continuation_logprobs(model, torch.tensor(ctx), torch.tensor(cont))
        out.append(float(logp.double().sum()))
    return out


def mc_result(task: str, loglikelihoods: list[list[float]], items: list[MCItem]) -> TaskResult:
    """acc: mean over items of [argmax_i ll_i == gold]; acc_norm: the same with ll_i / len(choice_i) in
    characters, without the leading delimiter space (lm-evaluation-harness: len(doc_to_choice(doc)[i]));
    stderr: sample standard deviation / √n (0 for a single item)."""
    if not items or len(items) != len(loglikelihoods):
        raise EvalError(f"{task}: {len(items)} items but {len(loglikelihoods)} sets of scores")

    def chosen(lls: list[float], lengths: list[int]) -> int:
        scores = [ll / n for ll, n in zip(lls, lengths, strict=True)]
        return max(range(len(scores)), key=scores.__getitem__)  # first of ties, as numpy.argmax

    hits, norm_hits = [], []
    for item, lls in zip(items, loglikelihoods, strict=True):
        lengths = [max(len(c.removeprefix(" ")), 1) for c in item.choices]
        hits.append(float(chosen(lls, [1] * len(lls)) == item.gold))
        norm_hits.append(float(chosen(lls, lengths) == item.gold))
    return TaskResult(task, _mean(hits), _mean(norm_hits), len(items), _stderr(hits), _stderr(norm_hits))


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _stderr(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def mc_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: list[MCItem],
    *,
    batch_size: int = 8,
    add_bos: bool = False,
    progress: bool = True,
    task: str = "",
) -> TaskResult:
    """Accuracy of a model on multiple-choice items by the log-likelihood of each choice given the context."""
    requests = [encode_pair(tokenizer, it.context, c, add_bos=add_bos) for it in items for c in it.choices]
    flat = continuation_loglikelihoods(model, requests, batch_size=batch_size, progress=progress, desc=task or "mc")
    lls, start = [], 0
    for it in items:
        lls.append(flat[start : start + len(it.choices)])
        start += len(it.choices)
    return mc_result(task, lls, items)


def evaluate_tasks(
    model_dir: Path,
    *,
    tasks: Sequence[str],
    limit: int | None = None,
    shots: int | None = None,
    batch_size: int = 8,
    add_bos: bool | None = None,
    dtype: str = "float32",
    progress: bool = True,
) -> dict[str, Any]:
    """Multiple-choice accuracy of a checkpoint folder on `tasks` (names in tasks.TASKS).

    All task data is loaded before the model, so a missing data set fails at once. Returns per-task results
    (acc, acc_norm, n, stderrs, shots, split, source, duration_s) and their unweighted average over tasks.
    """
    from .modeling import decide_add_bos, load_model
    from .tasks import load_task

    loaded = [load_task(name, limit=limit, shots=shots) for name in tasks]
    model, tokenizer = load_model(Path(model_dir), dtype=dtype)
    bos = decide_add_bos(tokenizer, requested=add_bos)
    results = run_tasks(model, tokenizer, loaded, batch_size=batch_size, add_bos=bos, progress=progress)
    settings = {"limit": limit, "batch_size": batch_size, "add_bos": bos, "dtype": dtype}
    return {"model": str(model_dir), **settings, **results}


def run_tasks(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    loaded: Sequence[LoadedTask],
    *,
    batch_size: int,
    add_bos: bool,
    progress: bool,
) -> dict[str, Any]:
    """{"tasks": {name: acc, acc_norm, n, stderrs, shots, split, source, duration_s}, "average": {acc, acc_norm}}."""
    results: dict[str, dict[str, Any]] = {}
    for task in loaded:
        start = time.perf_counter()
        result = mc_accuracy(
            model, tokenizer, task.items, batch_size=batch_size, add_bos=add_bos, progress=progress, task=task.name
        )
        results[task.name] = result.to_dict() | {
            "shots": task.shots,
            "split": task.split,
            "source": task.source,
            "duration_s": round(time.perf_counter() - start, 2),
        }
        logger.info("%s: acc %.4f, acc_norm %.4f (n=%d)", task.name, result.acc, result.acc_norm, result.n)
    average = {k: _mean([r[k] for r in results.values()]) for k in ("acc", "acc_norm")}
    return {"tasks": results, "average": average}
