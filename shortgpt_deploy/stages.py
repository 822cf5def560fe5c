"""The stages after pruning, each adding its own artifact to a run folder: `repair` (the pruned model repaired,
folded into its weights: repaired/, repair.json), `quantize` (GPTQ of the float checkpoints: dense-gptq/,
pruned-gptq/, repaired-gptq/, quantize.json), `eval` (perplexity, greedy agreement, tasks: eval.json)
and `bench` (vLLM's load generator against each variant: bench/). Each takes the recipe, the run folder and its
manifest and returns a one-line note; `pipeline.build` runs them in LATER_STAGES order and records failures.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ShortGPTError
from .files import atomic_write_text
from .recipe import QUANTIZED_SUFFIX, VARIANTS, Recipe

if TYPE_CHECKING:
    from .manifest import Manifest

logger = logging.getLogger(__name__)

# Which checkpoint each variant's greedy output is compared with in eval.json.
REFERENCES = {
    "pruned": "dense",
    "repaired": "dense",
    "dense-gptq": "dense",
    "pruned-gptq": "pruned",
    "repaired-gptq": "repaired",
    "gen": "dense",
}
LATER_STAGES = ("repair", "quantize", "eval", "bench")


def variant_dir(run_dir: Path, manifest: Manifest, name: str) -> Path:
    if name not in manifest.variants:
        raise ShortGPTError(f"the {name} checkpoint was not built (its stage failed or did not run); see the manifest")
    return run_dir / manifest.variants[name]  # an absolute path stays as it is


def _repair(recipe: Recipe, run_dir: Path, manifest: Manifest, *, progress: bool) -> str:
    """The pruned checkpoint repaired by the recipe's methods in turn, fitted on its calibration text."""
    from .modeling import source_add_bos
    from .repair import REPAIR_RESULT, repair_pruned

    assert recipe.repair is not None
    with manifest.timed("repair"):
        result = repair_pruned(
            variant_dir(run_dir, manifest, "dense"),
            variant_dir(run_dir, manifest, "pruned"),
            out_dir=run_dir / "repaired",
            repair=recipe.repair,
            calibration=recipe.calibration,
            add_bos=source_add_bos(recipe.model),
            progress=progress,
        )
    result.save(run_dir / REPAIR_RESULT)
    manifest.variants["repaired"] = "repaired"
    manifest.save(run_dir / "manifest.json")
    errors = [g.fit_rel_error for g in result.gaps if g.fit_rel_error is not None]
    fit = f", fit error ≤ {max(errors):.3g}" if errors else ""
    return f"{' then '.join(result.methods)} on {result.tokens} tokens in {result.time_s:.0f} s{fit}"


def _quantize(recipe: Recipe, run_dir: Path, manifest: Manifest, *, progress: bool) -> str:
    """GPTQ of each float checkpoint the quantize section names, calibrated on the recipe's calibration text."""
    from .modeling import source_add_bos
    from .quantize import quantize_checkpoint

    q, choice = recipe.quantize, manifest.inputs["quantize"]  # settled by preflight
    assert q is not None
    calib = recipe.calibration.model_copy(
        update={"samples": q.samples, "seq_len": q.seq_len, "batch_size": q.batch_size}
    )
    results: dict[str, dict] = {}
    for source in q.variants:
        name = source + QUANTIZED_SUFFIX
        with manifest.timed(f"quantize_{source}"):
            result = quantize_checkpoint(
                variant_dir(run_dir, manifest, source),
                out_dir=run_dir / name,
                scheme=choice["scheme"],
                target=choice["target"],
                calibration=calib,
                add_bos=source_add_bos(recipe.model),
            )
        results[name] = result.to_dict() | {"out_dir": name, "source": source}
        manifest.variants[name] = name
        atomic_write_text(run_dir / "quantize.json", json.dumps(results, indent=2) + "\n")
        manifest.save(run_dir / "manifest.json")
    done = ", ".join(f"{n}: {r['scheme']} g{r['group_size']} in {r['duration_s']:.0f} s" for n, r in results.items())
    return "; ".join(x for x in (done, choice["note"]) if x)


