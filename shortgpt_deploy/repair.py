"""Repair a pruned checkpoint without training: `repair_checkpoint(dense_dir, pruned_dir, ...) -> RepairResult`.

It fits on calibration text (methods in repair_methods.py, math in repair_fit.py), changes a few existing
tensors, and writes a stock checkpoint with the pruned one's architecture, tensor names and shapes, so
transformers, GPTQ and vLLM take it as it is. Output is built in a temporary folder beside `out_dir` and
renamed into place when complete (checkpoint.output_transaction); unchanged shards are copied byte for byte.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import (
    PLAN_FILE,
    WEIGHTS_INDEX,
    copy_side_files,
    is_quantized,
    output_transaction,
    read_config_layers,
    read_layer_tensors,
)
from .errors import UnsupportedArchitectureError
from .files import atomic_write_text
from .plan import LayerPlan
from .repair_methods import METHODS, GapRepair, RepairError, RepairOptions

if TYPE_CHECKING:
    import torch

    from .calibration import CalibrationSet
    from .recipe import CalibrationSpec, RepairSpec
    from .repair_distill import DistillOptions

__all__ = [
    "REPAIR_FILE",
    "GapRepair",
    "RepairError",
    "RepairOptions",
    "RepairResult",
    "RepairStep",
    "repair_checkpoint",
    "repair_pruned",
]

logger = logging.getLogger(__name__)

REPAIR_FILE = "shortgpt_repair.json"  # what was fitted travels with the checkpoint, like the plan
METHOD_TITLES = {
    "linear": "linear (ReplaceMe, arXiv 2505.02819)",
    "scale": "scale (after Prune&Comp, arXiv 2507.18212)",
    "distill": "distill (knowledge distillation from the dense model)",
}


@dataclass
class RepairStep:
    """One method's pass over the model (a chain such as [linear, scale] has one per method, in order)."""

    method: str
    time_s: float
    gaps: list[GapRepair]
    notes: list[str] = field(default_factory=list)


@dataclass
class RepairResult:
    """What repair.json holds: how the repaired checkpoint was made, and how well each gap was fitted."""

    methods: list[str]
    options: dict[str, Any]
    dense: str
    pruned: str
    out_dir: str
    data: dict[str, Any]  # calibration.describe(): source, samples, seq_len, seed, add_bos, num_tokens
    tokens: int
    time_s: float
    steps: list[RepairStep]
    schema_version: int = 2

    @property
    def gaps(self) -> list[GapRepair]:
        return [g for step in self.steps for g in step.gaps]

    @property
    def notes(self) -> list[str]:
        return [n for step in self.steps for n in step.notes]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RepairResult:
        steps = [RepairStep(**(step | {"gaps": [GapRepair(**g) for g in step["gaps"]]})) for step in d["steps"]]
        return cls(**(d | {"steps": steps}))

    @classmethod
    def load(cls, path: Path) -> RepairResult:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise RepairError(f"{path} is not a repair.json written by shortgpt-deploy: {err}") from None


