"""One function per CLI command that runs stages: `build` (every stage of stages.STAGES, then report.md),
`score`, `prune`, and `analyze` of a model (the one way an analysis gets a build: orthogonality; the analyses
themselves only read run folders).

`build` makes the run folder with the stages that make it (score, plan, prune) in a temporary folder beside the
target, renamed into place when they are done, so an interrupted or failed run leaves no half-written output.
The stages after them (repair, quantize, eval, bench) each add their own artifact through run.RunDir, also
written completely or not at all; a stage that fails is recorded in manifest.json (a run.StageStatus) and the
report, the ones after it still run where they can, and the build then fails with a message naming every failed
stage. Nothing a stage finished is lost.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .calibration import load_documents
from .checkpoint import output_transaction
from .errors import OutputExistsError, PlanError, ShortGPTError
from .gen import GEN_FIELD, check_gen_source, write_gen_checkpoint
from .importance import LayerScores
from .modeling import cache_dir, resolve_checkpoint
from .plan import LayerPlan, make_plan
from .preflight import QuantizeChoice, preflight  # noqa: F401  (QuantizeChoice: what preflight settles)
from .recipe import GEN_VARIANT, GREEDY_METRIC, CalibrationSpec, ModelSpec, PruneSpec, Recipe
from .report import write_report
from .run import Manifest, RunDir, StageStatus
from .runtime import third_party_output
from .stages import STAGES, StageContext, load_and_score, run_stage
from .surgery import prune_checkpoint, read_config_layers

if TYPE_CHECKING:
    from .analyze import AnalysisResult, AnalysisSettings

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


def score_model(
    model_spec: ModelSpec,
    calib: CalibrationSpec,
    *,
    metric: str,
    out: Path,
    n_remove: int | None = None,
    stream: str = "auto",
    progress: bool = True,
) -> LayerScores:
    """`shortgpt-deploy score`: per-layer scores of a model, written to `out` (scores.json).

    `stream` (auto, on, off): score one layer at a time from the files (streaming.py); auto when it does not fit.

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
    if metric == GREEDY_METRIC:
        amount = {"n_remove": n_remove} if n_remove else {"ratio": 0.25}
    else:
        amount = {"n_remove": 1}  # the amount is irrelevant when scoring every layer
    prune = PruneSpec(metric=metric, stream=stream, **amount)  # type: ignore[arg-type]
    scores, _, _ = load_and_score(checkpoint, model_spec, calib, prune, manifest, docs=docs, progress=progress)
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
    """`shortgpt-deploy build`: every stage of stages.STAGES in order, then report.md. The stages that make the
    run folder (score, plan, prune) run in a temporary folder renamed into place when they are done; a dry run
    stops there. Raises BuildIncompleteError (after writing the report) if a later stage failed."""
    run_dir = Path(out_dir or recipe.output.dir)
    manifest = Manifest(inputs={"recipe": recipe.model_dump(mode="json")})
    ctx = StageContext(recipe, RunDir(run_dir), manifest, progress=progress, dry_run=dry_run)
    # Until the folder exists the libraries' output goes to the cache, where it stays (and the error names it)
    # if this part fails.
    early_log = cache_dir() / "logs" / f"{run_dir.name}-score.log"
    with third_party_output(early_log):
        choice = preflight(recipe, dry_run=dry_run)  # a bad plan, an unservable scheme or a missing library fails now
        with output_transaction(run_dir, force=force) as tmp:  # refuses an existing folder before heavy work
            ctx.run = RunDir(tmp)
            tmp.joinpath("recipe.yaml").write_text(recipe_text)
            with manifest.timed("resolve_model"):
                ctx.checkpoint = resolve_checkpoint(recipe.model.path, revision=recipe.model.revision)
            manifest.inputs["checkpoint"] = {"path": str(ctx.source.path), "kind": ctx.source.kind}
            for stage in (s for s in STAGES if s.makes_folder):
                run_stage(stage, ctx)
            manifest.status = "dry-run" if dry_run else "complete"
            ctx.run.save_manifest(manifest)
    run = ctx.run = RunDir(run_dir)
    if early_log.exists():
        run.logs.mkdir(exist_ok=True)
        shutil.move(early_log, run.log("score"))
    plan = run.load_plan()
    assert plan is not None
    pruned = None if dry_run else run_dir / ("pruned" if "delete" in recipe.prune.mode else GEN_VARIANT)
    result = BuildResult(run_dir, run.load_scores(), plan, pruned, manifest)
    if dry_run:
        return result
    if choice is not None:
        manifest.inputs["quantize"] = dataclasses.asdict(choice)
    for stage in (s for s in STAGES if not s.makes_folder):
        run_stage(stage, ctx)
    failed = [name for name, status in manifest.stages.items() if status.state == "failed"]
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