def _eval(recipe: Recipe, run_dir: Path, manifest: Manifest, *, progress: bool) -> str:
    """Perplexity of every checkpoint the run has, and greedy agreement with each one's reference."""
    from .evaluate import evaluate_variants
    from .manifest import provenance
    from .modeling import source_add_bos

    e = recipe.eval
    assert e is not None
    models = {n: variant_dir(run_dir, manifest, n) for n in VARIANTS if n in manifest.variants}
    result = evaluate_variants(
        models,
        references={v: r for v, r in REFERENCES.items() if v in models and r in models},
        text=e.text,
        context_len=e.context_len,
        stride=e.stride,
        max_tokens=e.max_tokens,
        greedy_prompts=e.greedy_prompts,
        greedy_tokens=e.greedy_tokens,
        add_bos=source_add_bos(recipe.model),
        dtype=recipe.model.dtype,
        tasks=e.tasks,
        limit=e.limit,
        batch_size=e.batch_size,
        generation_probe=e.generation_probe,
        prompt_len=e.prompt_len,
        scored_len=e.scored_len,
        progress=progress,
    )
    result["models"] = {n: str(p) for n, p in models.items()}
    result["provenance"] = provenance()
    atomic_write_text(run_dir / "eval.json", json.dumps(result, indent=2) + "\n")
    acc = {n: a["average"]["acc"] for n, a in result.get("accuracy", {}).items()}
    # a gen variant has no plain perplexity: its note gives the prompted one (eval.json has it for every variant)
    ppl = {n: f"ppl {r['perplexity']:.1f}" for n, r in result["perplexity"].items()}
    ppl |= {n: f"prompted ppl {r['perplexity']:.1f}" for n, r in result.get("prompted_perplexity", {}).items()
            if n not in ppl}  # fmt: skip
    return ", ".join(f"{n} {p}" + (f" acc {acc[n]:.3f}" if n in acc else "") for n, p in ppl.items())


def _bench(recipe: Recipe, run_dir: Path, manifest: Manifest, *, progress: bool) -> str:
    """vLLM's load generator against each variant of the bench section, with the serve section's settings."""
    from . import bench as b
    from .serve import ServeOptions, fit_to_model, load_preset, options_for

    spec = recipe.bench
    assert spec is not None
    left_out = {v: "not built" for v in spec.variants if v not in manifest.variants}
    if not manifest.inputs.get("quantize", {}).get("servable_here", True):
        left_out |= {v: "not servable here" for v in spec.variants if v.endswith(QUANTIZED_SUFFIX)}
    variants = [b.Variant(v, model_dir=variant_dir(run_dir, manifest, v)) for v in spec.variants if v not in left_out]
    if left_out:
        logger.warning("bench: leaving out %s", ", ".join(f"{v} ({why})" for v, why in left_out.items()))
    if not variants:
        raise b.BenchError("no variant of the bench section can be benchmarked: " + ", ".join(left_out))
    serve = recipe.serve
    preset = load_preset(serve.preset if serve else None)
    overrides = serve.model_dump(exclude={"preset"}) if serve else {}

    def options(variant: b.Variant, port: int) -> ServeOptions:
        assert variant.model_dir is not None
        opts = options_for(
            variant.model_dir, variant=variant.name, preset=preset, overrides=overrides, port=port,
            served_model_name=variant.name,
        )  # fmt: skip
        return fit_to_model(opts)

    workload = b.Workload(
        input_len=spec.input_len,
        output_len=spec.output_len,
        num_prompts=spec.num_prompts,
        seed=spec.seed,
        dataset_path=spec.dataset,
        levels=b.levels_from(
            ",".join(map(str, spec.concurrency)) if spec.concurrency else None,
            ",".join(map(str, spec.request_rates_per_s)) if spec.request_rates_per_s else None,
        ),
        num_warmups=spec.warmups,
        repeats=spec.repeats,
        slos=tuple(b.parse_slo(x) for x in spec.slos),
    )
    b.run_benchmark(variants, workload, out_dir=run_dir, timeout_s=spec.timeout_s, options=options)
    return "; ".join(f"without {v}: {why}" for v, why in left_out.items())


STAGE_FUNCTIONS = {"repair": _repair, "quantize": _quantize, "eval": _eval, "bench": _bench}
