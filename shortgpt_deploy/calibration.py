"""Calibration text → seeded blocks of tokens, padded into batches with attention masks.

Each document is tokenized once and cut into consecutive blocks of `seq_len` tokens (no overlap); the seed
picks `samples` of them. A document's last, shorter block is kept, so batches really contain padding and the
scorer must mask it (padded positions are excluded from every mean).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CalibrationError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from .recipe import CalibrationSpec

logger = logging.getLogger(__name__)

MIN_BLOCK_TOKENS = 16  # shorter tail blocks say little about a layer and would mostly be padding
# Prose has next to no control characters; a binary file that happens to decode (all NULs, say) is mostly them.
MAX_CONTROL_SHARE = 0.1


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [batch, seq] int64
    attention_mask: torch.Tensor  # [batch, seq] int64, 0 on padding


@dataclass(frozen=True)
class CalibrationSet:
    batches: list[Batch]
    source: str
    samples: int
    seq_len: int
    seed: int
    add_bos: bool

    @property
    def num_tokens(self) -> int:
        return int(sum(int(b.attention_mask.sum()) for b in self.batches))

    def describe(self) -> dict[str, object]:
        return {
            "source": self.source,
            "samples": self.samples,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "add_bos": self.add_bos,
            "num_tokens": self.num_tokens,
        }


def load_documents(spec: CalibrationSpec) -> list[str]:
    if spec.files is not None:
        docs = [read_text_file(p) for p in _text_files(spec.files)]
    elif spec.offline is not None:
        from .corpora import offline_corpus

        try:
            docs = offline_corpus(spec.offline)
        except (ValueError, FileNotFoundError) as err:
            raise CalibrationError(str(err)) from None
    else:
        docs = _dataset_documents(spec)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise CalibrationError(f"calibration source {spec.source} contains no text")
    return docs


def check_text_files(spec: CalibrationSpec) -> None:
    """Read the local calibration files now, so that a missing or binary one fails before any model loads."""
    if spec.files is not None:
        for path in _text_files(spec.files):
            read_text_file(path)


def read_text_file(path: Path) -> str:
    """A text file's content; refused, naming the file, unless it is UTF-8 and mostly printable.

    Invalid bytes were once replaced silently, so random bytes were scored as if they were prose.
    """
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise CalibrationError(f"cannot read text file {path}: {err.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark is not text
    except UnicodeDecodeError as err:
        raise CalibrationError(
            f"{path} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); give a plain-text "
            "file, or convert it first (iconv -t UTF-8)"
        ) from None
    control = _control_characters(text)
    if control > MAX_CONTROL_SHARE * len(text):
        raise CalibrationError(
            f"{path} is not text: {control} of its {len(text)} characters are control characters; give a "
            "plain-text file"
        )
    return text


def _control_characters(text: str) -> int:
    """Characters that are neither printable nor whitespace (NUL, escape codes, ...)."""
    if "".join(text.split()).isprintable():  # the usual case, at C speed
        return 0
    return sum(not (c.isprintable() or c.isspace()) for c in text)


def _text_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(p.rglob("*.txt"))
            if not found:
                raise CalibrationError(f"calibration folder {p} has no .txt files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise CalibrationError(f"calibration file not found: {p}")
    return files


def _dataset_documents(spec: CalibrationSpec) -> list[str]:
    assert spec.dataset is not None
    d = spec.dataset
    try:
        import datasets
    except ImportError:
        raise CalibrationError(
            "calibration from a Hugging Face dataset needs the `datasets` package: pip install "
            "'shortgpt-deploy[hub]' (or use calibration.files with local text, or offline: austen:emma)"
        ) from None
    try:
        ds = datasets.load_dataset(d.name, d.config, split=d.split)
    except Exception as err:  # network, auth and missing-split errors all end the same way
        raise CalibrationError(
            f"could not load dataset {d.name!r} split {d.split!r} ({type(err).__name__}: {err}). Without network, "
            "save the text locally and use calibration.files, or use the packaged corpus (offline: austen:emma)."
        ) from None
    if d.field not in ds.column_names:
        raise CalibrationError(f"dataset {d.name!r} has no field {d.field!r}; fields: {', '.join(ds.column_names)}")
    n = len(ds) if d.max_documents is None else min(len(ds), d.max_documents)
    return [str(ds[i][d.field]) for i in range(n)]


def token_blocks(
    docs: list[str], tokenizer: PreTrainedTokenizerBase, *, seq_len: int, add_bos: bool
) -> list[list[int]]:
    """Cut each document into consecutive blocks of at most `seq_len` tokens (BOS included when asked)."""
    body = seq_len - 1 if add_bos else seq_len
    prefix = [tokenizer.bos_token_id] if add_bos else []
    blocks: list[list[int]] = []
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"]
        for start in range(0, len(ids), body):
            chunk = ids[start : start + body]
            if len(chunk) >= MIN_BLOCK_TOKENS:
                blocks.append(prefix + chunk)
    return blocks


def build_calibration(
    docs: list[str], tokenizer: PreTrainedTokenizerBase, spec: CalibrationSpec, *, add_bos: bool, source: str
) -> CalibrationSet:
    """Pick `spec.samples` token blocks with `spec.seed` and pad them into batches."""
    import torch

    if add_bos and tokenizer.bos_token_id is None:
        raise CalibrationError("add_bos is set but the tokenizer has no BOS token; set model.add_bos: false")
    blocks = token_blocks(docs, tokenizer, seq_len=spec.seq_len, add_bos=add_bos)
    if len(blocks) < spec.samples:
        raise CalibrationError(
            f"calibration text too short: {source} gives {len(blocks)} blocks of up to {spec.seq_len} tokens "
            f"(at least {MIN_BLOCK_TOKENS} each) but {spec.samples} samples were asked for; add text or lower "
            "calibration.samples / calibration.seq_len"
        )
    rng = random.Random(spec.seed)
    chosen = rng.sample(blocks, spec.samples)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for i in range(0, len(chosen), spec.batch_size):
        group = chosen[i : i + spec.batch_size]
        width = max(len(b) for b in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, block in enumerate(group):  # right padding: causal attention never looks at it
            ids[row, : len(block)] = torch.tensor(block)
            mask[row, : len(block)] = 1
        batches.append(Batch(ids, mask))
    result = CalibrationSet(batches, source, spec.samples, spec.seq_len, spec.seed, add_bos)
    logger.info("calibration: %d blocks, %d tokens from %s", spec.samples, result.num_tokens, source)
    return result
