"""The stages chained: recipe → checkpoint → calibration → scores → plan → pruned checkpoint → GPTQ → eval →
vLLM benchmark → report.

One function per CLI command. The scored and pruned run folder is built in a temporary folder beside the target
and renamed into place when complete, so an interrupted or failed run leaves no half-written output. The stages
after it (stages.STAGES, in order: repair, quantize, eval, bench) each add their own artifact to that folder
through run.RunDir (`repaired/`, `dense-gptq/`, `quantize.json`, `eval.json`, `bench/`, ...), also written
completely or not at all; a stage that fails is recorded in manifest.json (a run.StageStatus) and the report, the
ones after it still run where they can, and the build then fails with a message naming every failed stage.
Nothing a stage finished is lost. `analyze_model` is the one way an analysis gets a build (orthogonality of a
model): the analyses themselves only read run folders.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .calibration import build_calibration, load_documents
from .checkpoint import output_transaction
from .errors import OutputExistsError, PlanError, ShortGPTError
from .gen import GEN_FIELD, check_gen_source, write_gen_checkpoint
from .importance import LayerScores, score_iteratively, score_layers
from .modeling import Checkpoint, cache_dir, decide_add_bos, load_model, resolve_checkpoint, source_add_bos
from .plan import LayerPlan, check_amount, make_plan, n_from_ratio, normalize_protected
from .plots import plot_scores
from .preflight import QuantizeChoice, preflight  # noqa: F401  (QuantizeChoice: what preflight settles)
from .recipe import GEN_VARIANT, GREEDY_METRIC, CalibrationSpec, ModelSpec, PruneSpec, Recipe
from .report import write_report
from .run import Manifest, RunDir, StageStatus
from .runtime import third_party_output
from .stages import STAGES, StageContext, run_stage
from .surgery import prune_checkpoint, read_config_layers

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .analyze import AnalysisResult, AnalysisSettings
    from .budget import BudgetResult

logger = logging.getLogger(__name__)


class BuildIncompleteError(ShortGPTError):
    """Scoring and pruning succeeded but a later stage failed; what the other stages made is in the run folder."""


@dataclass
class BuildResult:
    run_dir: Path
    scores: LayerScores | None
    plan: LayerPlan
    pruned_dir: Path | None
    manifest: Manifest
    report: Path | None = None

    def to_json(self) -> dict[str, Any]:
        """What `build --json` prints."""
        return {
            "run_dir": str(self.run_dir),
            "pruned": str(self.pruned_dir) if self.pruned_dir else None,
            "plan": self.plan.to_dict(),
            # ppl_greedy leaves unreached layers unscored (NaN); JSON has no NaN: null, as in scores.json
            "scores": [None if v != v else v for v in self.scores.scores] if self.scores else None,
            "stages": {k: s.to_json() for k, s in self.manifest.stages.items()},
            "variants": self.manifest.variants,
            "report": str(self.report) if self.report else None,
            "timings_s": self.manifest.timings_s,
        }


def _calibrate_and_score(
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
    if prune.budget is not None and prune.budget.criterion == "retention":
        from .budget import load_budget_tasks

        load_budget_tasks(prune.budget)  # missing task data fails before minutes of scoring (preflight did too)
    add_bos = decide_add_bos(tokenizer, requested=model_spec.add_bos, source=checkpoint.add_bos)
    with manifest.timed("calibration_tokenize"):
        calibration = build_calibration(docs, tokenizer, calib, add_bos=add_bos, source=calib.source)
    manifest.seeds["calibration"] = calib.seed
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
    removable = num_layers - len(protected)
    if prune.budget is not None:  # the budget never tries more than max_ratio, nor a protected layer
        return max(1, min(n_from_ratio(prune.budget.max_ratio, num_layers), removable))
    n = prune.n_remove or (len(prune.layers) if prune.layers else n_from_ratio(float(prune.ratio), num_layers))
    check_amount(n, num_layers, protected)  # make_plan would refuse it too, but only after the (expensive) scoring
    return n


def _select_budget(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    scores: LayerScores,
    prune: PruneSpec,
    *,
    add_bos: bool | None,
    progress: bool,
) -> BudgetResult:
    """prune.budget: the largest n along the scores' removal order within the perplexity or retention budget
    (budget.py)."""
    from .budget import load_budget_tasks, select_by_perplexity, select_by_retention
    from .evaluate import heldout_token_ids

    b = prune.budget
    assert b is not None
    protected = set(normalize_protected(prune.protect, scores.num_layers))
    ranked = [s["removed"] for s in scores.iterative] if scores.iterative else scores.removal_order
    order = [i for i in ranked if i not in protected]
    bos = decide_add_bos(tokenizer, requested=add_bos)
    n_max = n_from_ratio(b.max_ratio, scores.num_layers)
    if b.criterion == "retention":
        assert b.min_retention_pct is not None
        result = select_by_retention(
            model, tokenizer, load_budget_tasks(b), order, min_retention_pct=b.min_retention_pct, n_max=n_max,
            batch_size=b.batch_size, add_bos=bos,
        )  # fmt: skip
        result.settings |= {"limit": b.limit, "metric": scores.metric}
        logger.info(
            "budget: %d layers keep %.1f%% of the dense average accuracy on %s (limit %g%%)",
            result.n_remove, result.retention_by_n[result.n_remove], ", ".join(b.tasks), b.min_retention_pct,
        )  # fmt: skip
        return result
    assert b.max_ppl_increase_pct is not None
    ids = heldout_token_ids(tokenizer, b.text, max_tokens=b.max_tokens, add_bos=bos)
    result = select_by_perplexity(
        model,
        ids,
        order,
        max_increase_pct=b.max_ppl_increase_pct,
        n_max=n_max,
        context_len=b.context_len,
        stride=b.stride,
    )
    result.settings |= {"text": b.text, "max_tokens": b.max_tokens, "metric": scores.metric}
    logger.info(
        "budget: %d layers keep perplexity on %s within +%g%% (%.3f → %.3f, limit %.3f)",
        result.n_remove, b.text, b.max_ppl_increase_pct, result.baseline_ppl, result.ppl_by_n[result.n_remove],
        result.limit_ppl,
    )  # fmt: skip
    return result


def score_model(
    model_spec: ModelSpec,
    calib: CalibrationSpec,
    *,
    metric: str,
    out: Path,
    n_remove: int | None = None,
    progress: bool = True,
) -> LayerScores:
    """`shortgpt-deploy score`: per-layer scores of a model, written to `out` (scores.json).

    ppl_greedy scores only the layers it removes: `n_remove` of them (default: a quarter of the layers, the
    paper's ratio), with the default protected layers; the other metrics score every layer and take no n_remove.
    """
    from .recipe import PRUNE_METRICS

    if metric not in PRUNE_METRICS:  # before minutes of model loading
        raise PlanError(f"unknown metric {metric!r}; known: {', '.join(PRUNE_METRICS)}")
    if n_remove is not None and metric != GREEDY_METRIC:
        raise PlanError(f"n_remove only applies to {GREEDY_METRIC}: {metric} scores every layer in one pass")
    manifest = Manifest()
    docs = load_documents(calib)  # a missing or binary calibration file fails before the model loads
    checkpoint = resolve_checkpoint(model_spec.path, revision=model_spec.revision)
    model, tokenizer = load_model(
        checkpoint.path, dtype=model_spec.dtype, trust_remote_code=model_spec.trust_remote_code
    )
    if metric == GREEDY_METRIC:
        prune = PruneSpec(metric=metric, n_remove=n_remove) if n_remove else PruneSpec(metric=metric, ratio=0.25)
    else:
        prune = PruneSpec(metric=metric, n_remove=1)  # the amount is irrelevant when scoring every layer
    scores = _calibrate_and_score(
        model, tokenizer, checkpoint, model_spec, calib, prune, manifest, docs=docs, progress=progress
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    scores.save(out)
    return scores


def prune_model(
    model_spec: ModelSpec,
    *,
    out_dir: Path,
    prune: PruneSpec,
    scores: LayerScores | None,
    dry_run: bool = False,
    force: bool = False,
    progress: bool = True,
) -> tuple[LayerPlan, list[str]]:
    """`shortgpt-deploy prune`: plan from explicit layers or saved scores, then write the checkpoint."""
    if out_dir.exists() and not force and not dry_run:
        raise OutputExistsError(
            f"output folder {out_dir} already exists; choose another, or pass --force to replace it"
        )
    checkpoint = resolve_checkpoint(model_spec.path, revision=model_spec.revision)
    plan = make_plan(
        num_layers=read_config_layers(checkpoint.path),
        scores=scores,
        n_remove=prune.n_remove,
        ratio=prune.ratio,
        layers=prune.layers,
        protect=prune.protect,
    )
    logger.info("plan: %s", plan.summary())
    if len(prune.mode) != 1:
        raise PlanError("prune writes one folder: give --mode delete or --mode gen (a build can write both)")
    if prune.mode == ("gen",):
        check_gen_source(checkpoint.path)  # also in a dry run
    if dry_run:
        return plan, []
    if prune.mode == ("gen",):
        spec = write_gen_checkpoint(
            checkpoint.path, plan, out_dir=out_dir, rotate_skipped_keys=prune.rotate_skipped_keys, force=force,
            base_model=checkpoint.source,
        )  # fmt: skip
        return plan, [f"{GEN_FIELD}: {json.dumps(spec.to_dict())} (weights linked, no layer deleted)"]
    notes = prune_checkpoint(
        checkpoint.path, plan, out_dir=out_dir, base_model=checkpoint.source, force=force, progress=progress
    )
    return plan, notes


def build(
    recipe: Recipe,
    *,
    recipe_text: str,
    out_dir: Path | None = None,
    force: bool = False,
    dry_run: bool = False,
    progress: bool = True,
) -> BuildResult:
    """`shortgpt-deploy build`: score → plan → prune, then the recipe's quantize, eval and bench sections, then
    report.md. Raises BuildIncompleteError (after writing the report) if a later stage failed."""
    # The run folder appears only once scored and pruned: until then the libraries' output goes to the cache,
    # where it stays (and the error names it) if this part fails.
    early_log = cache_dir() / "logs" / f"{Path(out_dir or recipe.output.dir).name}-score.log"
    with third_party_output(early_log):
        choice = preflight(recipe, dry_run=dry_run)  # a bad plan, an unservable scheme or a missing library fails now
        result = score_and_prune(
            recipe, recipe_text=recipe_text, out_dir=out_dir, force=force, dry_run=dry_run, progress=progress
        )
    if early_log.exists():
        RunDir(result.run_dir).logs.mkdir(exist_ok=True)
        shutil.move(early_log, RunDir(result.run_dir).log("score"))
    if dry_run:
        return result
    run, manifest = RunDir(result.run_dir), result.manifest
    if choice is not None:
        manifest.inputs["quantize"] = dataclasses.asdict(choice)
    ctx = StageContext(recipe, run, manifest, progress=progress)
    for stage in STAGES:
        manifest.stages[stage.name] = run_stage(stage, ctx)
        run.save_manifest(manifest)
    failed = [s.name for s in STAGES if manifest.stages[s.name].state == "failed"]
    manifest.status = "incomplete" if failed else "complete"
    manifest.stages["report"] = StageStatus("complete")
    run.save_manifest(manifest)
    try:
        result.report = write_report(run.root)
    except (ShortGPTError, OSError) as err:  # the measurements are safe in the run folder; say so and go on
        logger.error("report not written (`shortgpt-deploy report %s` retries): %s", run.root, err)
        manifest.stages["report"] = StageStatus("failed", str(err))
        run.save_manifest(manifest)
    if failed:
        raise BuildIncompleteError(
            f"stage(s) {', '.join(failed)} failed (scores, plan and the pruned checkpoint are complete); "
            + "; ".join(f"{s}: {manifest.stages[s].note.splitlines()[0]}" for s in failed)
            + f". See {run.report}, {run.manifest_path} and {run.logs}/."
        )
    return result


def score_and_prune(
    recipe: Recipe,
    *,
    recipe_text: str,
    out_dir: Path | None = None,
    force: bool = False,
    dry_run: bool = False,
    progress: bool = True,
) -> BuildResult:
    """score → plan → prune, into a new run folder with provenance and a plot (renamed into place when done):
    the two steps that create the folder, before stages.STAGES add to it."""
    run_dir = Path(out_dir or recipe.output.dir)
    with output_transaction(run_dir, force=force) as tmp_dir:  # refuses an existing folder before heavy work
        tmp = RunDir(tmp_dir)
        manifest = Manifest(inputs={"recipe": recipe.model_dump(mode="json")})
        tmp.recipe.write_text(recipe_text)
        with manifest.timed("resolve_model"):
            checkpoint = resolve_checkpoint(recipe.model.path, revision=recipe.model.revision)
        manifest.inputs["checkpoint"] = {"path": str(checkpoint.path), "kind": checkpoint.kind}
        p = recipe.prune
        scores, budget = _score_step(recipe, tmp, manifest, checkpoint, progress=progress)
        plan = make_plan(
            num_layers=read_config_layers(checkpoint.path),
            scores=scores,
            n_remove=budget.n_remove if budget is not None else p.n_remove,
            ratio=p.ratio,
            layers=p.layers,
            protect=p.protect,
        )
        tmp.save_plan(plan)
        logger.info("plan: %s", plan.summary())
        if scores is not None:
            plot_scores(scores, plan, tmp.scores_plot, title=f"{checkpoint.source}: {scores.metric} per layer")
        pruned = None
        if not dry_run:
            _prune_step(recipe, tmp, manifest, checkpoint, plan, recipe_text=recipe_text, progress=progress)
            pruned = run_dir / ("pruned" if "delete" in p.mode else GEN_VARIANT)
        manifest.status = "dry-run" if dry_run else "complete"
        tmp.save_manifest(manifest)
    return BuildResult(run_dir, scores, plan, pruned, manifest)


def _score_step(
    recipe: Recipe, tmp: RunDir, manifest: Manifest, checkpoint: Checkpoint, *, progress: bool
) -> tuple[LayerScores | None, BudgetResult | None]:
    """scores.json (and budget.json when prune.budget chooses the amount), or nothing for an explicit layer list.

    An explicit layer list needs no scores: they cost a model load and a pass over the calibration text, so only
    prune.plot asks for them (bi.png). A quantized source (the paper's Table 2) cannot be scored without its
    quantization kernels, so preflight refuses plot for it.
    """
    p = recipe.prune
    if p.layers is not None and not p.plot:
        return None, None
    docs = load_documents(recipe.calibration)  # a bad calibration file fails before the model loads
    with manifest.timed("load_model"):
        model, tokenizer = load_model(
            checkpoint.path, dtype=recipe.model.dtype, trust_remote_code=recipe.model.trust_remote_code
        )
    scores = _calibrate_and_score(
        model, tokenizer, checkpoint, recipe.model, recipe.calibration, p, manifest, docs=docs, progress=progress
    )
    tmp.save_scores(scores)
    budget = None
    if p.budget is not None:
        with manifest.timed("budget"):
            budget = _select_budget(
                model, tokenizer, scores, p, add_bos=source_add_bos(recipe.model, checkpoint), progress=progress
            )
        tmp.save_budget(budget)
    del model  # surgery streams from disk; free the weights first
    return scores, budget


def _prune_step(
    recipe: Recipe, tmp: RunDir, manifest: Manifest, checkpoint: Checkpoint, plan: LayerPlan, *, recipe_text: str,
    progress: bool,
) -> None:  # fmt: skip
    """pruned/ (delete) and gen/ (ShortGPT-gen, the same plan, nothing deleted): the recipe's prune.mode."""
    p = recipe.prune
    manifest.variants = {"dense": str(checkpoint.path)}
    if "delete" in p.mode:
        with manifest.timed("surgery"):
            prune_checkpoint(
                checkpoint.path, plan, out_dir=tmp.checkpoint("pruned"), base_model=checkpoint.source,
                recipe_text=recipe_text, progress=progress,
            )  # fmt: skip
        manifest.variants["pruned"] = "pruned"
    if "gen" in p.mode:  # the same plan; nothing deleted, the weights linked (gen.py)
        with manifest.timed("gen"):
            write_gen_checkpoint(
                checkpoint.path, plan, out_dir=tmp.checkpoint(GEN_VARIANT), rotate_skipped_keys=p.rotate_skipped_keys,
                base_model=checkpoint.source,
            )  # fmt: skip
        manifest.variants[GEN_VARIANT] = GEN_VARIANT
    manifest.stages["prune"] = StageStatus("complete")
    if checkpoint.notice:
        for name in manifest.variants.keys() - {"dense"}:
            (tmp.checkpoint(name) / "NOTICE").write_text(checkpoint.notice + "\n")


# ---------------------------------------------------------------------------------------------- analyses
def orthogonality_checkpoints(model_spec: str, settings: AnalysisSettings, run_dir: Path, *, progress: bool) -> Path:
    """The paper's Table 2 needs dense, pruned and both GPTQ'd: built here (BI, 25% removed, GPTQ of both) into
    run_dir, reused when run_dir already has them. The analysis itself (orthogonality.py) only reads the folder."""
    import yaml

    from .orthogonality import FOUR, run_variants
    from .recipe import OutputSpec, QuantizeSpec

    have = run_variants(run_dir) or {}
    if all(v in have for v in FOUR):
        logger.info("orthogonality: reusing the checkpoints in %s", run_dir)
        return run_dir
    recipe = Recipe(
        name=f"orthogonality-{run_dir.parent.name}",
        description="Made by `analyze --what orthogonality`: the four checkpoints of the paper's Table 2.",
        model=ModelSpec(path=model_spec),
        calibration=settings.calibration,
        prune=PruneSpec(metric="bi", ratio=0.25, protect=list(settings.protect)),
        quantize=QuantizeSpec(variants=["dense", "pruned"], samples=32, seq_len=512),
        output=OutputSpec(dir=run_dir),
    )
    text = yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=True), sort_keys=False)
    logger.info("orthogonality: building dense/pruned and their GPTQ checkpoints in %s", run_dir)
    build(recipe, recipe_text=text, force=True, progress=progress)
    return run_dir


def analyze_model(
    model_spec: str, *, what: str, settings: AnalysisSettings, out_dir: Path | None = None, progress: bool = True
) -> AnalysisResult:
    """`shortgpt-deploy analyze`: analyze.run_analysis, except that orthogonality of a model (not a run folder)
    first builds its four checkpoints in OUT/checkpoints: analyses read run folders, only the pipeline builds."""
    from .analyze import check_what, default_out_dir, is_run_folder, run_analysis
    from .orthogonality import check_tasks

    check_what(what)
    if what == "orthogonality" and not is_run_folder(model_spec):
        check_tasks(settings)  # an unknown task or missing data fails before minutes of building
        out_dir = out_dir or default_out_dir(model_spec)
        model_spec = str(orthogonality_checkpoints(model_spec, settings, out_dir / "checkpoints", progress=progress))
    return run_analysis(model_spec, what=what, settings=settings, out_dir=out_dir, progress=progress)
