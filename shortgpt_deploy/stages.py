"""The build's stages, as one small protocol and one ordered list (STAGES), from the recipe to the last artifact:

    score    scores.json, budget.json        the metric per layer on the calibration text (and the budget's n)
    plan     plan.json, bi.png               which layers go
    prune    pruned/, gen/                   the checkpoints: layers deleted, or skipped while prompting
    repair   repaired/, repair.json          the pruned model repaired, folded into its weights
    quantize dense-gptq/, ..., quantize.json GPTQ of the float checkpoints
    eval     eval.json                       perplexity, greedy agreement, tasks
    bench    bench/                          vLLM's load generator against each variant

A stage has a name, `enabled(recipe)`, the checkpoints it cannot run without (`needs`, checked before it runs),
and `run(ctx)`, which reads what earlier stages wrote and writes its artifact through run.RunDir, and returns its
StageStatus. The first three make the run folder (`makes_folder`): `pipeline.build` runs them inside one output
transaction, so the folder appears whole or not at all, and an error there stops the build. The others add to
it; one that fails is recorded (run_stage) and the ones after it still run on what exists. Adding a stage: its
function here (or in its module) and one line in STAGES.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .errors import ShortGPTError
from .recipe import (
    GEN_VARIANT,
    GREEDY_METRIC,
    QUANTIZED_SUFFIX,
    VARIANTS,
    CalibrationSpec,
    ModelSpec,
    PruneSpec,
    Recipe,
)
from .run import Manifest, RunDir, StageStatus
from .runtime import PROGRESS_LOGGER, third_party_output, tqdm

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .calibration import CalibrationSet
    from .importance import LayerScores
    from .modeling import Checkpoint

logger = logging.getLogger(__name__)
progress = logging.getLogger(PROGRESS_LOGGER)  # one line per stage (the console of a build shows only these)

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
    """What every stage gets: the recipe, the run folder (a temporary one while the folder is being made), its
    manifest (variants so far), the resolved source checkpoint, and the console mode."""

    recipe: Recipe
    run: RunDir
    manifest: Manifest
    progress: bool = True
    checkpoint: Checkpoint | None = None  # the recipe's model, resolved by build before the first stage
    dry_run: bool = False

    @property
    def source(self) -> Checkpoint:
        assert self.checkpoint is not None, "build resolves the model before the stages run"
        return self.checkpoint

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
    needs: tuple[str, ...]  # the checkpoints it cannot run without (checked before it runs)
    makes_folder: bool  # runs inside the transaction that creates the run folder; an error stops the build

    def enabled(self, recipe: Recipe) -> bool: ...

    def run(self, ctx: StageContext) -> StageStatus: ...


@dataclass(frozen=True)
class SectionStage:
    """A stage turned on by the recipe section of its name (`repair:`, `quantize:`, ...)."""

    name: str
    needs: tuple[str, ...]
    run: Callable[[StageContext], StageStatus]
    makes_folder: bool = False
    off: str = "no section in the recipe"  # the note of the skipped status when not enabled

    def enabled(self, recipe: Recipe) -> bool:
        return getattr(recipe, self.name) is not None


@dataclass(frozen=True)
class FolderStage:
    """A stage of the three that make the run folder (score, plan, prune): on unless `enabled` says otherwise."""

    name: str
    run: Callable[[StageContext], StageStatus]
    when: Callable[[Recipe], bool] = lambda recipe: True
    off: str = ""
    makes_folder: bool = True
    needs: tuple[str, ...] = ()  # the source model only, which build resolves

    def enabled(self, recipe: Recipe) -> bool:
        return self.when(recipe)


def run_stage(stage: Stage, ctx: StageContext) -> StageStatus:
    """One stage, timed, its status recorded in the manifest (saved).

    A stage that makes the run folder runs as it is: its errors propagate and the build's transaction leaves no
    folder (its libraries' output goes where the build put it, outside that folder). A later stage writes its
    libraries' output to logs/<stage>.log; a project error, or a checkpoint it needs that was not built, becomes
    a failed status (the build goes on); anything else (Ctrl-C) marks the run interrupted and propagates."""
    if not stage.enabled(ctx.recipe):
        return _record(ctx, stage, StageStatus("skipped", stage.off))
    start = time.monotonic()
    if stage.makes_folder:  # timed by its steps (load_model, score, budget, surgery, gen)
        return _record(ctx, stage, stage.run(ctx), start)
    logger.info("stage %s", stage.name)
    try:
        for name in stage.needs:
            ctx.variant_dir(name)  # a ShortGPTError naming the missing checkpoint
        with ctx.manifest.timed(stage.name), third_party_output(ctx.run.log(stage.name)):
            status = stage.run(ctx)
    except ShortGPTError as err:
        logged = f" (library output: {err.log_path})" if err.log_path else ""
        logger.error("stage %s failed: %s%s", stage.name, err, logged)
        status = StageStatus("failed", str(err))
    except BaseException:
        ctx.manifest.status = "interrupted"
        _record(ctx, stage, StageStatus("interrupted"))
        raise
    return _record(ctx, stage, status, start)


def _record(ctx: StageContext, stage: Stage, status: StageStatus, start: float | None = None) -> StageStatus:
    """The status in the manifest (saved), and the stage's line on the console."""
    ctx.manifest.stages[stage.name] = status
    ctx.run.save_manifest(ctx.manifest)
    took = f"{time.monotonic() - start:6.0f} s" if start is not None else " " * 8
    note = status.note.splitlines()[0] if status.note else ""
    note = note if len(note) <= 110 else note[:109] + "…"
    progress.info("stage %-9s %-9s %s  %s", stage.name, status.state, took, note)
    return status


# ---------------------------------------------------------------------------------------------- score, plan, prune
def _score(ctx: StageContext) -> StageStatus:
    """scores.json (and budget.json when prune.budget chooses the amount). The model is loaded for this stage
    only: surgery streams from disk."""
    from .budget import select_budget
    from .calibration import load_documents
    from .modeling import source_add_bos

    recipe, p, manifest = ctx.recipe, ctx.recipe.prune, ctx.manifest
    docs = load_documents(recipe.calibration)  # a bad calibration file fails before the model loads
    scores, model, tokenizer = load_and_score(
        ctx.source, recipe.model, recipe.calibration, p, manifest, docs=docs, progress=ctx.progress
    )
    ctx.run.save_scores(scores)
    note = f"{scores.metric} of {scores.num_layers} layers"
    if p.budget is not None:
        assert model is not None  # streaming.refusal: a budget needs the model in memory
        with manifest.timed("budget"):
            budget = select_budget(
                model, tokenizer, scores, p, add_bos=source_add_bos(recipe.model, ctx.source), progress=ctx.progress
            )
        ctx.run.save_budget(budget)
        note += f"; the {p.budget.criterion} budget allows {budget.n_remove} removed"
    return StageStatus("complete", note)


def _plan(ctx: StageContext) -> StageStatus:
    """plan.json from the scores (or the explicit layers) and the amount (prune.n_remove/ratio, or the budget's);
    bi.png when there are scores."""
    from .plan import make_plan
    from .plots import plot_scores
    from .surgery import read_config_layers

    p = ctx.recipe.prune
    scores, budget = ctx.run.load_scores(), ctx.run.load_budget()
    plan = make_plan(
        num_layers=read_config_layers(ctx.source.path),
        scores=scores,
        n_remove=budget.n_remove if budget is not None else p.n_remove,
        ratio=p.ratio,
        layers=p.layers,
        protect=p.protect,
    )
    ctx.run.save_plan(plan)
    logger.info("plan: %s", plan.summary())
    if scores is not None:
        title = f"{ctx.source.source}: {scores.metric} per layer"
        plot_scores(scores, plan, ctx.run.scores_plot, title=title)
    return StageStatus("complete", plan.summary())


def _prune(ctx: StageContext) -> StageStatus:
    """pruned/ (delete) and gen/ (ShortGPT-gen, the same plan, nothing deleted): the recipe's prune.mode."""
    from .gen import write_gen_checkpoint
    from .surgery import prune_checkpoint

    if ctx.dry_run:
        return StageStatus("skipped", "dry run")
    p, manifest, src, plan = ctx.recipe.prune, ctx.manifest, ctx.source, ctx.run.load_plan()
    assert plan is not None
    recipe_text = ctx.run.recipe.read_text()
    manifest.variants = {"dense": str(src.path)}
    if "delete" in p.mode:
        with manifest.timed("surgery"):
            prune_checkpoint(
                src.path, plan, out_dir=ctx.run.checkpoint("pruned"), base_model=src.source, recipe_text=recipe_text,
                progress=ctx.progress,
            )  # fmt: skip
        manifest.variants["pruned"] = "pruned"
    if "gen" in p.mode:  # the same plan; nothing deleted, the weights linked (gen.py)
        with manifest.timed("gen"):
            write_gen_checkpoint(
                src.path, plan, out_dir=ctx.run.checkpoint(GEN_VARIANT), rotate_skipped_keys=p.rotate_skipped_keys,
                base_model=src.source,
            )  # fmt: skip
        manifest.variants[GEN_VARIANT] = GEN_VARIANT
    if src.notice:
        for name in manifest.variants.keys() - {"dense"}:
            (ctx.run.checkpoint(name) / "NOTICE").write_text(src.notice + "\n")
    return StageStatus("complete")


def _needs_scores(recipe: Recipe) -> bool:
    """An explicit layer list needs no scores: they cost a model load and a pass over the calibration text, so
    only prune.plot asks for them (bi.png). A quantized source (the paper's Table 2) cannot be scored without its
    quantization kernels, so preflight refuses plot for it."""
    return recipe.prune.layers is None or recipe.prune.plot


def load_and_score(
    checkpoint: Checkpoint,
    model_spec: ModelSpec,
    calib: CalibrationSpec,
    prune: PruneSpec,
    manifest: Manifest,
    *,
    docs: list[str],
    progress: bool,
) -> tuple[LayerScores, PreTrainedModel | None, PreTrainedTokenizerBase]:
    """Score `checkpoint` as `prune` asks: loaded whole (then calibrate_and_score), or one layer at a time from its
    files when prune.stream says so or the weights do not fit (streaming.py; the model is then None)."""
    from .modeling import load_model
    from .streaming import score_streamed, should_stream

    if not should_stream(checkpoint.path, model_spec.dtype, prune):
        with manifest.timed("load_model"):
            model, tokenizer = load_model(
                checkpoint.path, dtype=model_spec.dtype, trust_remote_code=model_spec.trust_remote_code
            )
        scores = calibrate_and_score(
            model, tokenizer, checkpoint, model_spec, calib, prune, manifest, docs=docs, progress=progress
        )
        return scores, model, tokenizer
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint.path, trust_remote_code=model_spec.trust_remote_code)
    calibration = _calibration(tokenizer, checkpoint, model_spec, calib, manifest, docs=docs)
    with manifest.timed("score"):
        scores = score_streamed(
            checkpoint.path, calibration, metric=prune.metric, dtype=model_spec.dtype, model_name=checkpoint.source,
            progress=progress,
        )  # fmt: skip
    return scores, None, tokenizer


