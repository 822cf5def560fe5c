"""Quality of a checkpoint on held-out text: perplexity, prompted perplexity, greedy agreement between two
checkpoints and the generation probe. `evaluate_variants` (the eval stage) and `evaluate_checkpoint` (the `eval`
command) add multiple-choice accuracy from multiple_choice.py.

Perplexity uses the standard strided sliding window: windows of `context_len` tokens start every `stride`
tokens, and each window scores only the tokens the previous window did not, so every token is predicted once,
with at least `context_len - stride` tokens of context (except at the start of the text).

Greedy agreement compares what two checkpoints generate from the same prompts (spans of the held-out text):
the fraction of generated positions where they chose the same token, and the mean length of the common prefix.
It is reported, not asserted: a quantized model is not expected to match its float source token for token.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import EvalError
from .gen import continuation_logprobs, is_gen_checkpoint, read_gen_config
from .multiple_choice import run_tasks
from .records import EvalResult

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .recipe import EvalSpec
    from .tasks import LoadedTask

logger = logging.getLogger(__name__)


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


# ------------------------------------------------------------------------------------- one checkpoint (eval)
@dataclass(frozen=True)
class CheckpointEvalSpec:
    """What `eval` measures on one checkpoint: held-out perplexity, our multiple-choice `tasks` (names in
    tasks.TASKS), lm-evaluation-harness `lm_eval` tasks, or several. A combination that measures nothing, or
    `limit`/`shots` without tasks to apply to, fails here, before any model loads."""

    text: str = "austen:persuasion"
    context_len: int = 512
    stride: int = 256
    max_tokens: int = 16384
    tasks: tuple[str, ...] = ()
    lm_eval: tuple[str, ...] = ()
    limit: int | None = None  # items per task
    shots: int | None = None  # few-shot examples per prompt (default: the task's)
    batch_size: int = 8
    perplexity: bool | None = None  # None: only when no task is given

    def __post_init__(self) -> None:
        if not self.tasks and not self.lm_eval and (self.limit is not None or self.shots is not None):
            raise EvalError("--limit and --shots apply to multiple-choice tasks: add --tasks, e.g. --tasks piqa")
        if not self.runs_perplexity and not self.tasks and not self.lm_eval:
            raise EvalError("nothing to evaluate: give --tasks, or drop --no-perplexity")

    @property
    def runs_perplexity(self) -> bool:
        return self.perplexity if self.perplexity is not None else not (self.tasks or self.lm_eval)


def evaluate_checkpoint(
    model: str, spec: CheckpointEvalSpec, *, log: Path | None = None, progress: bool = True
) -> dict[str, Any]:
    """`eval`: what `spec` asks of one checkpoint (a folder, or any model spec modeling.resolve_checkpoint takes),
    with the libraries' output in `log` (runtime.third_party_output) when given.

    Returns the report `eval --json` prints: multiple_choice.evaluate_tasks' layout with tasks; the perplexity's
    fields at the top level when it is measured alone, else under "perplexity"; the harness's under "lm_eval".
    """
    from .modeling import resolve_checkpoint
    from .multiple_choice import evaluate_tasks
    from .runtime import third_party_output

    with third_party_output(log) if log is not None else contextlib.nullcontext():
        ckpt = resolve_checkpoint(model)
        report: dict[str, Any] = {"model": model}
        if spec.tasks:
            report |= evaluate_tasks(
                ckpt.path, tasks=spec.tasks, limit=spec.limit, shots=spec.shots, batch_size=spec.batch_size,
                add_bos=ckpt.add_bos, progress=progress,
            )  # fmt: skip
            report["model"] = model
        if spec.runs_perplexity:
            result = evaluate_perplexity(
                ckpt.path, text=spec.text, context_len=spec.context_len, stride=spec.stride,
                max_tokens=spec.max_tokens, add_bos=ckpt.add_bos, progress=progress,
            )  # fmt: skip
            # Alone, the JSON is as it always was; beside tasks, perplexity gets its own key.
            report |= {"perplexity": result.to_dict()} if spec.tasks or spec.lm_eval else result.to_dict()
        if spec.lm_eval:
            from .harness import run_lm_eval

            report["lm_eval"] = run_lm_eval(
                ckpt.path, list(spec.lm_eval), limit=spec.limit, shots=spec.shots, batch_size=spec.batch_size,
                add_bos=ckpt.add_bos, progress=progress,
            )  # fmt: skip
    return report


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
