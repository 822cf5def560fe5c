"""Quality of a checkpoint: perplexity on held-out prose, greedy agreement between two checkpoints, and
multiple-choice accuracy on benchmarks (the items come from tasks.py).

Perplexity uses the standard strided sliding window: windows of `context_len` tokens start every `stride`
tokens, and each window scores only the tokens the previous window did not, so every token is predicted once,
with at least `context_len - stride` tokens of context (except at the start of the text).

Greedy agreement compares what two checkpoints generate from the same prompts (spans of the held-out text):
the fraction of generated positions where they chose the same token, and the mean length of the common prefix.
It is reported, not asserted: a quantized model is not expected to match its float source token for token.

Multiple-choice accuracy follows lm-evaluation-harness: each choice is scored by the summed log-probability of
its tokens after the prompt; acc takes the best sum, acc_norm the best sum per character of the choice.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import ShortGPTError
from .gen import continuation_logprobs, is_gen_checkpoint, read_gen_config

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .recipe import EvalSpec
    from .tasks import LoadedTask, MCItem

logger = logging.getLogger(__name__)


class EvalError(ShortGPTError):
    """Evaluation settings or data that cannot work."""


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    nll_per_token: float
    num_tokens: int  # tokens predicted
    context_len: int
    stride: int
    text: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def heldout_token_ids(
    tokenizer: PreTrainedTokenizerBase, text_spec: str, *, max_tokens: int, add_bos: bool
) -> list[int]:
    """The first `max_tokens` tokens of a held-out text (a packaged corpus like austen:persuasion, or a file)."""
    from .calibration import load_documents
    from .recipe import CalibrationSpec

    docs = load_documents(CalibrationSpec.from_cli(text_spec))
    ids = tokenizer("\n\n".join(docs), add_special_tokens=False, verbose=False)["input_ids"][:max_tokens]
    if add_bos:
        ids = [tokenizer.bos_token_id, *ids[: max_tokens - 1]]
    if len(ids) < 2:
        raise EvalError(f"held-out text {text_spec} gives {len(ids)} tokens; perplexity needs at least 2")
    return ids


def perplexity(
    model: PreTrainedModel,
    token_ids: list[int],
    *,
    context_len: int = 512,
    stride: int = 256,
    text: str = "",
    progress: bool = True,
) -> Perplexity:
    """exp(mean over predicted tokens of −log p(token | up to `context_len` previous tokens))."""
    from .runtime import tqdm

    if not 0 < stride <= context_len:
        raise EvalError(f"stride must be in 1..context_len ({context_len}), got {stride}")
    ids = torch.tensor(token_ids, dtype=torch.long)
    device = next(model.parameters()).device
    nll_sum, count, prev_end = 0.0, 0, 0
    starts = range(0, max(len(ids) - 1, 1), stride)
    with torch.inference_mode():
        for begin in tqdm(starts, desc="perplexity", unit="window", disable=not progress):
            end = min(begin + context_len, len(ids))
            window = ids[begin:end].unsqueeze(0).to(device)
            logits = model(window, use_cache=False).logits[0, :-1].float()
            targets = window[0, 1:]
            nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
            new = end - max(prev_end, begin + 1)  # tokens this window predicts for the first time
            nll_sum += float(nll[-new:].double().sum()) if new > 0 else 0.0
            count += max(new, 0)
            prev_end = end
            if end == len(ids):
                break
    mean = nll_sum / count
    return Perplexity(math.exp(mean), mean, count, context_len, stride, text)


@dataclass(frozen=True)
class PromptedPerplexity:
    perplexity: float
    mean_nll: float
    tokens: int  # scored tokens
    spans: int
    prompt_len: int
    scored_len: int
    text: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prompted_perplexity(
    model: PreTrainedModel,
    token_ids: list[int],
    *,
    prompt_len: int = 224,
    scored_len: int = 32,
    text: str = "",
    progress: bool = True,
) -> PromptedPerplexity:
    """exp(mean −log p(token | its span's prompt and the scored tokens before it)) over consecutive spans of
    `prompt_len` prompt tokens followed by `scored_len` scored ones: perplexity as generation sees it.

    A ShortGPT-gen model reads each prompt in one forward (its planned layers skipping) and each scored token in
    one decoding step (gen.continuation_logprobs); any other model gets one forward per span, which computes the
    same numbers. So every variant of a run is scored on the same tokens under the same protocol, and the plain
    `perplexity` (one forward per window, which a gen model would skip through) is not needed for gen.
    """
    from .runtime import tqdm

    if prompt_len < 1 or scored_len < 1:
        raise EvalError(f"prompted perplexity needs prompt_len and scored_len ≥ 1, got {prompt_len}, {scored_len}")
    span = prompt_len + scored_len
    if len(token_ids) < span:
        raise EvalError(f"held-out text has {len(token_ids)} tokens; one prompted span needs {span}")
    starts = range(0, len(token_ids) - span + 1, span)
    ids = torch.tensor(token_ids, dtype=torch.long)
    device = next(model.parameters()).device
    gen, nll_sum = is_gen_checkpoint(model.config), 0.0
    with torch.inference_mode():
        for begin in tqdm(starts, desc="prompted perplexity", unit="span", disable=not progress):
            window = ids[begin : begin + span].to(device)
            if gen:
                logp = continuation_logprobs(model, window[:prompt_len], window[prompt_len:])
            else:
                logits = model(window[None, :-1], use_cache=False).logits[0, prompt_len - 1 :].float()
                logp = torch.log_softmax(logits, dim=-1).gather(1, window[prompt_len:, None]).squeeze(1)
            nll_sum -= float(logp.double().sum())
    tokens = len(starts) * scored_len
    mean = nll_sum / tokens
    return PromptedPerplexity(math.exp(mean), mean, tokens, len(starts), prompt_len, scored_len, text)


def evaluate_perplexity(
    model_dir: Path,
    *,
    text: str = "austen:persuasion",
    context_len: int = 512,
    stride: int = 256,
    max_tokens: int = 16384,
    add_bos: bool | None = None,
    dtype: str = "float32",
    progress: bool = True,
) -> Perplexity:
    """Load a checkpoint folder and measure its perplexity on held-out text."""
    from .modeling import decide_add_bos, load_model

    model, tokenizer = load_model(Path(model_dir), dtype=dtype)
    bos = decide_add_bos(tokenizer, requested=add_bos)
    ids = heldout_token_ids(tokenizer, text, max_tokens=max_tokens, add_bos=bos)
    return perplexity(model, ids, context_len=context_len, stride=stride, text=text, progress=progress)


# ------------------------------------------------------------------------------------------ greedy agreement
@dataclass(frozen=True)
class Agreement:
    variant: str
    reference: str
    prompts: int
    new_tokens: int  # generated per prompt
    token_match: float  # fraction of generated positions with the same token
    mean_prefix_tokens: float  # mean number of leading generated tokens that are identical
    identical_outputs: int  # prompts whose whole continuation is identical

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prompt_spans(
    token_ids: list[int], *, n_prompts: int, prompt_len: int = 32, bos: int | None = None
) -> list[list[int]]:
    """`n_prompts` spans of `prompt_len` tokens spread evenly over a held-out text (after an optional BOS)."""
    body = token_ids[1:] if bos is not None and token_ids and token_ids[0] == bos else token_ids
    if len(body) < prompt_len:
        raise EvalError(f"held-out text has {len(body)} tokens; greedy prompts need at least {prompt_len}")
    step = max((len(body) - prompt_len) // max(n_prompts, 1), 1)
    spans = [body[i * step : i * step + prompt_len] for i in range(n_prompts)]
    return [([bos] if bos is not None else []) + span for span in spans]


def greedy_continuations(model: PreTrainedModel, prompts: list[list[int]], *, new_tokens: int) -> list[list[int]]:
    """Argmax decoding with the KV cache, exactly `new_tokens` per prompt (EOS does not stop it, as vLLM's
    `--ignore-eos`); no generation config applies, so a checkpoint's sampling defaults cannot change it."""
    device = next(model.parameters()).device
    outputs = []
    with torch.inference_mode():
        for prompt in prompts:
            out = model(torch.tensor([prompt], device=device), use_cache=True)
            tokens = [int(out.logits[0, -1].argmax())]
            while len(tokens) < new_tokens:
                step = torch.tensor([[tokens[-1]]], device=device)
                out = model(step, past_key_values=out.past_key_values, use_cache=True)
                tokens.append(int(out.logits[0, -1].argmax()))
            outputs.append(tokens)
    return outputs


def agreement(variant: str, reference: str, got: list[list[int]], ref: list[list[int]]) -> Agreement:
    """How often `got` chose the same greedy token as `ref`, position by position and as a common prefix."""
    if len(got) != len(ref) or not got:
        raise EvalError(f"{variant} and {reference} have different or no greedy outputs to compare")
    same = sum(a == b for g, r in zip(got, ref, strict=True) for a, b in zip(g, r, strict=True))
    prefixes = [
        next((i for i, (a, b) in enumerate(zip(g, r, strict=True)) if a != b), len(g))
        for g, r in zip(got, ref, strict=True)
    ]
    total = sum(len(g) for g in got)
    return Agreement(
        variant,
        reference,
        len(got),
        len(got[0]),
        same / total,
        sum(prefixes) / len(got),
        sum(g == r for g, r in zip(got, ref, strict=True)),
    )


@dataclass
class EvalResult:
    """What the eval stage measured: the content of eval.json (`to_dict`), in the layout earlier versions wrote,
    so that the report and old run folders read it unchanged. Optional parts are left out of the JSON when empty:
    prompted perplexity (only with a gen variant), the generation probe, task accuracy, and the run's `models`
    and `provenance` (the eval stage adds them; analyses do not)."""

    text: str
    context_len: int
    stride: int
    max_tokens: int
    greedy_prompts: int
    greedy_tokens: int
    dtype: str
    perplexity: dict[str, dict[str, Any]]  # variant → Perplexity.to_dict(); none for a gen variant
    agreement: list[dict[str, Any]]  # Agreement.to_dict() per (variant, reference)
    greedy_tokens_by_variant: dict[str, list[list[int]]]
    prompted_perplexity: dict[str, dict[str, Any]] = field(default_factory=dict)  # with a gen variant: every one
    gen_variants: list[str] = field(default_factory=list)
    generation: dict[str, dict[str, float]] | None = None
    tasks: list[str] = field(default_factory=list)
    limit: int | None = None
    accuracy: dict[str, dict[str, Any]] = field(default_factory=dict)  # variant → run_tasks' result
    retention_pct: dict[str, float] = field(default_factory=dict)
    models: dict[str, str] | None = None
    provenance: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        settings = ("text", "context_len", "stride", "max_tokens", "greedy_prompts", "greedy_tokens", "dtype")
        out: dict[str, Any] = {k: getattr(self, k) for k in settings}
        out |= {"perplexity": self.perplexity, "agreement": self.agreement}
        out["greedy_tokens_by_variant"] = self.greedy_tokens_by_variant
        if self.prompted_perplexity:
            out |= {"prompted_perplexity": self.prompted_perplexity, "gen_variants": self.gen_variants}
        if self.generation is not None:
            out["generation"] = self.generation
        if self.tasks:
            out |= {"tasks": self.tasks, "limit": self.limit, "accuracy": self.accuracy}
            out["retention_pct"] = self.retention_pct
        out |= {k: v for k, v in (("models", self.models), ("provenance", self.provenance)) if v is not None}
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalResult:
        """The inverse of to_dict, for an eval.json of any version: the text, window and perplexities are
        required (a KeyError); the optional parts, and the greedy settings and dtype that early files lack, take
        empty values; unknown keys (schema_version) are dropped."""
        fields = {k: d[k] for k in cls.__dataclass_fields__ if d.get(k) is not None}
        early = {"greedy_prompts": 0, "greedy_tokens": 0, "dtype": "", "agreement": [], "greedy_tokens_by_variant": {}}
        required = {k: d[k] for k in ("text", "context_len", "stride", "max_tokens", "perplexity")}
        return cls(**(early | fields | required))


@dataclass
class _Measured:
    """One model's measurements, gathered by evaluate_variants."""

    perplexity: dict[str, Any] | None = None
    prompted: dict[str, Any] | None = None
    greedy: list[list[int]] | None = None
    prompts: list[list[int]] | None = None
    accuracy: dict[str, Any] | None = None


def evaluate_variants(
    models: Mapping[str, Path],
    spec: EvalSpec,
    *,
    references: Mapping[str, str] | None = None,
    add_bos: bool | None = None,
    dtype: str = "float32",
    progress: bool = True,
) -> EvalResult:
    """Perplexity of every model, greedy agreement of each `variant` with `references[variant]`, and accuracy on
    the multiple-choice `spec.tasks` (first `spec.limit` items each) with the paper's retention: average ÷ dense
    × 100. `spec` is the recipe's eval section (analyses build one from their options).

    Models are loaded one at a time (GPTQ folders dequantized, see modeling.load_model) in `dtype`. When one of
    the models is a ShortGPT-gen folder, every model also gets `prompted_perplexity` (prompt_len + scored_len
    spans, the protocol a gen model needs), and the gen model gets no plain `perplexity`: a forward over whole
    windows would skip its layers for every token and measure the pruned model instead.
    """
    from .tasks import load_task

    # missing task data fails before any model loads
    loaded = [load_task(t, limit=spec.limit, shots=spec.shots) for t in spec.tasks]
    gen_names = {n for n, f in models.items() if read_gen_config(Path(f)) is not None}
    measured = {}
    for name, folder in models.items():
        logger.info("eval: %s (%s)", name, folder)
        measured[name] = _measure(
            Path(folder), spec, loaded, gen=name in gen_names, any_gen=bool(gen_names), add_bos=add_bos,
            dtype=dtype, progress=progress,
        )  # fmt: skip
    greedy = {n: m.greedy for n, m in measured.items() if m.greedy is not None}
    accuracy = {n: m.accuracy for n, m in measured.items() if m.accuracy is not None}
    base = (accuracy.get("dense") or {}).get("average", {}).get("acc")
    result = EvalResult(
        spec.text, spec.context_len, spec.stride, spec.max_tokens, spec.greedy_prompts, spec.greedy_tokens, dtype,
        perplexity={n: m.perplexity for n, m in measured.items() if m.perplexity is not None},
        agreement=[agreement(v, r, greedy[v], greedy[r]).to_dict() for v, r in (references or {}).items()
                   if v in greedy and r in greedy],
        greedy_tokens_by_variant=greedy,
        prompted_perplexity={n: m.prompted for n, m in measured.items() if m.prompted is not None},
        gen_variants=sorted(gen_names),
        tasks=list(spec.tasks) if loaded else [],
        limit=spec.limit,
        accuracy=accuracy,
        retention_pct={v: retention_pct(a["average"]["acc"], base) for v, a in accuracy.items() if base},
    )  # fmt: skip
    prompts = next((m.prompts for m in reversed(measured.values()) if m.prompts is not None), None)
    if spec.generation_probe and greedy and prompts and "dense" in models:  # one tokenizer: the same prompts
        result.generation = generation_probe_scores(models["dense"], prompts, greedy, dtype=dtype)
    return result


def _measure(
    folder: Path,
    spec: EvalSpec,
    loaded: Sequence[LoadedTask],
    *,
    gen: bool,
    any_gen: bool,
    add_bos: bool | None,
    dtype: str,
    progress: bool,
) -> _Measured:
    """One model of evaluate_variants: loaded, measured as `spec` says, released."""
    from .modeling import decide_add_bos, load_model

    model, tokenizer = load_model(folder, dtype=dtype)
    bos = decide_add_bos(tokenizer, requested=add_bos)
    ids = heldout_token_ids(tokenizer, spec.text, max_tokens=spec.max_tokens, add_bos=bos)
    got = _Measured()
    if not gen:
        got.perplexity = perplexity(
            model, ids, context_len=spec.context_len, stride=spec.stride, text=spec.text, progress=progress
        ).to_dict()
    if any_gen:
        got.prompted = prompted_perplexity(
            model, ids, prompt_len=spec.prompt_len, scored_len=spec.scored_len, text=spec.text, progress=progress
        ).to_dict()
    if spec.greedy_prompts:
        got.prompts = prompt_spans(ids, n_prompts=spec.greedy_prompts, bos=tokenizer.bos_token_id if bos else None)
        got.greedy = greedy_continuations(model, got.prompts, new_tokens=spec.greedy_tokens)
    if loaded:
        got.accuracy = run_tasks(model, tokenizer, loaded, batch_size=spec.batch_size, add_bos=bos, progress=progress)
    del model
    return got


def retention_pct(acc: float, dense_acc: float) -> float:
    """ShortGPT's retention: 100 × acc ÷ dense_acc (average multiple-choice accuracy of a compressed model over
    the dense model's, in percent). The one formula of the budget, the eval stage and the analyses."""
    return 100 * acc / dense_acc


# ------------------------------------------------------------------------------------------ generative probe
def repetition_rate(tokens: Sequence[int], n: int = 4) -> float:
    """1 − distinct n-grams ÷ n-grams of a sequence: 0 for text that never repeats itself, → 1 for a loop."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def continuation_nll(model: PreTrainedModel, prompt: list[int], continuation: list[int]) -> float:
    """Mean −log p(continuation token | prompt and the continuation before it) under `model`."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt + continuation], device=device)
    with torch.inference_mode():
        logits = model(ids, use_cache=False).logits[0, len(prompt) - 1 : -1].float()
    return float(torch.nn.functional.cross_entropy(logits, ids[0, len(prompt) :]))


def generation_probe_scores(
    reference_dir: Path, prompts: list[list[int]], continuations: Mapping[str, list[list[int]]], *, dtype: str
) -> dict[str, dict[str, float]]:
    """The paper warns that generation degrades first: score each variant's greedy continuations by the dense
    (reference) model's perplexity of them — how plausible the text is to the unpruned model — and by their
    4-gram repetition rate (degenerate loops)."""
    from .modeling import load_model

    reference, _ = load_model(Path(reference_dir), dtype=dtype)
    out = {}
    for name, conts in continuations.items():
        nll = [continuation_nll(reference, p, c) for p, c in zip(prompts, conts, strict=True)]
        out[name] = {
            "reference_perplexity": math.exp(sum(nll) / len(nll)),
            "repetition_rate_4gram": sum(repetition_rate(c) for c in conts) / len(conts),
        }
    return out


# ------------------------------------------------------------------------------ multiple-choice accuracy
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
