"""What a recipe is checked against before any model loads: the names it uses, then this machine.

Two steps, both before minutes of scoring:
1. `parse_recipe` / `load_recipe`: the schema (recipe.py: types, bounds, rules across fields) together with the
   names that only a stage knows (task names: tasks.py; the GPTQ scheme: quantize.py; SLOs: bench.py),
   normalised ("W4A16" → "w4a16"). A typo fails with the field's path, as any schema error does. The name checks
   live here, not in recipe.py, so that the schema imports no stage module and every stage may import it.
2. `preflight`: what needs no model but does need the machine or the files: the plan's rules on config.json,
   the calibration files, whether the GPTQ scheme can be served where asked (`QuantizeChoice`), the libraries,
   the retention budget's task data, the serving preset.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .calibration import check_text_files
from .checkpoint import is_quantized, read_config_layers
from .errors import PlanError
from .gen import check_gen_source
from .modeling import resolve_checkpoint
from .plan import check_request
from .recipe import QUANTIZED_SUFFIX, Recipe, StageNames, parse_schema, read_recipe_file

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------- names in a recipe
def load_recipe(path: str | Path) -> Recipe:
    """A recipe file, checked (schema and names); RecipeError naming the file and each bad field."""
    return parse_recipe(read_recipe_file(Path(path)), origin=str(path))


def parse_recipe(data: Any, *, origin: str = "recipe") -> Recipe:
    """A recipe from its YAML data, checked (schema and names) and with the names normalised."""
    return parse_schema(data, origin=origin, check_stage_names=check_stage_names)


def check_stage_names(kind: StageNames, value: Any) -> Any:
    """A recipe field that names what only a stage knows, checked and normalised ("W4A16" → "w4a16"); ValueError
    (pydantic's way to fail a field) with the stage's message. Imports only the stages' name tables (no torch)."""
    from .bench import BenchError, parse_slo
    from .quantize import SchemeError, parse_scheme
    from .tasks import TaskError, parse_task_names

    try:
        if kind == "tasks":
            return parse_task_names(",".join(value))
        if kind == "scheme":
            return parse_scheme(value)
        return [str(parse_slo(s)) for s in value]
    except (TaskError, SchemeError, BenchError) as err:
        raise ValueError(str(err)) from None


# -------------------------------------------------------------------------------------------- the machine
@dataclass(frozen=True)
class QuantizeChoice:
    """The scheme and serving target the quantize stage will use, settled before any heavy work."""

    scheme: str
    target: str  # cpu | gpu
    servable_here: bool  # whether this machine's vLLM can serve the result (else the bench leaves it out)
    note: str = ""


def preflight(recipe: Recipe, *, dry_run: bool = False) -> QuantizeChoice | None:
    """The checks that need no model: the plan's rules on config.json alone and the calibration files (in a dry
    run too; they once failed only after loading and scoring), then the GPTQ scheme can be served where asked, the
    libraries are installed, the retention budget's task data is there.

    `scheme: auto` with `target: auto` on a machine whose vLLM cannot serve any GPTQ checkpoint (an AVX2-only CPU)
    still quantizes, for quality (the orthogonality claim is about quality), with the scheme a GPU serves; the
    bench then leaves the quantized variants out and the report says why. An explicit scheme or target that
    cannot be served fails here instead.
    """
    _check_model(recipe)
    if dry_run:
        return None
    choice = _quantize_choice(recipe) if recipe.quantize is not None else None
    budget = recipe.prune.budget
    if budget is not None and budget.criterion == "retention":
        from .budget import load_budget_tasks

        load_budget_tasks(budget)  # missing multiple-choice data fails before the model loads
    if recipe.bench is not None:
        # From serve, where tests replace it: whether vLLM is installed is the bench's question.
        from .serve import ServeError, load_preset, vllm_installed

        if not vllm_installed():
            raise ServeError("the bench section needs vLLM, which is not installed: `make install` installs it")
        load_preset(recipe.serve.preset if recipe.serve else None)
    return choice


def _check_model(recipe: Recipe) -> None:
    """The plan's rules on config.json alone, the calibration files, and what a quantized source cannot do."""
    check_text_files(recipe.calibration)  # scoring and GPTQ read them
    checkpoint = resolve_checkpoint(recipe.model.path, revision=recipe.model.revision)
    p = recipe.prune
    check_request(
        num_layers=read_config_layers(checkpoint.path), n_remove=p.n_remove, ratio=p.ratio, layers=p.layers,
        protect=p.protect, metric=p.metric,
    )  # fmt: skip
    if "gen" in p.mode:
        check_gen_source(checkpoint.path)
    if p.plot and is_quantized(checkpoint.path):
        raise PlanError(
            f"prune.plot: {checkpoint.path} is quantized and cannot be scored here; drop plot: true (explicit "
            "layers need no scores)"
        )
    if recipe.repair is not None and is_quantized(checkpoint.path):
        raise PlanError(
            f"repair: {checkpoint.path} is quantized; repairs fold into float weights: prune the float model, "
            "repair it, then quantize the repaired one (quantize.variants: [repaired])"
        )


def _quantize_choice(recipe: Recipe) -> QuantizeChoice:
    """The scheme and target quantize will use; an unservable explicit choice, or a missing GPTQModel, fails."""
    # Looked up in quantize at call time (not imported at the top): tests pretend to be another machine there.
    from .quantize import UnservableSchemeError, choose_scheme, import_gptqmodel, resolve_target

    q, here = recipe.quantize, resolve_target("auto")
    assert q is not None
    try:
        scheme, where = choose_scheme(q.scheme, target=q.target)
        choice = QuantizeChoice(scheme.name, where, where == here)
    except UnservableSchemeError as err:
        if (q.scheme, q.target) != ("auto", "auto"):
            raise
        scheme, where = choose_scheme("auto", target="gpu")
        note = f"{scheme.name} for a GPU, measured for quality only: {str(err).split('. ')[0]}"
        logger.warning("quantize: %s", note)
        choice = QuantizeChoice(scheme.name, where, False, note)
    import_gptqmodel()
    benched = [v for v in (recipe.bench.variants if recipe.bench else []) if v.endswith(QUANTIZED_SUFFIX)]
    if benched and not choice.servable_here and not choice.note:
        raise PlanError(
            f"quantize.target is {where} but the bench serves {', '.join(benched)} on this machine "
            f"({here}); set quantize.target: auto, or drop them from bench.variants"
        )
    return choice