def repair_checkpoint(
    dense_dir: Path,
    pruned_dir: Path,
    *,
    out_dir: Path,
    calibration: CalibrationSet,
    method: str | list[str] = "linear",
    plan: LayerPlan | None = None,
    options: RepairOptions | None = None,
    force: bool = False,
    progress: bool = True,
) -> RepairResult:
    """Repair `pruned_dir` (pruned from `dense_dir` by `plan`, default: its shortgpt_plan.json) into `out_dir`.

    `method` is one method or a chain, applied in order to the same model in memory (each fits on the model as
    the previous one left it); the checkpoint is written once, at the end.
    """
    from .modeling import decoder_layers, load_model

    start = time.perf_counter()
    dense_dir, pruned_dir, out_dir = Path(dense_dir), Path(pruned_dir), Path(out_dir)
    options = options or RepairOptions()
    methods = [method] if isinstance(method, str) else list(method)
    for name in methods:
        if name not in METHODS:
            raise RepairError(f"unknown repair method {name!r}; known: {', '.join(METHODS)}")
    if not methods or len(set(methods)) != len(methods):
        raise RepairError(f"repair methods {methods}: give each of {', '.join(METHODS)} at most once, in order")
    if not calibration.batches:
        raise RepairError(f"calibration {calibration.source} has no batches: the repair fits on calibration text")
    if out_dir.resolve() == pruned_dir.resolve():
        raise RepairError(f"the repair's output folder {out_dir} is its input; choose another output folder")
    for folder in (dense_dir, pruned_dir):
        if is_quantized(folder, "gptq"):
            raise RepairError(
                f"{folder} is GPTQ-quantized: repairs fold into float weights; repair the float pruned checkpoint "
                "and quantize the repaired one"
            )
    plan = plan or _saved_plan(pruned_dir)
    _check_plan(plan, dense_dir, pruned_dir)
    headers, prefix = read_layer_tensors(pruned_dir, len(plan.keep))
    with output_transaction(out_dir, force=force) as tmp:  # refuses an existing output before any work
        dense, _ = load_model(dense_dir, dtype=options.dtype)
        student, _ = load_model(pruned_dir, dtype=options.dtype)
        dense.to(options.device)
        student.to(options.device)
        if len(decoder_layers(student)) != len(plan.keep):
            raise RepairError(
                f"{pruned_dir} loads with {len(decoder_layers(student))} layers, the plan keeps {len(plan.keep)}"
            )
        steps, changed = [], {}
        for name in methods:
            began = time.perf_counter()
            gaps, step_changed = METHODS[name](
                dense, student, plan, calibration, prefix=prefix, options=options, progress=progress
            )
            changed.update(step_changed)
            steps.append(RepairStep(name, time.perf_counter() - began, gaps, _notes(name, gaps)))
        result = RepairResult(
            methods=methods,
            options=asdict(options),
            dense=str(dense_dir),
            pruned=str(pruned_dir),
            out_dir=str(out_dir),
            data=calibration.describe(),
            tokens=calibration.num_tokens,
            time_s=0.0,
            steps=steps,
        )
        write_repaired(pruned_dir, tmp, headers, changed)
        result.time_s = time.perf_counter() - start
        (tmp / "README.md").write_text(_model_card(pruned_dir, result))
        result.save(tmp / REPAIR_FILE)
    logger.info("repair %s: %d tensors changed, %.1f s", "+".join(methods), len(changed), result.time_s)
    return result


def repair_pruned(
    dense_dir: Path,
    pruned_dir: Path,
    *,
    out_dir: Path,
    repair: RepairSpec,
    calibration: CalibrationSpec,
    add_bos: bool | None = None,
    force: bool = False,
    progress: bool = True,
) -> RepairResult:
    """`repair_checkpoint` as a recipe's repair section asks, fitted on `calibration`'s text cut into the
    section's samples × seq_len blocks (add_bos None: as the pruned model's tokenizer does)."""
    from transformers import AutoTokenizer

    from .calibration import build_calibration, load_documents
    from .modeling import decide_add_bos

    sizes = {"samples": repair.samples, "seq_len": repair.seq_len, "batch_size": repair.batch_size}
    spec = calibration.model_copy(update=sizes)
    docs = load_documents(spec)  # a bad calibration file fails before the models load
    tokenizer = AutoTokenizer.from_pretrained(pruned_dir)
    bos = decide_add_bos(tokenizer, requested=add_bos)
    return repair_checkpoint(
        dense_dir,
        pruned_dir,
        out_dir=out_dir,
        calibration=build_calibration(docs, tokenizer, spec, add_bos=bos, source=spec.source),
        method=list(repair.method),
        options=RepairOptions(objective=repair.objective, ridge=repair.ridge, distill=distill_options(repair)),
        force=force,
        progress=progress,
    )


def distill_options(repair: RepairSpec) -> DistillOptions:
    from .repair_distill import DistillOptions

    return DistillOptions(**repair.distill.model_dump()) if repair.distill else DistillOptions()


def _saved_plan(pruned_dir: Path) -> LayerPlan:
    path = pruned_dir / PLAN_FILE
    if not path.is_file():
        raise RepairError(
            f"{pruned_dir} has no {PLAN_FILE}: give the plan the checkpoint was pruned with (plan.json of its run)"
        )
    return LayerPlan.load(path)


def _check_plan(plan: LayerPlan, dense_dir: Path, pruned_dir: Path) -> None:
    if not plan.remove:
        raise RepairError("the plan removes no layers: there is nothing to repair")
    dense_n, pruned_n = read_config_layers(dense_dir), read_config_layers(pruned_dir)
    if dense_n != plan.num_layers_before or pruned_n != plan.num_layers_after:
        raise RepairError(
            f"the plan goes from {plan.num_layers_before} to {plan.num_layers_after} layers, but {dense_dir} has "
            f"{dense_n} and {pruned_dir} has {pruned_n}: give the dense model and plan this checkpoint was pruned with"
        )


