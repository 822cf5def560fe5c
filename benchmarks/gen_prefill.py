#!/usr/bin/env python
"""Prefill time of a ShortGPT-gen checkpoint served by vLLM (CPU backend) against its dense parent (issue 11).

Writes a gen folder into a temporary folder (gen.write_gen_checkpoint: the dense weights hard-linked, config.json
naming architectures = ["ShortGPTGen…"] and the skip list), starts one vLLM engine for each (stock `vllm.LLM`,
engine cores in subprocesses, our plugin found through the package's `vllm.general_plugins` entry point), then
times `generate` of a fresh random `--prompt-len`-token prompt with max_tokens=1 (one prefill step plus one
sampled token), dense and gen interleaved, `--reps` times each. Prints medians, the paired ratio dense ÷ gen, the
ideal ratio from FLOPs, and the load average beside them.

Usage: PYTHONPATH=. .venv/bin/python benchmarks/gen_prefill.py [--model offline:smollm2-135m-instruct]
    [--skip 3,12,13,14,15,17,25,26] [--prompt-len 1024] [--reps 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def make_gen_folder(dense: Path, out: Path, skip: list[int]) -> Path:
    """The gen checkpoint `prune --mode gen --layers SKIP` writes (hard links to the dense weights)."""
    from shortgpt_deploy.gen import write_gen_checkpoint
    from shortgpt_deploy.plan import make_plan

    num_layers = json.loads((dense / "config.json").read_text())["num_hidden_layers"]
    write_gen_checkpoint(dense, make_plan(num_layers=num_layers, layers=skip, protect=[]), out_dir=out)
    return out


def ideal_ratio(cfg: dict, n_skip: int, prompt_len: int) -> tuple[float, float]:
    """Dense ÷ gen prefill FLOPs. Per token and layer: qkv, o_proj and the gated MLP (3 matrices), plus causal
    attention over prompt_len/2 keys on average; a skipped layer still pays qkv. Returns (with qkv kept,
    if the skipped layers cost nothing)."""
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hd = cfg.get("head_dim") or h // heads
    qkv = h * (heads + 2 * kv) * hd
    layer = qkv + heads * hd * h + 3 * h * inter + 2 * heads * hd * prompt_len / 2
    return layers * layer / ((layers - n_skip) * layer + n_skip * qkv), layers / (layers - n_skip)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="offline:smollm2-135m-instruct")
    ap.add_argument("--skip", default="3,12,13,14,15,17,25,26")
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    skip = [int(s) for s in args.skip.split(",") if s]

    from shortgpt_deploy.modeling import resolve_checkpoint

    dense = Path(resolve_checkpoint(args.model).path)
    with tempfile.TemporaryDirectory(prefix="gen-prefill-") as tmp:
        result = measure(dense, Path(tmp), skip, args)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def measure(dense: Path, tmp: Path, skip: list[int], args: argparse.Namespace) -> dict:
    from shortgpt_deploy.serve import cpu_dtype

    gen = make_gen_folder(dense, tmp / "gen", skip)  # vLLM finds our plugin through the installed entry point
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import random

    from vllm import LLM, SamplingParams

    dtype = cpu_dtype()
    kw = dict(dtype=dtype, max_model_len=args.prompt_len + 16, enable_prefix_caching=False, max_num_seqs=4)
    engines = {"dense": LLM(str(dense), **kw), "gen": LLM(str(gen), **kw)}
    cfg = json.loads((dense / "config.json").read_text())
    vocab = cfg["vocab_size"]
    rng = random.Random(0)
    params = SamplingParams(max_tokens=1, temperature=0.0)
    times: dict[str, list[float]] = {k: [] for k in engines}
    for rep in range(args.reps + 1):  # rep 0 warms both engines up and is not counted
        for name, llm in engines.items():
            prompt = [rng.randrange(3, vocab) for _ in range(args.prompt_len)]
            t0 = time.perf_counter()
            llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
            if rep:
                times[name].append(time.perf_counter() - t0)
    ratios = [d / g for d, g in zip(times["dense"], times["gen"], strict=True)]
    ideal, ideal_free = ideal_ratio(cfg, len(skip), args.prompt_len)
    result = {
        "model": args.model, "dtype": dtype, "prompt_len": args.prompt_len, "skip": skip, "reps": args.reps,
        "dense_s": times["dense"], "gen_s": times["gen"],
        "dense_median_s": statistics.median(times["dense"]), "gen_median_s": statistics.median(times["gen"]),
        "ratio_median": statistics.median(ratios), "ratios": ratios,
        "ideal_ratio": ideal, "ideal_ratio_if_skipped_layers_free": ideal_free, "loadavg": os.getloadavg(),
    }  # fmt: skip
    for llm in engines.values():
        llm.llm_engine.engine_core.shutdown()
    return result


if __name__ == "__main__":
    sys.exit(main())
