"""The stages after pruning, as one small protocol and one ordered list (STAGES): `repair` (the pruned model
repaired, folded into its weights: repaired/, repair.json), `quantize` (GPTQ of the float checkpoints:
dense-gptq/, pruned-gptq/, repaired-gptq/, quantize.json), `eval` (perplexity, greedy agreement, tasks:
eval.json) and `bench` (vLLM's load generator against each variant: bench/).

A stage has a name, the recipe section that turns it on, the variants it reads (`needs`), and `run(ctx)`, which
writes its artifact through run.RunDir and returns its StageStatus. `pipeline.build` runs STAGES in order with
`run_stage`; a stage that fails is recorded and the ones after it still run on what exists. Adding a stage: its
function here (or in its module) and one line in STAGES.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .errors import ShortGPTError
from .recipe import QUANTIZED_SUFFIX, VARIANTS, Recipe
from .run import Manifest, RunDir, StageStatus
from .runtime import third_party_output

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


@dataclass
class StageContext:
    """What every stage gets: the recipe, the run folder, its manifest (variants so far), and the console mode."""

    recipe: Recipe
    run: RunDir
    manifest: Manifest
    progress: bool = True

    def variant_dir(self, name: str) -> Path:
        if name not in self.manifest.variants:
            raise ShortGPTError(
                f"the {name} checkpoint was not built (its stage failed or did not run); see the manifest"
            )
        return self.run.checkpoint(self.manifest.variants[name])  # an absolute path stays as it is

    def add_variant(self, name: str) -> None:
        """A checkpoint the stage finished, at `name`/ in the run folder; saved now, so a later failure keeps it."""
        self.manifest.variants[name] = name
        self.run.save_manifest(self.manifest)


class Stage(Protocol):
    name: str
    needs: tuple[str, ...]  # the variants it reads, when they exist (documentation; it checks them itself)

    def enabled(self, recipe: Recipe) -> bool: ...

    def run(self, ctx: StageContext) -> StageStatus: ...


@dataclass(frozen=True)
class SectionStage:
    """A stage turned on by the recipe section of its name (`repair:`, `quantize:`, ...)."""

    name: str
    needs: tuple[str, ...]
    run: Callable[[StageContext], StageStatus]

    def enabled(self, recipe: Recipe) -> bool:
        return getattr(recipe, self.name) is not None


def run_stage(stage: Stage, ctx: StageContext) -> StageStatus:
    """One stage, its libraries' output in logs/<stage>.log; a project error becomes a failed status (the build
    goes on), anything else (Ctrl-C) marks the run interrupted and propagates."""
    if not stage.enabled(ctx.recipe):
        return StageStatus("skipped", "no section in the recipe")
    logger.info("stage %s", stage.name)
    try:
        with ctx.manifest.timed(stage.name), third_party_output(ctx.run.log(stage.name)):
            return stage.run(ctx)
    except ShortGPTError as err:
        logged = f" (library output: {err.log_path})" if err.log_path else ""
        logger.error("stage %s failed: %s%s", stage.name, err, logged)
        return StageStatus("failed", str(err))
    except BaseException:
        ctx.manifest.stages[stage.name], ctx.manifest.status = StageStatus("interrupted"), "interrupted"
        ctx.run.save_manifest(ctx.manifest)
        raise


def _repair(ctx: StageContext) -> StageStatus:
    """The pruned checkpoint repaired by the recipe's methods in turn, fitted on its calibration text."""
    from .modeling import source_add_bos
    from .repair import repair_pruned

    recipe = ctx.recipe
    assert recipe.repair is not None
    result = repair_pruned(
        ctx.variant_dir("dense"),
        ctx.variant_dir("pruned"),
        out_dir=ctx.run.checkpoint("repaired"),
        repair=recipe.repair,
        calibration=recipe.calibration,
        add_bos=source_add_bos(recipe.model),
        progress=ctx.progress,
    )
    ctx.run.save_repair(result)
    ctx.add_variant("repaired")
    errors = [g.fit_rel_error for g in result.gaps if g.fit_rel_error is not None]
    fit = f", fit error ≤ {max(errors):.3g}" if errors else ""
    note = f"{' then '.join(result.methods)} on {result.tokens} tokens in {result.time_s:.0f} s{fit}"
    return StageStatus("complete", note)