def _calibration(
    tokenizer: PreTrainedTokenizerBase,
    checkpoint: Checkpoint,
    model_spec: ModelSpec,
    calib: CalibrationSpec,
    manifest: Manifest,
    *,
    docs: list[str],
) -> CalibrationSet:
    from .calibration import build_calibration
    from .modeling import decide_add_bos

    add_bos = decide_add_bos(tokenizer, requested=model_spec.add_bos, source=checkpoint.add_bos)
    with manifest.timed("calibration_tokenize"):
        calibration = build_calibration(docs, tokenizer, calib, add_bos=add_bos, source=calib.source)
    manifest.seeds["calibration"] = calib.seed
    return calibration


def calibrate_and_score(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    checkpoint: Checkpoint,
    model_spec: ModelSpec,
    calib: CalibrationSpec,
    prune: PruneSpec,
    manifest: Manifest,
    *,
    docs: list[str],
    progress: bool,
) -> LayerScores:
    """The calibration batches of `calib` and the prune section's metric per layer of `model`: one pass, or
    the iterative or greedy scorer when those are asked for (they remove layers as they go)."""
    from .importance import score_iteratively, score_layers
    from .plan import normalize_protected

    if prune.budget is not None and prune.budget.criterion == "retention":
        from .budget import load_budget_tasks

        load_budget_tasks(prune.budget)  # missing task data fails before minutes of scoring (preflight did too)
    calibration = _calibration(tokenizer, checkpoint, model_spec, calib, manifest, docs=docs)
    num_layers = model.config.get_text_config().num_hidden_layers
    with manifest.timed("score"):
        if prune.iterative or prune.metric == GREEDY_METRIC:
            protected = frozenset(normalize_protected(prune.protect, num_layers))
            n = _layers_to_score(prune, num_layers, protected)
            if prune.metric == GREEDY_METRIC:
                from .greedy import score_greedily

                return score_greedily(
                    model, calibration, n_remove=n, protected=protected, model_name=checkpoint.source,
                    progress=progress,
                )  # fmt: skip
            return score_iteratively(
                model,
                calibration,
                metric=prune.metric,
                n_remove=n,
                protected=protected,
                model_name=checkpoint.source,
                progress=progress,
            )
        return score_layers(model, calibration, metric=prune.metric, model_name=checkpoint.source, progress=progress)