def write_repaired(
    pruned_dir: Path, tmp: Path, headers: dict[Path, dict[str, Any]], changed: dict[str, torch.Tensor]
) -> None:
    """The pruned folder with `changed` tensors replaced (in their stored dtype); other shards copied as they are."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    stored = {name for h in headers.values() for name in h}
    missing = sorted(set(changed) - stored)
    if missing:
        raise UnsupportedArchitectureError(
            f"the repair changed {missing[0]}, which {pruned_dir} does not store under that name; this "
            "architecture's tensor names are not supported by the repair yet"
        )
    for shard, header in headers.items():
        mine = [n for n in header if n in changed]
        if not mine:
            shutil.copy2(shard, tmp / shard.name)
            continue
        with safe_open(str(shard), framework="pt") as f:
            metadata = f.metadata()
        tensors = load_file(str(shard))
        for name in mine:
            tensors[name] = changed[name].detach().to("cpu", tensors[name].dtype).contiguous()
        save_file(tensors, str(tmp / shard.name), metadata=metadata)
    for name in ("config.json", WEIGHTS_INDEX, PLAN_FILE):
        if (pruned_dir / name).is_file():
            shutil.copy2(pruned_dir / name, tmp / name)
    copy_side_files(pruned_dir, tmp)


def _notes(method: str, gaps: list[GapRepair]) -> list[str]:
    notes = []
    diagonal = [g.removed for g in gaps if g.kind == "diagonal"]
    if diagonal:
        notes.append(
            f"gaps {', '.join(map(str, diagonal))}: the MLP output passes through post_feedforward_layernorm "
            "(Gemma2/3), which would undo a full T; a diagonal T is folded into that norm's weight"
        )
    for g in gaps:
        if g.side == "after":
            notes.append(
                f"gap {g.removed} starts at layer 0: T is folded into the first kept layer after it (dense layer "
                f"{g.anchor}), fitted to that layer's dense output; embeddings are never changed"
            )
        if method == "scale" and not g.folded_into:
            notes.append(f"gap {g.removed} ends the model: the final norm makes its scale irrelevant; nothing changed")
    return notes


def _model_card(pruned_dir: Path, result: RepairResult) -> str:
    card = (pruned_dir / "README.md").read_text() if (pruned_dir / "README.md").is_file() else ""
    parts = [
        f"{card.rstrip()}\n\n## Repair: {' then '.join(result.methods)}\n\nFitted on {result.tokens} tokens of "
        f"{result.data.get('source', '?')} in {result.time_s:.1f} s; tensor names and shapes are those of the "
        "pruned checkpoint."
    ]
    for step in result.steps:
        parts.append(f"### {METHOD_TITLES.get(step.method, step.method)} ({step.time_s:.1f} s)")
        parts.append(step_table(step))
        parts += [f"- {n}" for n in step.notes]
    return "\n\n".join(parts) + "\n"


def step_table(step: RepairStep) -> str:
    """A markdown table of one step's gaps (the model card and report.md)."""
    if step.method == "distill":
        head = "| steps | tokens | held-out loss before → best (step) | stopped by | tensors trained |"
        head += "\n|---|---|---|---|---|"
        rows = [
            f"| {g.steps} | {g.num_tokens} | {g.heldout_loss_before:.4g} → {g.heldout_loss_best:.4g} ({g.best_step}) "
            f"| {g.stopped_because} | {len(g.folded_into)} |"
            for g in step.gaps
        ]
    elif step.method == "scale":
        head = "| removed layers | α | tensors rescaled |\n|---|---|---|"
        rows = [f"| {g.removed} | {g.alpha:.4g} | {len(g.folded_into)} |" for g in step.gaps]
    else:
        head = "| removed layers | folded into | fit error before → after | hidden-state error before → after |"
        head += "\n|---|---|---|---|"
        rows = [
            f"| {g.removed} | {', '.join(g.folded_into)} | {g.fit_rel_error_before:.4g} → {g.fit_rel_error:.4g} | "
            f"{g.state_rel_error_before:.4g} → {g.state_rel_error:.4g} |"
            for g in step.gaps
        ]
    return "\n".join([head, *rows])
