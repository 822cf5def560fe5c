"""Quality of a checkpoint: perplexity on held-out prose, and greedy agreement between two checkpoints.

Perplexity uses the standard strided sliding window: windows of `context_len` tokens start every `stride`
tokens, and each window scores only the tokens the previous window did not, so every token is predicted once,
with at least `context_len - stride` tokens of context (except at the start of the text).

Greedy agreement compares what two checkpoints generate from the same prompts (spans of the held-out text):
the fraction of generated positions where they chose the same token, and the mean length of the common prefix.
It is reported, not asserted: a quantized model is not expected to match its float source token for token.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import ShortGPTError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

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
    from tqdm.auto import tqdm

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
    from .modeling import load_model, tokenizer_adds_bos

    model, tokenizer = load_model(Path(model_dir), dtype=dtype)
    bos = tokenizer_adds_bos(tokenizer) if add_bos is None else add_bos
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


def evaluate_variants(
    models: Mapping[str, Path],
    *,
    references: Mapping[str, str],
    text: str = "austen:persuasion",
    context_len: int = 512,
    stride: int = 256,
    max_tokens: int = 16384,
    greedy_prompts: int = 8,
    greedy_tokens: int = 32,
    add_bos: bool | None = None,
    dtype: str = "float32",
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity of every model, and greedy agreement of each `variant` with `references[variant]`.

    Models are loaded one at a time (GPTQ folders dequantized, see modeling.load_model) in `dtype`. Returns the
    content of eval.json: settings, {"perplexity": {name: ...}, "agreement": [...]}.
    """
    from .modeling import load_model, tokenizer_adds_bos

    ppl: dict[str, dict[str, Any]] = {}
    greedy: dict[str, list[list[int]]] = {}
    for name, folder in models.items():
        logger.info("eval: %s (%s)", name, folder)
        model, tokenizer = load_model(Path(folder), dtype=dtype)
        bos = tokenizer_adds_bos(tokenizer) if add_bos is None else add_bos
        ids = heldout_token_ids(tokenizer, text, max_tokens=max_tokens, add_bos=bos)
        ppl[name] = perplexity(
            model, ids, context_len=context_len, stride=stride, text=text, progress=progress
        ).to_dict()
        if greedy_prompts:
            prompts = prompt_spans(ids, n_prompts=greedy_prompts, bos=tokenizer.bos_token_id if bos else None)
            greedy[name] = greedy_continuations(model, prompts, new_tokens=greedy_tokens)
        del model
    agreements = [
        agreement(v, r, greedy[v], greedy[r]).to_dict() for v, r in references.items() if v in greedy and r in greedy
    ]
    settings = {"text": text, "context_len": context_len, "stride": stride, "max_tokens": max_tokens}
    settings |= {"greedy_prompts": greedy_prompts, "greedy_tokens": greedy_tokens, "dtype": dtype}
    return {**settings, "perplexity": ppl, "agreement": agreements, "greedy_tokens_by_variant": greedy}
