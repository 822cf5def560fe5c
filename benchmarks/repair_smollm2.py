#!/usr/bin/env python
"""How much the training-free repairs (issue 10) recover on SmolLM2-135M pruned by 25% with Block Influence.

Scores the offline model on *Emma* (the default recipe's calibration: 64 × 256 tokens), removes 8 of 30 layers
(layers 0 and 29 protected), then repairs the pruned checkpoint with `linear` (least squares, and with
`--cosine` also the cosine objective) and `scale`, each fitted on the same *Emma* batches, and prints held-out
perplexity on the first 4,096 tokens of *Persuasion* (context 512, stride 256, as the report) for dense,
pruned and every repair, with each step's wall time. Everything is written to a temporary folder and removed.

Usage: .venv/bin/python benchmarks/repair_smollm2.py [--samples 64] [--seq-len 256] [--cosine]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

from shortgpt_deploy.calibration import build_calibration, load_documents
from shortgpt_deploy.evaluate import evaluate_perplexity
from shortgpt_deploy.importance import score_layers
from shortgpt_deploy.modeling import load_model, resolve_checkpoint
from shortgpt_deploy.plan import make_plan
from shortgpt_deploy.recipe import CalibrationSpec
from shortgpt_deploy.repair import RepairOptions, repair_checkpoint
from shortgpt_deploy.surgery import prune_checkpoint

MODEL = "offline:smollm2-135m-instruct"
HELDOUT = "austen:persuasion"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--cosine", action="store_true", help="also the linear repair with the cosine objective")
    args = ap.parse_args()

    timings: dict[str, float] = {}
    t = time.perf_counter()
    dense = resolve_checkpoint(MODEL)
    model, tokenizer = load_model(dense.path)
    spec = CalibrationSpec(offline="austen:emma", samples=args.samples, seq_len=args.seq_len)
    calibration = build_calibration(load_documents(spec), tokenizer, spec, add_bos=False, source=spec.source)
    timings["load + calibration"] = time.perf_counter() - t
    t = time.perf_counter()
    scores = score_layers(model, calibration, metric="bi", progress=False)
    plan = make_plan(num_layers=scores.num_layers, scores=scores, ratio=0.25, protect=[0, -1])
    timings["score"] = time.perf_counter() - t
    del model
    print(plan.summary())
    print(f"calibration: {calibration.num_tokens} tokens of {spec.source}")

    variants: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="repair-bench-") as tmp:
        variants["dense"] = dense.path
        variants["pruned"] = Path(tmp) / "pruned"
        t = time.perf_counter()
        prune_checkpoint(dense.path, plan, out_dir=variants["pruned"], progress=False)
        timings["surgery"] = time.perf_counter() - t
        repairs = [("linear", "linear", RepairOptions()), ("scale", "scale", RepairOptions())]
        if args.cosine:
            repairs.insert(1, ("linear-cosine", "linear", RepairOptions(objective="cosine")))
        for name, method, options in repairs:
            variants[name] = Path(tmp) / name
            t = time.perf_counter()
            result = repair_checkpoint(
                dense.path,
                variants["pruned"],
                out_dir=variants[name],
                calibration=calibration,
                method=method,
                plan=plan,
                options=options,
                progress=False,
            )
            timings[f"repair {name}"] = time.perf_counter() - t
            for g in result.gaps:
                if g.alpha is not None:
                    print(f"  {name} gap {g.removed}: alpha {g.alpha:.4f}, {len(g.folded_into)} tensors rescaled")
                else:
                    cos = f", cosine loss {g.cosine_loss_lstsq:.4g} → {g.cosine_loss:.4g}" if g.cosine_loss else ""
                    print(
                        f"  {name} gap {g.removed} → layer {g.anchor} ({g.side}): fit error "
                        f"{g.fit_rel_error_before:.4f} → {g.fit_rel_error:.4f}, hidden-state error "
                        f"{g.state_rel_error_before:.4f} → {g.state_rel_error:.4f}{cos}"
                    )
        ppl = {}
        for name, folder in variants.items():
            t = time.perf_counter()
            ppl[name] = evaluate_perplexity(folder, text=HELDOUT, max_tokens=args.max_tokens, progress=False)
            timings[f"ppl {name}"] = time.perf_counter() - t

    gap = math.log(ppl["pruned"].perplexity) - math.log(ppl["dense"].perplexity)
    print(f"\nheld-out perplexity ({HELDOUT}, first {args.max_tokens} tokens, context 512, stride 256):")
    print("| variant | perplexity | share of the log-perplexity gap recovered |")
    print("|---|---|---|")
    for name, p in ppl.items():
        share = (math.log(ppl["pruned"].perplexity) - math.log(p.perplexity)) / gap if gap > 0 else float("nan")
        shown = "" if name == "dense" else f"{100 * share:.1f}%"
        print(f"| {name} | {p.perplexity:.2f} | {shown} |")
    print("\ntimings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))


if __name__ == "__main__":
    main()
