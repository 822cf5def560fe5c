#!/usr/bin/env python
"""ShortGPT-gen (issue 11) against deletion on an offline model: the same BI plan, scored as generation sees it.

Scores the model by BI on *Emma* (`--samples` x `--seq-len`) and plans `--ratio` of its layers (first and
last protected), or takes `--layers`. Compares dense, pruned (those layers deleted, in memory) and the gen rule
with rotated and unrotated skipped keys (gen folders in a temporary folder, loaded by our loader) on `--spans`
spans of *Persuasion*, each a `--prompt-len`-token prompt and the next `--cont-len` tokens. Per variant: the
perplexity of the continuation given the prompt (prompt in one forward, then one decoding step per token:
gen.continuation_logprobs), the share of greedy tokens (`--cont-len` per prompt) equal to the dense model's,
and the median wall time of one prompt forward of `--prefill-len` tokens (3 repeats). `--json OUT` keeps all.

Usage: PYTHONPATH=. .venv/bin/python benchmarks/gen_compare.py [--model offline:gemma3-270m] [--layers 3,12,...]
    [--spans 16 --prompt-len 128 --cont-len 32] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from shortgpt_deploy.calibration import build_calibration, load_documents
from shortgpt_deploy.evaluate import agreement, greedy_continuations, heldout_token_ids
from shortgpt_deploy.gen import continuation_logprobs, write_gen_checkpoint
from shortgpt_deploy.importance import score_layers
from shortgpt_deploy.manifest import git_revision, machine, package_versions
from shortgpt_deploy.modeling import decide_add_bos, decoder_layers, layers_removed, load_model, resolve_checkpoint
from shortgpt_deploy.plan import make_plan
from shortgpt_deploy.recipe import CalibrationSpec


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="offline:smollm2-135m-instruct")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--layers", default=None, help="comma list: this plan instead of scoring (e.g. the README's)")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--spans", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--cont-len", type=int, default=32)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--json", type=Path, default=None, metavar="OUT")
    return ap.parse_args()


def measure(model: Any, spans: list[tuple[list[int], list[int]]], prefill: list[int]) -> dict[str, Any]:
    nll, tokens = 0.0, 0
    for prompt, cont in spans:
        lp = continuation_logprobs(model, torch.tensor(prompt), torch.tensor(cont))
        nll, tokens = nll - float(lp.sum()), tokens + len(cont)
    greedy = greedy_continuations(model, [p for p, _ in spans], new_tokens=len(spans[0][1]))
    times = []
    with torch.inference_mode():
        for _ in range(3):
            start = time.perf_counter()
            model(torch.tensor([prefill]), use_cache=True)
            times.append(time.perf_counter() - start)
    result = {"continuation_ppl": math.exp(nll / tokens), "greedy": greedy, "prefill_s": statistics.median(times)}
    print(f"  continuation ppl {result['continuation_ppl']:.2f}, prefill {result['prefill_s']:.3f} s", flush=True)
    return result


def main() -> None:
    args = parse_args()
    checkpoint = resolve_checkpoint(args.model)
    model, tokenizer = load_model(checkpoint.path)
    if args.layers:
        layers = [int(x) for x in args.layers.split(",")]
        plan = make_plan(num_layers=len(decoder_layers(model)), layers=layers, protect=[0, -1])
    else:
        add_bos = decide_add_bos(tokenizer, requested=None, source=checkpoint.add_bos)
        calib = CalibrationSpec(offline="austen:emma", samples=args.samples, seq_len=args.seq_len)
        batches = build_calibration(load_documents(calib), tokenizer, calib, add_bos=add_bos, source=calib.source)
        scores = score_layers(model, batches, metric="bi")
        plan = make_plan(num_layers=scores.num_layers, scores=scores, ratio=args.ratio, protect=[0, -1])
    print(plan.summary(), flush=True)
    ids = heldout_token_ids(tokenizer, "austen:persuasion", max_tokens=200_000, add_bos=False)
    span_len = args.prompt_len + args.cont_len
    step = (len(ids) - span_len) // args.spans
    spans = [(ids[i * step : i * step + args.prompt_len], ids[i * step + args.prompt_len : i * step + span_len])
             for i in range(args.spans)]  # fmt: skip
    prefill = ids[: args.prefill_len]
    results: dict[str, Any] = {}
    results["dense"] = measure(model, spans, prefill)
    with layers_removed(model, set(plan.remove)):
        results["pruned"] = measure(model, spans, prefill)
    del model
    with tempfile.TemporaryDirectory() as tmp:
        for name, rotate in (("gen", True), ("gen-unrotated", False)):
            write_gen_checkpoint(checkpoint.path, plan, out_dir=Path(tmp) / name, rotate_skipped_keys=rotate)
            gen_model, _ = load_model(Path(tmp) / name)
            results[name] = measure(gen_model, spans, prefill)
            del gen_model
    for name, r in results.items():
        r["greedy_same_as_dense_pct"] = (
            100 * agreement(name, "dense", r["greedy"], results["dense"]["greedy"]).token_match
        )
        print(
            f"{name:14s} continuation ppl {r['continuation_ppl']:8.2f}   greedy = dense "
            f"{r['greedy_same_as_dense_pct']:5.1f}%   prefill {args.prefill_len} tokens {r['prefill_s'] * 1000:7.1f} ms"
        )
    print(plan.summary())
    if args.json:
        provenance = {"git": git_revision(), "machine": machine(), "packages": package_versions()}
        out = {"args": {k: str(v) for k, v in vars(args).items()}, "plan": plan.to_dict(), "results": results}
        args.json.write_text(json.dumps({**out, "provenance": provenance}, indent=2) + "\n")


if __name__ == "__main__":
    main()
