"""The stages chained: recipe → checkpoint → calibration → scores → plan → pruned checkpoint → plot.

One function per CLI command. A run folder is built in a temporary folder beside the target and renamed into
place when complete, so an interrupted or failed run leaves no half-written output.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .calibration import build_calibration, load_documents
from .errors import OutputExistsError, PlanError
from .importance import LayerScores, score_iteratively, score_layers
from .manifest import Manifest
from .modeling import Checkpoint, load_model, resolve_checkpoint, tokenizer_adds_bos
from .plan import LayerPlan, make_plan, n_from_ratio, normalize_protected
from .recipe import CalibrationSpec, ModelSpec, PruneSpec, Recipe
from .report import plot_scores
from .surgery import commit_output, prepare_output, prune_checkpoint, read_config_layers

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


@dataclass
class BuildResult:
    run_dir: Path
    scores: LayerScores | None
    plan: LayerPlan
    pruned_dir: Path | None
    manifest: Manifest


def _calibrate_and_score(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    checkpoint: Checkpoint,
    model_spec: ModelSpec,
    calib: CalibrationSpec,
    prune: PruneSpec,
    manifest: Manifest,
    *,
    progress: bool,
) -> LayerScores:
    add_bos = model_spec.add_bos
    if add_bos is None:
        add_bos = checkpoint.add_bos if checkpoint.add_bos is not None else tokenizer_adds_bos(tokenizer)
    with manifest.timed("calibration_tokenize"):
        calibration = build_calibration(load_documents(calib), tokenizer, calib, add_bos=add_bos, source=calib.source)
    manifest.seeds["calibration"] = calib.seed
    num_layers = model.config.get_text_config().num_hidden_layers
    with manifest.timed("score"):
        if prune.iterative:
            n = prune.n_remove or (len(prune.layers) if prune.layers else n_from_ratio(float(prune.ratio), num_layers))
            return score_iteratively(
                model,
                calibration,
                metric=prune.metric,
                n_remove=n,
                protected=frozenset(normalize_protected(prune.protect, num_layers)),
                model_name=checkpoint.source,
                progress=progress,
            )
        return score_layers(model, calibration, metric=prune.metric, model_name=checkpoint.source, progress=progress)


def _is_quantized(folder: Path) -> bool:
    import json

    return "quantization_config" in json.loads((folder / "config.json").read_text())


def score_model(
    model_spec: ModelSpec, calib: CalibrationSpec, *, metric: str, out: Path, progress: bool = True
) -> LayerScores:
    """`shortgpt-deploy score`: per-layer scores of a model, written to `out` (scores.json)."""
    from .importance import METRICS

    if metric not in METRICS:  # before minutes of model loading
        raise PlanError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    manifest = Manifest()
    checkpoint = resolve_checkpoint(model_spec.path, revision=model_spec.revision)
    model, tokenizer = load_model(
        checkpoint.path, dtype=model_spec.dtype, trust_remote_code=model_spec.trust_remote_code
    )
    prune = PruneSpec(metric=metric, n_remove=1)  # the amount is irrelevant when only scoring
    scores = _calibrate_and_score(model, tokenizer, checkpoint, model_spec, calib, prune, manifest, progress=progress)
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
    if dry_run:
        return plan, []
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
    """`shortgpt-deploy build`: score → plan → prune, into one run folder with provenance and a plot."""
    run_dir = Path(out_dir or recipe.output.dir)
    tmp = prepare_output(run_dir, force=force)  # refuses an existing folder before any heavy work
    try:
        manifest = Manifest(inputs={"recipe": recipe.model_dump(mode="json")})
        (tmp / "recipe.yaml").write_text(recipe_text)
        with manifest.timed("resolve_model"):
            checkpoint = resolve_checkpoint(recipe.model.path, revision=recipe.model.revision)
        manifest.inputs["checkpoint"] = {"path": str(checkpoint.path), "kind": checkpoint.kind}
        p = recipe.prune
        num_layers = read_config_layers(checkpoint.path)
        scores = None
        # An explicit layer list needs no scores; a quantized source (the paper's Table 2) cannot be scored
        # without its quantization kernels, so it is pruned by list alone.
        if p.layers is None or not _is_quantized(checkpoint.path):
            with manifest.timed("load_model"):
                model, tokenizer = load_model(
                    checkpoint.path,
                    dtype=recipe.model.dtype,
                    trust_remote_code=recipe.model.trust_remote_code,
                )
            scores = _calibrate_and_score(
                model, tokenizer, checkpoint, recipe.model, recipe.calibration, p, manifest, progress=progress
            )
            scores.save(tmp / "scores.json")
            del model  # surgery streams from disk; free the weights first
        plan = make_plan(
            num_layers=num_layers,
            scores=scores,
            n_remove=p.n_remove,
            ratio=p.ratio,
            layers=p.layers,
            protect=p.protect,
        )
        plan.save(tmp / "plan.json")
        logger.info("plan: %s", plan.summary())
        if scores is not None:
            plot_scores(scores, plan, tmp / "bi.png", title=f"{checkpoint.source}: {scores.metric} per layer")
        pruned = None
        if not dry_run:
            with manifest.timed("surgery"):
                prune_checkpoint(
                    checkpoint.path,
                    plan,
                    out_dir=tmp / "pruned",
                    base_model=checkpoint.source,
                    recipe_text=recipe_text,
                    progress=progress,
                )
            pruned = run_dir / "pruned"
            if checkpoint.notice:
                (tmp / "pruned" / "NOTICE").write_text(checkpoint.notice + "\n")
        manifest.status = "dry-run" if dry_run else "complete"
        manifest.save(tmp / "manifest.json")
        commit_output(tmp, run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return BuildResult(run_dir, scores, plan, pruned, manifest)