def _layers_to_score(prune: PruneSpec, num_layers: int, protected: frozenset[int]) -> int:
    """How many removals an iterative or greedy scorer must make: what the plan (or the budget, at most) takes."""
    from .plan import check_amount, n_from_ratio

    removable = num_layers - len(protected)
    if prune.budget is not None:  # the budget never tries more than max_ratio, nor a protected layer
        return max(1, min(n_from_ratio(prune.budget.max_ratio, num_layers), removable))
    n = prune.n_remove or (len(prune.layers) if prune.layers else n_from_ratio(float(prune.ratio), num_layers))
    check_amount(n, num_layers, protected)  # make_plan would refuse it too, but only after the (expensive) scoring
    return n


# ---------------------------------------------------------------------------------------------- later stages
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
    from .quantize import QuantizedVariant, quantize_checkpoint

    recipe, manifest = ctx.recipe, ctx.manifest
    q, choice = recipe.quantize, manifest.inputs["quantize"]  # settled by preflight
    assert q is not None
    calib = recipe.calibration.model_copy(
        update={"samples": q.samples, "seq_len": q.seq_len, "batch_size": q.batch_size}
    )
    results: dict[str, QuantizedVariant] = {}
    for source in tqdm(q.variants, desc="quantize", unit="model", disable=not ctx.progress):  # GPTQModel's: in the log
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
        results[name] = QuantizedVariant.of(result, folder=name, source=source)
        ctx.run.save_quantize(results)
        ctx.add_variant(name)
    done = ", ".join(f"{n}: {r.scheme} g{r.group_size} in {r.duration_s:.0f} s" for n, r in results.items())
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
    ctx.run.save_eval(result)
    acc = {n: a["average"]["acc"] for n, a in result.accuracy.items()}
    # a gen variant has no plain perplexity: its note gives the prompted one (eval.json has it for every variant)
    ppl = {n: f"ppl {r['perplexity']:.1f}" for n, r in result.perplexity.items()}
    ppl |= {n: f"prompted ppl {r['perplexity']:.1f}" for n, r in result.prompted_perplexity.items() if n not in ppl}
    note = ", ".join(f"{n} {p}" + (f" acc {acc[n]:.3f}" if n in acc else "") for n, p in ppl.items())
    return StageStatus("complete", note)


def _bench(ctx: StageContext) -> StageStatus:
    """vLLM's load generator against each variant of the bench section, with the serve section's settings."""
    from . import bench as b
    from .serve import load_preset

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
    options = b.variant_options(preset, serve.model_dump(exclude={"preset"}) if serve else {})
    workload = b.Workload.from_spec(spec)
    b.run_benchmark(
        variants,
        workload,
        out_dir=ctx.run.root,
        timeout_s=spec.timeout_s,
        options=options,
        restart=spec.restart,
        progress=ctx.progress,
    )  # → bench/
    return StageStatus("complete", "; ".join(f"without {v}: {why}" for v, why in left_out.items()))


# Every stage, in the order build runs them. A new stage: one line here.
STAGES: tuple[Stage, ...] = (
    FolderStage("score", _score, when=_needs_scores, off="explicit layers: nothing to score"),
    FolderStage("plan", _plan),
    FolderStage("prune", _prune),
    SectionStage("repair", ("dense", "pruned"), _repair),
    SectionStage("quantize", (), _quantize),  # its section's variants in turn: one missing fails it, the rest kept
    SectionStage("eval", ("dense",), _eval),
    SectionStage("bench", (), _bench),  # what exists of bench.variants; it says which it leaves out
)
