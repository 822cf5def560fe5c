#!/usr/bin/env python
"""How much the training-free repairs (issue 10) recover on SmolLM2-135M pruned by 25% with Block Influence.

Scores the offline model on *Emma* (the default recipe's calibration: 64 × 256 tokens), removes 8 of 30 layers
(layers 0 and 29 protected), then repairs the pruned checkpoint with `linear` (least squares, and with
`--cosine` also the cosine objective) and `scale`, each fitted on the same *Emma* batches, and prints held-out
perplexity on the first 4,096 tokens of *Persuasion* (context 512, stride 256, as the report) for dense,
pruned and every repair, with each step's wall time. Everything is written to a temporary folder and removed.
`--methods` picks the repairs; `a+b` chains them (b repairs a's output), e.g. `--methods linear,linear+distill`.
`distill` trains on the same *Emma* blocks re-batched by `--distill-batch-size` (more, smaller steps in the
same time), within `--distill-max-time-s` (default 540: with the held-out evaluations, under 10 minutes).

Usage: .venv/bin/python benchmarks/repair_smollm2.py [--samples 64] [--seq-len 256] [--cosine] [--methods ...]
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
from shortgpt_deploy.repair import RepairOptions, RepairResult, repair_checkpoint
from shortgpt_deploy.repair_distill import DistillOptions
from shortgpt_deploy.surgery import prune_checkpoint

MODEL = "offline:smollm2-135m-instruct"
HELDOUT = "austen:persuasion"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--cosine", action="store_true", help="also the linear repair with the cosine objective")
    ap.add_argument("--methods", default="linear,scale", help="comma-separated; a+b chains b after a")
    ap.add_argument("--distill-batch-size", type=int, default=2)
    ap.add_argument("--distill-max-time-s", type=float, default=540.0)
    ap.add_argument("--distill-max-steps", type=int, default=1000)
    ap.add_argument("--distill-lr", type=float, default=1e-4)
    ap.add_argument("--distill-trainable", default="layers", choices=["layers", "lora"])
    ap.add_argument("--distill-eval-every", type=int, default=10)
    args = ap.parse_args()
    distill = DistillOptions(
        trainable=args.distill_trainable,
        lr=args.distill_lr,
        max_steps=args.distill_max_steps,
        max_time_s=args.distill_max_time_s,
        eval_every=args.distill_eval_every,
    )

    timings: dict[str, float] = {}
    t = time.perf_counter()
    dense = resolve_checkpoint(MODEL)
    model, tokenizer = load_model(dense.path)
    spec = CalibrationSpec(offline="austen:emma", samples=args.samples, seq_len=args.seq_len)
    calibration = build_calibration(load_documents(spec), tokenizer, spec, add_bos=False, source=spec.source)
    small = spec.model_copy(update={"batch_size": args.distill_batch_size})  # the same blocks, smaller batches
    distill_calibration = build_calibration(load_documents(small), tokenizer, small, add_bos=False, source=spec.source)
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
        names = args.methods.split(",")
        if args.cosine:
            names.insert(names.index("linear") + 1 if "linear" in names else 0, "linear-cosine")
        for name in names:
            variants[name] = Path(tmp) / name
            steps, source, elapsed = name.split("+"), variants["pruned"], 0.0
            done = "+".join(steps[:-1])
            if done in variants:  # linear+distill after linear: distil the linear row's checkpoint
                steps, source, elapsed = steps[-1:], variants[done], timings[f"repair {done}"]
            for k, step in enumerate(steps):
                method = "linear" if step == "linear-cosine" else step
                options = RepairOptions(objective="cosine" if step == "linear-cosine" else "lstsq", distill=distill)
                out = Path(tmp) / f"{name}.{k}"
                t = time.perf_counter()
                result = repair_checkpoint(
                    dense.path,
                    source,
                    out_dir=out,
                    calibration=distill_calibration if method == "distill" else calibration,
                    method=method,
                    plan=plan,
                    options=options,
                    progress=False,
                )
                elapsed += time.perf_counter() - t
                show(step, result)
                source = out
            source.rename(variants[name])
            timings[f"repair {name}"] = elapsed
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


def show(name: str, result: RepairResult) -> None:
    for g in result.gaps:
        if g.kind == "distill":
            print(
                f"  {name}: {g.steps} steps, {g.num_tokens} tokens, {g.time_s:.0f} s, held-out KL "
                f"{g.heldout_loss_before:.4f} → {g.heldout_loss_best:.4f} (best, step {g.best_step}; last "
                f"{g.heldout_loss_after:.4f}), stopped by {g.stopped_because}, {len(g.folded_into)} tensors changed"
            )
        elif g.alpha is not None:
            print(f"  {name} gap {g.removed}: alpha {g.alpha:.4f}, {len(g.folded_into)} tensors rescaled")
        else:
            cos = f", cosine loss {g.cosine_loss_lstsq:.4g} → {g.cosine_loss:.4g}" if g.cosine_loss else ""
            print(
                f"  {name} gap {g.removed} → layer {g.anchor} ({g.side}): fit error "
                f"{g.fit_rel_error_before:.4f} → {g.fit_rel_error:.4f}, hidden-state error "
                f"{g.state_rel_error_before:.4f} → {g.state_rel_error:.4f}{cos}"
            )


if __name__ == "__main__":
    main()