def _quantize(ctx: StageContext) -> StageStatus:
    """GPTQ of each float checkpoint the quantize section names, calibrated on the recipe's calibration text."""
    from .modeling import source_add_bos
    from .quantize import quantize_checkpoint

    recipe, manifest = ctx.recipe, ctx.manifest
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
                ctx.variant_dir(source),
                out_dir=ctx.run.checkpoint(name),
                scheme=choice["scheme"],
                target=choice["target"],
                calibration=calib,
                add_bos=source_add_bos(recipe.model),
            )
        results[name] = result.to_dict() | {"out_dir": name, "source": source}
        ctx.run.save_quantize(results)
        ctx.add_variant(name)
    done = ", ".join(f"{n}: {r['scheme']} g{r['group_size']} in {r['duration_s']:.0f} s" for n, r in results.items())
    return StageStatus("complete", "; ".join(x for x in (done, choice["note"]) if x), servable=choice["servable_here"])


def _eval(ctx: StageContext) -> StageStatus:
    """Perplexity of every checkpoint the run has, and greedy agreement with each one's reference."""
    from .evaluate import evaluate_variants
    from .manifest import provenance
    from .modeling import source_add_bos

    recipe, e = ctx.recipe, ctx.recipe.eval
    assert e is not None
    models = {n: ctx.variant_dir(n) for n in VARIANTS if n in ctx.manifest.variants}
    references = {v: r for v, r in REFERENCES.items() if v in models and r in models}
    result = evaluate_variants(
        models, e, references=references, add_bos=source_add_bos(recipe.model), dtype=recipe.model.dtype,
        progress=ctx.progress,
    )  # fmt: skip
    result.models = {n: str(p) for n, p in models.items()}
    result.provenance = provenance()
    ctx.run.save_eval(result.to_dict())
    acc = {n: a["average"]["acc"] for n, a in result.accuracy.items()}
    # a gen variant has no plain perplexity: its note gives the prompted one (eval.json has it for every variant)
    ppl = {n: f"ppl {r['perplexity']:.1f}" for n, r in result.perplexity.items()}
    ppl |= {n: f"prompted ppl {r['perplexity']:.1f}" for n, r in result.prompted_perplexity.items() if n not in ppl}
    note = ", ".join(f"{n} {p}" + (f" acc {acc[n]:.3f}" if n in acc else "") for n, p in ppl.items())
    return StageStatus("complete", note)


def _bench(ctx: StageContext) -> StageStatus:
    """vLLM's load generator against each variant of the bench section, with the serve section's settings."""
    from . import bench as b
    from .serve import ServeOptions, fit_to_model, load_preset, options_for

    recipe, manifest = ctx.recipe, ctx.manifest
    spec = recipe.bench
    assert spec is not None
    left_out = {v: "not built" for v in spec.variants if v not in manifest.variants}
    if not manifest.inputs.get("quantize", {}).get("servable_here", True):
        left_out |= {v: "not servable here" for v in spec.variants if v.endswith(QUANTIZED_SUFFIX)}
    variants = [b.Variant(v, model_dir=ctx.variant_dir(v)) for v in spec.variants if v not in left_out]
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

    workload = b.Workload.from_spec(spec)
    b.run_benchmark(variants, workload, out_dir=ctx.run.root, timeout_s=spec.timeout_s, options=options)  # → bench/
    return StageStatus("complete", "; ".join(f"without {v}: {why}" for v, why in left_out.items()))


# The stages after score and prune, in the order build runs them. A new stage: one line here.
STAGES: tuple[Stage, ...] = (
    SectionStage("repair", needs=("dense", "pruned"), run=_repair),
    SectionStage("quantize", needs=("dense", "pruned", "repaired"), run=_quantize),
    SectionStage("eval", needs=VARIANTS, run=_eval),
    SectionStage("bench", needs=VARIANTS, run=_bench),
)
