"""Quality of a checkpoint: perplexity on held-out prose (multiple-choice accuracy follows in a later stage).

Perplexity uses the standard strided sliding window: windows of `context_len` tokens start every `stride`
tokens, and each window scores only the tokens the previous window did not, so every token is predicted once,
with at least `context_len - stride` tokens of context (except at the start of the text).
"""

from __future__ import annotations

import logging
import math
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
