#!/usr/bin/env python
"""Prefill time of a ShortGPT-gen checkpoint served by vLLM (CPU backend) against its dense parent (issue 11).

Writes a gen folder into a temporary folder (gen.write_gen_checkpoint: the dense weights hard-linked, config.json
naming architectures = ["ShortGPTGen…"] and the skip list), starts one vLLM engine for each (stock `vllm.LLM`,
engine cores in subprocesses, our plugin found through the package's `vllm.general_plugins` entry point), then
times `generate` of a fresh random `--prompt-len`-token prompt with max_tokens=1 (one prefill step plus one
sampled token); and a decoding step as the time of a 16-token prompt with max_tokens=1+`--decode-tokens`
(ignore_eos) less that of one with max_tokens=1, ÷ decode-tokens (a short prompt, so that prefill noise does not
swamp the steps). Dense and gen interleaved, their order alternating, `--reps` times each. Prints medians, the
paired ratios dense ÷ gen, the ideal prefill ratio from FLOPs, the CPU and the load average beside them.

Usage: PYTHONPATH=. .venv/bin/python benchmarks/gen_prefill.py [--model offline:smollm2-135m-instruct]
    [--skip 3,12,13,14,15,17,25,26] [--prompt-len 1024] [--decode-tokens 32] [--reps 5] [--json OUT]
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="offline:smollm2-135m-instruct")
    ap.add_argument("--skip", default="3,12,13,14,15,17,25,26")
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--decode-tokens", type=int, default=32)
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
    from shortgpt_deploy.bench import prefill_flops_per_token
    from shortgpt_deploy.manifest import machine
    from shortgpt_deploy.serve import cpu_dtype

    gen = make_gen_folder(dense, tmp / "gen", skip)  # vLLM finds our plugin through the installed entry point
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import random

    from vllm import LLM, SamplingParams

    dtype = cpu_dtype()
    kw = dict(
        dtype=dtype,
        max_model_len=args.prompt_len + 16 + args.decode_tokens,
        enable_prefix_caching=False,
        max_num_seqs=4,
    )
    engines = {"dense": LLM(str(dense), **kw), "gen": LLM(str(gen), **kw)}
    cfg = json.loads((dense / "config.json").read_text())
    vocab = cfg["vocab_size"]
    rng = random.Random(0)
    one = SamplingParams(max_tokens=1, temperature=0.0)
    more = SamplingParams(max_tokens=1 + args.decode_tokens, temperature=0.0, ignore_eos=True)

    def timed(llm, params, prompt_len: int) -> float:
        prompt = [rng.randrange(3, vocab) for _ in range(prompt_len)]
        t0 = time.perf_counter()
        llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {k: [] for k in engines}
    steps: dict[str, list[float]] = {k: [] for k in engines}
    for rep in range(args.reps + 1):  # rep 0 warms both engines up and is not counted
        for name in list(engines)[:: 1 if rep % 2 else -1]:
            llm = engines[name]
            prefill = timed(llm, one, args.prompt_len)
            decoding = (timed(llm, more, 16) - timed(llm, one, 16)) / args.decode_tokens
            if rep:
                times[name].append(prefill)
                steps[name].append(decoding)
    ratios = [d / g for d, g in zip(times["dense"], times["gen"], strict=True)]
    step_ratios = [d / g for d, g in zip(steps["dense"], steps["gen"], strict=True)]
    # The prefill FLOP ideal as the bench summary computes it; "free" if the skipped layers cost nothing at all.
    ideal = prefill_flops_per_token(dense, args.prompt_len) / prefill_flops_per_token(gen, args.prompt_len)
    ideal_free = cfg["num_hidden_layers"] / (cfg["num_hidden_layers"] - len(skip))
    result = {
        "model": args.model, "dtype": dtype, "prompt_len": args.prompt_len, "skip": skip, "reps": args.reps,
        "cpu": machine().get("cpu"), "dense_s": times["dense"], "gen_s": times["gen"],
        "dense_median_s": statistics.median(times["dense"]), "gen_median_s": statistics.median(times["gen"]),
        "ratio_median": statistics.median(ratios), "ratios": ratios,
        "ideal_ratio": ideal, "ideal_ratio_if_skipped_layers_free": ideal_free,
        "decode_tokens": args.decode_tokens,
        "dense_decode_step_median_ms": 1000 * statistics.median(steps["dense"]),
        "gen_decode_step_median_ms": 1000 * statistics.median(steps["gen"]),
        "decode_step_ratio_median": statistics.median(step_ratios), "loadavg": os.getloadavg(),
    }  # fmt: skip
    for llm in engines.values():
        llm.llm_engine.engine_core.shutdown()
    return result


if __name__ == "__main__":
    sys.exit(main())
