#!/usr/bin/env python
"""What the repairs (issue 10) recover on an offline model pruned by 25%: perplexity, accuracy, retention, cost.

Scores the model on *Emma* (64 × 256 tokens, the default recipe's calibration) with `--metric`, removes 25% of its
layers (first and last protected), repairs the pruned checkpoint with each of `--methods` (fitted on the same
*Emma* batches; `a+b` chains b after a, reusing a's row when there is one, e.g. `linear,linear+distill`;
`linear-cosine` is `linear` with the cosine objective, `linear-r0.1` with ridge 0.1), optionally GPTQ-quantizes one
variant (`--gptq NAME`), and measures every variant: held-out perplexity on the first `--max-tokens` tokens of
*Persuasion* (context 512, stride 256, as the report), the share of the dense → pruned log-perplexity gap it
recovers, multiple-choice accuracy on `--tasks` (first `--limit` items, zero-shot) averaged over tasks, retention
(that average ÷ the dense one), and the cost of making it from the pruned checkpoint (wall seconds: the repair, or
GPTQ alone). Checkpoints live in a temporary folder that is removed; `--json OUT` writes every number with
provenance (rewritten after each variant, so a run cut short keeps what it measured).

Usage: PYTHONPATH=. .venv/bin/python benchmarks/repair_compare.py [--model offline:gemma3-270m] [--metric angular]
    [--methods pruned,linear,scale,linear+distill] [--distill-max-time-s 600] [--gptq linear+distill] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shortgpt_deploy.calibration import build_calibration, load_documents
from shortgpt_deploy.evaluate import evaluate_perplexity
from shortgpt_deploy.importance import METRICS, score_layers
from shortgpt_deploy.manifest import git_revision, machine, package_versions
from shortgpt_deploy.modeling import load_model, resolve_checkpoint
from shortgpt_deploy.multiple_choice import evaluate_tasks
from shortgpt_deploy.plan import make_plan
from shortgpt_deploy.quantize import quantize_checkpoint
from shortgpt_deploy.recipe import CalibrationSpec
from shortgpt_deploy.repair import RepairOptions, RepairResult, repair_checkpoint
from shortgpt_deploy.repair_distill import DistillOptions
from shortgpt_deploy.surgery import prune_checkpoint

HELDOUT = "austen:persuasion"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="offline:smollm2-135m-instruct")
    ap.add_argument("--metric", default="bi", choices=sorted(METRICS))
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--methods", default="linear,scale,linear+distill", help="comma list; a+b chains b after a")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=4096, help="held-out perplexity tokens")
    ap.add_argument("--tasks", default="piqa,arc_easy", help="comma list; empty: no accuracy")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--gptq", default=None, metavar="VARIANT", help="also GPTQ-quantize this variant (auto scheme)")
    ap.add_argument("--json", type=Path, default=None, metavar="OUT")
    ap.add_argument("--distill-batch-size", type=int, default=2, help="the same blocks, re-batched for distill")
    ap.add_argument("--distill-max-time-s", type=float, default=600.0)
    ap.add_argument("--distill-max-steps", type=int, default=1000)
    ap.add_argument("--distill-max-tokens", type=int, default=None)
    ap.add_argument("--distill-lr", type=float, default=1e-4)
    ap.add_argument("--distill-trainable", default="layers", choices=["layers", "lora"])
    ap.add_argument("--distill-eval-every", type=int, default=10)
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    tasks = [t for t in args.tasks.split(",") if t]
    names = [n for n in args.methods.split(",") if n and n != "pruned"]
    if args.gptq and args.gptq not in ["dense", "pruned", *names]:
        sys.exit(f"--gptq {args.gptq}: not a variant of this run (dense, pruned, {', '.join(names)})")
    distill = DistillOptions(
        trainable=args.distill_trainable,
        lr=args.distill_lr,
        max_steps=args.distill_max_steps,
        max_tokens=args.distill_max_tokens,
        max_time_s=args.distill_max_time_s,
        eval_every=args.distill_eval_every,
    )
    record: dict[str, Any] = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "packages": package_versions(),
        "git_revision": git_revision(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "heldout": {"text": HELDOUT, "max_tokens": args.max_tokens, "context_len": 512, "stride": 256},
        "variants": {},
    }

    t = time.perf_counter()
    dense = resolve_checkpoint(args.model)
    model, tokenizer = load_model(dense.path)
    spec = CalibrationSpec(offline="austen:emma", samples=args.samples, seq_len=args.seq_len)
    calibration = build_calibration(load_documents(spec), tokenizer, spec, add_bos=False, source=spec.source)
    small = spec.model_copy(update={"batch_size": args.distill_batch_size})  # more, smaller steps in the same time
    distill_calibration = build_calibration(load_documents(small), tokenizer, small, add_bos=False, source=spec.source)
    scores = score_layers(model, calibration, metric=args.metric, progress=False)
    plan = make_plan(num_layers=scores.num_layers, scores=scores, ratio=args.ratio, protect=[0, -1])
    score_s = time.perf_counter() - t
    del model
    print(plan.summary())
    print(f"calibration: {calibration.num_tokens} tokens of {spec.source}; load + score {score_s:.1f} s")
    record |= {"plan": plan.to_dict(), "calibration": calibration.describe(), "score_s": score_s}

    with tempfile.TemporaryDirectory(prefix="repair-compare-") as tmp:
        folders: dict[str, Path] = {"dense": dense.path, "pruned": Path(tmp) / "pruned"}
        t = time.perf_counter()
        prune_checkpoint(dense.path, plan, out_dir=folders["pruned"], progress=False)
        costs: dict[str, float] = {"dense": 0.0, "pruned": time.perf_counter() - t}
        measure(args, tasks, record, "dense", folders["dense"], costs["dense"])
        measure(args, tasks, record, "pruned", folders["pruned"], costs["pruned"])
        for name in names:
            folders[name], costs[name], steps = make_repair(
                name, folders, costs, Path(tmp), dense.path, plan, calibration, distill_calibration, distill
            )
            measure(args, tasks, record, name, folders[name], costs[name], repair=steps)
            if args.gptq == name or (args.gptq in ("dense", "pruned") and name == names[-1]):
                quantize_and_measure(args, tasks, record, folders[args.gptq], Path(tmp))
        if args.gptq and not names:
            quantize_and_measure(args, tasks, record, folders[args.gptq], Path(tmp))

    print_table(record, tasks)
    print(f"\nheld-out perplexity: {HELDOUT}, first {args.max_tokens} tokens, context 512, stride 256")


def make_repair(name, folders, costs, tmp, dense_dir, plan, calibration, distill_calibration, distill):
    """Repair `name` (a step or an a+b chain); a chain whose prefix is already a row starts from that row."""
    steps, source, cost = name.split("+"), folders["pruned"], 0.0
    done = "+".join(steps[:-1])
    if done in folders and done != "pruned":
        steps, source, cost = steps[-1:], folders[done], costs[done]
    results = []
    for k, step in enumerate(steps):
        method, options = step_options(step, distill)
        out = tmp / f"{name.replace('+', '_')}.{k}"  # transformers warns about a "+" in a folder name
        t = time.perf_counter()
        result = repair_checkpoint(
            dense_dir,
            source,
            out_dir=out,
            calibration=distill_calibration if method == "distill" else calibration,
            method=method,
            plan=plan,
            options=options,
            progress=False,
        )
        cost += time.perf_counter() - t
        show(step, result)
        results.append(result.to_dict())
        source = out
    return source, cost, results


def step_options(step: str, distill: DistillOptions) -> tuple[str, RepairOptions]:
    """A step name → (method, options): `linear-cosine` is the cosine objective; `linear-r0.1` the least-squares
    fit with ridge 0.1 (relative to tr(MᵀM)/d, pulling T towards the identity; the default is 1e-4)."""
    if step == "linear-cosine":
        return "linear", RepairOptions(objective="cosine", distill=distill)
    if step.startswith("linear-r"):
        return "linear", RepairOptions(ridge=float(step.removeprefix("linear-r")), distill=distill)
    return step, RepairOptions(distill=distill)


def quantize_and_measure(args, tasks, record, src: Path, tmp: Path) -> None:
    name = f"{args.gptq}-gptq"
    t = time.perf_counter()
    q = quantize_checkpoint(src, out_dir=tmp / name.replace("+", "_"))
    cost = time.perf_counter() - t
    print(f"  {name}: {q.scheme} g{q.group_size} by {q.producer} in {q.duration_s:.0f} s")
    measure(args, tasks, record, name, q.out_dir, cost, quantize=q.to_dict())


def measure(args, tasks, record, name: str, folder: Path, cost_s: float, **extra: Any) -> None:
    start = t = time.perf_counter()
    ppl = evaluate_perplexity(folder, text=HELDOUT, max_tokens=args.max_tokens, progress=False)
    ppl_s = time.perf_counter() - t
    row: dict[str, Any] = {"perplexity": ppl.perplexity, "cost_s": cost_s, "ppl_eval_s": ppl_s}
    if tasks:
        t = time.perf_counter()
        mc = evaluate_tasks(folder, tasks=tasks, limit=args.limit, progress=False)
        row |= {"mc": mc, "mc_avg_acc": mc["average"]["acc"], "mc_eval_s": time.perf_counter() - t}
    variants = record["variants"]
    variants[name] = row | extra
    dense, pruned = variants["dense"], variants.get("pruned")
    if "mc_avg_acc" in row and dense.get("mc_avg_acc"):
        row["retention_pct"] = 100 * row["mc_avg_acc"] / dense["mc_avg_acc"]
    if pruned and name != "dense":
        gap = math.log(pruned["perplexity"]) - math.log(dense["perplexity"])
        recovered = math.log(pruned["perplexity"]) - math.log(row["perplexity"])
        row["gap_recovered_pct"] = 100 * recovered / gap if gap > 0 else None
    variants[name] |= row
    acc = f", MC {row['mc_avg_acc']:.3f}" if "mc_avg_acc" in row else ""
    print(
        f"{name}: perplexity {ppl.perplexity:.2f}{acc} (cost {cost_s:.1f} s, eval {time.perf_counter() - start:.0f} s)"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        part = args.json.with_suffix(".tmp")
        part.write_text(json.dumps(record, indent=2, default=str) + "\n")
        part.replace(args.json)


def print_table(record: dict[str, Any], tasks: list[str]) -> None:
    print(f"\n| variant | held-out perplexity | log-ppl gap recovered | MC avg acc ({'+'.join(tasks)}) "
          "| retention | cost (s) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name, v in record["variants"].items():
        gap = v.get("gap_recovered_pct")
        cells = [
            name,
            f"{v['perplexity']:.2f}",
            "–" if gap is None else f"{gap:.1f}%",
            f"{v['mc_avg_acc']:.3f}" if "mc_avg_acc" in v else "–",
            f"{v['retention_pct']:.1f}%" if "retention_pct" in v else "–",
            f"{v['cost_s']:.0f}" if name != "dense" else "–",
        ]
        print("| " + " | ".join(cells) + " |")


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
                f"  {name} gap {g.removed} → layer {g.anchor} ({g.side}, {g.kind}): fit error "
                f"{g.fit_rel_error_before:.4f} → {g.fit_rel_error:.4f}, hidden-state error "
                f"{g.state_rel_error_before:.4f} → {g.state_rel_error:.4f}{cos}"
            )


if __name__ == "__main__":
    main()
