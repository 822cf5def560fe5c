"""Apply a LayerPlan to a checkpoint folder: tensors renumbered, config sliced, everything else kept.

Tensors are never loaded: each kept tensor's bytes are copied straight from the source safetensors file into
the new one under its new name (the safetensors library has no streaming writer, so the 8-byte length + JSON
header is written here), so peak memory is one copy buffer whatever the model size, and quantized tensors
(GPTQ's qweight/qzeros/scales/g_idx) go through untouched. Output is built in a temporary folder next to the
target and renamed into place only when complete.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import struct
from collections import Counter
from pathlib import Path
from typing import Any

from .checkpoint import (  # noqa: F401  (PLAN_FILE, WEIGHTS_INDEX: the folder's names, also read from here)
    FIXED_LIST_FIELDS,
    LAYER_INDEX_FIELDS,
    LAYER_PERIOD_FIELDS,
    LAYER_THRESHOLD_FIELDS,
    OTHER_WEIGHTS,
    PER_LAYER_FIELDS,
    PLAN_FILE,
    WEIGHTS_INDEX,
    check_layer_tensors,
    copy_side_files,
    detect_layer_prefix,
    on_period,
    output_transaction,
    period_settings,
    read_config,
    read_config_layers,
    read_json,
    read_layer_tensors,
    read_safetensors_header,
    text_config,
    weight_files,
)
from .errors import PlanError, UnsupportedArchitectureError
from .plan import LayerPlan

logger = logging.getLogger(__name__)


# The config fields that describe layers per layer, by index, by threshold and by period live in checkpoint.py.
# Periodic sliding-window patterns, harmless once layer_types is written out explicitly.
PATTERN_FIELDS = ("sliding_window_pattern", "_sliding_window_pattern")


# ------------------------------------------------------------------------------------------- safetensors
def _copy_range(src: Any, dst: Any, offset: int, length: int) -> None:
    """Copy bytes [offset, offset+length) of src into dst at its current position, in the kernel when possible."""
    src.seek(offset)
    dst.flush()
    remaining = length
    try:
        while remaining:
            n = os.copy_file_range(src.fileno(), dst.fileno(), remaining, offset + length - remaining)
            if n == 0:
                break
            remaining -= n
        dst.seek(0, os.SEEK_END)
    except (AttributeError, OSError) as err:  # no copy_file_range (other OS, some filesystems): buffered copy
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise  # a full disk is not "unsupported": the buffered copy would only fail later
        src.seek(offset + length - remaining)
        while remaining:
            chunk = src.read(min(remaining, 16 << 20))
            dst.write(chunk)
            remaining -= len(chunk)
    if remaining:
        raise OSError(f"{src.name}: file ended {remaining} bytes early")


def rewrite_safetensors(src: Path, dst: Path, rename: dict[str, str | None], progress: Any = None) -> int:
    """Write `dst` with every tensor of `src` renamed by `rename` (None = dropped). Returns bytes written."""
    header, data_start = read_safetensors_header(src)
    metadata = header.pop("__metadata__", None)
    entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    new_header: dict[str, Any] = {"__metadata__": metadata} if metadata is not None else {}
    ranges = []
    pos = 0
    for name, info in entries:
        new_name = rename.get(name, name)
        if new_name is None:
            continue
        begin, end = info["data_offsets"]
        new_header[new_name] = {
            "dtype": info["dtype"],
            "shape": info["shape"],
            "data_offsets": [pos, pos + end - begin],
        }
        ranges.append((data_start + begin, end - begin))
        pos += end - begin
    blob = json.dumps(new_header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8-byte alignment with spaces
    with src.open("rb") as fin, dst.open("wb") as fout:
        fout.write(struct.pack("<Q", len(blob)) + blob)
        for offset, length in ranges:
            _copy_range(fin, fout, offset, length)
            if progress is not None:
                progress.update(length)
    return pos


def tensor_renames(names: list[str], prefix: str, plan: LayerPlan) -> dict[str, str | None]:
    new_index = {old: new for new, old in enumerate(plan.keep)}
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    out: dict[str, str | None] = {}
    for name in names:
        m = pattern.match(name)
        if m is None:
            continue
        old = int(m.group(1))
        out[name] = None if old not in new_index else f"{prefix}{new_index[old]}.{name[m.end() :]}"
    return out


# ------------------------------------------------------------------------------------------------ config
def slice_config(
    config: dict[str, Any], keep: list[int] | tuple[int, ...], derived_layer_types: list[str] | None = None
) -> list[str]:
    """Rewrite `config` in place for the kept layers; return a note per changed field.

    `derived_layer_types` is what transformers computes when the file has no explicit `layer_types` (e.g. from
    Qwen2's max_window_layers or Gemma's sliding_window_pattern): it is written out explicitly, sliced, because
    the rule that produced it no longer holds once layers are gone.
    """
    cfg = text_config(config)
    n, keep = cfg["num_hidden_layers"], list(keep)
    if keep and keep[-1] >= n:
        raise PlanError(f"the plan keeps layer {keep[-1]} but config.json has num_hidden_layers={n}")
    notes = [f"num_hidden_layers: {n} → {len(keep)}"]
    if "layer_types" not in cfg and derived_layer_types is not None and len(derived_layer_types) == n:
        cfg["layer_types"] = list(derived_layer_types)
        notes.append("layer_types: written out explicitly (was derived)")
    periodic, period_notes = rewrite_periods(cfg, keep)
    cfg["num_hidden_layers"] = len(keep)
    new_index = {old: new for new, old in enumerate(keep)}
    for key in list(cfg):
        value = cfg[key]
        if key in periodic:
            continue  # rewritten together with its period below
        if key in PER_LAYER_FIELDS and value is not None:
            if len(value) != n:
                raise UnsupportedArchitectureError(f"config field {key} has {len(value)} entries for {n} layers")
            cfg[key] = "".join(value[i] for i in keep) if isinstance(value, str) else [value[i] for i in keep]
            notes.append(f"{key}: sliced to the kept layers")
        elif key in LAYER_INDEX_FIELDS and isinstance(value, list):
            cfg[key] = [new_index[i] for i in value if i in new_index]
            notes.append(f"{key}: {value} → {cfg[key]}")
        elif key in LAYER_THRESHOLD_FIELDS and isinstance(value, int):
            cfg[key] = sum(1 for i in keep if i < value)
            notes.append(f"{key}: {value} → {cfg[key]}")
        elif key in PATTERN_FIELDS and value not in (None, 1) and not isinstance(cfg.get("layer_types"), list):
            raise UnsupportedArchitectureError(
                f"config field {key}={value} sets sliding-window layers by period and there is no layer_types "
                "list to slice; upgrade transformers so that it writes layer_types"
            )
        elif key in FIXED_LIST_FIELDS:
            continue
        elif isinstance(value, list) and len(value) == n and n > 1 and key not in PER_LAYER_FIELDS:
            # An unknown list with one entry per layer is almost surely per-layer; slicing it is the safer bet.
            cfg[key] = [value[i] for i in keep]
            logger.warning("config field %s has one entry per layer: sliced it (unknown field, check it)", key)
            notes.append(f"{key}: sliced (unknown field with one entry per layer)")
    cfg.update(periodic)
    return notes + period_notes


# ----------------------------------------------------------------------------------------- period fields
def rewrite_periods(cfg: dict[str, Any], keep: list[int]) -> tuple[dict[str, Any], list[str]]:
    """New values for the period fields of `cfg` and the fields they combine with (the caller applies them and
    leaves those fields alone), such that every kept layer is rebuilt as the kind it was; a note per change.

    A period that still describes the kept layers stays; otherwise another period (and offset) that does is
    chosen; otherwise the layers are written out in the explicit list the architecture also accepts
    (mlp_only_layers, moe_layers). Where it has none (Jamba, DeepSeek's moe_layer_freq) the plan is refused.
    """
    out: dict[str, Any] = {}
    notes: list[str] = []
    new_index = {old: new for new, old in enumerate(keep)}
    for field, (period, offset) in period_settings(cfg).items():
        target = _on_layers(cfg, field, keep, period, offset)
        view = dict(cfg)  # the pruned config as slice_config would leave it without this rewrite
        for key in _COMBINED.get(field, ()):
            if isinstance(cfg.get(key), list):
                view[key] = [new_index[i] for i in cfg[key] if i in new_index]
            elif key == "first_k_dense_replace" and isinstance(cfg.get(key), int):
                view[key] = sum(1 for i in keep if i < cfg[key])
        found = _describe(view, field, target, period, offset)
        if found is None and field == "decoder_sparse_step" and "mlp_only_layers" in cfg:
            found = {field: 1, "mlp_only_layers": [j for j, on in enumerate(target) if not on]}
        elif found is None and field == "interleave_moe_layer_step" and "moe_layers" in cfg:
            found = {"moe_layers": [j for j, on in enumerate(target) if on]}
            logger.warning(
                "moe_layers written out explicitly for transformers; vLLM 0.32 places Llama 4's MoE layers by "
                "interleave_moe_layer_step alone and cannot serve this pruned layout"
            )
        elif found is None:
            raise UnsupportedArchitectureError(_no_period_message(field, period, offset, keep, target))
        settled = {k: view[k] for k in _COMBINED.get(field, ()) if k in cfg} | found
        for key, value in settled.items():
            if value != cfg.get(key):
                why = f" (so that each kept layer keeps its kind under {field})" if key in found else ""
                notes.append(f"{key}: {cfg.get(key)} → {value}{why}")
        out.update(settled)
    return out, notes


# The fields each period combines with (see checkpoint.LAYER_PERIOD_FIELDS): rewritten together with it.
_COMBINED: dict[str, tuple[str, ...]] = {
    "decoder_sparse_step": ("mlp_only_layers",),
    "interleave_moe_layer_step": ("moe_layers",),
    "moe_layer_freq": ("first_k_dense_replace",),
}


def _on_layers(cfg: dict[str, Any], field: str, layers: list[int], period: int, offset: int) -> list[bool]:
    """Which of `layers` are "on" under `field` and the fields it combines with (see LAYER_PERIOD_FIELDS)."""
    if field == "decoder_sparse_step":
        dense, experts = set(cfg.get("mlp_only_layers") or ()), cfg.get("num_experts", 1)
        return [i not in dense and bool(experts) and on_period(field, i, period) for i in layers]
    if field == "interleave_moe_layer_step" and isinstance(cfg.get("moe_layers"), list):
        return [i in set(cfg["moe_layers"]) for i in layers]  # transformers: the list overrides the step
    if field == "moe_layer_freq":
        first = cfg.get("first_k_dense_replace") or 0
        return [i >= first and on_period(field, i, period) for i in layers]
    return [on_period(field, i, period, offset) for i in layers]


def _describe(view: dict[str, Any], field: str, target: list[bool], period: int, offset: int) -> dict[str, Any] | None:
    """Settings of `field` (and its offset or threshold) under which layers 0..len(target)-1 of the pruned
    config `view` are `target`; the old ones are tried first, so that nothing changes that need not."""
    layers = list(range(len(target)))
    offset_field = LAYER_PERIOD_FIELDS[field]
    if field == "interleave_moe_layer_step":
        view = {**view, "moe_layers": None}  # vLLM 0.32 reads the step alone: it must describe the layers itself
    periods = [period, *(p for p in range(1, len(target) + 2) if p != period)]
    for p in periods:
        if offset_field is not None:  # Jamba: 0 <= offset < period
            for o in [offset, *range(p)] if offset < p else range(p):
                if _on_layers(view, field, layers, p, o) == target:
                    return {field: p, offset_field: o}
        elif field == "moe_layer_freq":
            first = view.get("first_k_dense_replace") or 0
            for k in [first, *range(len(target) + 1)]:
                if _on_layers({**view, "first_k_dense_replace": k}, field, layers, p, 0) == target:
                    return {field: p, "first_k_dense_replace": k}
        elif _on_layers(view, field, layers, p, 0) == target:
            return {field: p}
    return None


def _no_period_message(field: str, period: int, offset: int, keep: list[int], target: list[bool]) -> str:
    offset_field = LAYER_PERIOD_FIELDS[field]
    setting = f"{field}={period}" + (f" with {offset_field}={offset}" if offset_field else "")
    on = [old for old, is_on in zip(keep, target, strict=True) if is_on]
    return (
        f"config field {setting} places layers by period, and no {field} describes the kept layers (of which "
        f"{on} are the {'attention' if field == 'attn_layer_period' else 'sparse'} ones); this architecture has "
        "no explicit per-layer list to write instead. Choose layers to remove that keep the pattern periodic "
        f"(e.g. whole periods of {period} layers), or protect the layers that break it"
    )


def remap_module_names(obj: Any, prefix: str, plan: LayerPlan) -> Any:
    """Renumber layer module names inside a quantization_config (ignore lists, per-module overrides).

    Handles plain (`model.layers.3.mlp`) and regex-escaped (`model\\.layers\\.3\\.`) spellings; names of
    removed layers are dropped from lists and dicts.
    """
    new_index = {old: new for new, old in enumerate(plan.keep)}
    parts = [re.escape(p) for p in prefix.rstrip(".").split(".")]
    pattern = re.compile(r"(\\?\.)".join(parts) + r"(\\?\.)(\d+)(?=\\?\.|$)")
    gone = object()

    def fix(s: str) -> Any:
        m = pattern.search(s)
        if m is None:
            return s
        old = int(m.group(m.lastindex))  # type: ignore[arg-type]
        if old not in new_index:
            return gone
        return s[: m.start(m.lastindex)] + str(new_index[old]) + s[m.end(m.lastindex) :]

    def walk(x: Any) -> Any:
        if isinstance(x, str):
            return fix(x)
        if isinstance(x, list):
            return [y for y in (walk(v) for v in x) if y is not gone]
        if isinstance(x, dict):
            out = {}
            for k, v in x.items():
                nk = fix(k) if isinstance(k, str) else k
                if nk is not gone:
                    out[nk] = walk(v)
            return out
        return x

    return walk(obj)


# ---------------------------------------------------------------------------------------------- the whole
# Config keys from which transformers derives per-layer attention types when `layer_types` is absent.
LAYER_TYPE_SOURCES = ("sliding_window", "use_sliding_window", "max_window_layers", *PATTERN_FIELDS)


def _derived_layer_types(src: Path, config: dict[str, Any]) -> list[str] | None:
    """layer_types as transformers computes them, where the file leaves them implicit.

    Only asked of transformers when a sliding-window setting could make layers differ: importing it costs
    seconds, more than the whole surgery on a small model.
    """
    cfg = text_config(config)
    if "layer_types" in cfg or not any(cfg.get(k) is not None for k in LAYER_TYPE_SOURCES):
        return None
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(src)
        types = getattr(cfg.get_text_config(), "layer_types", None)
        return list(types) if types is not None else None
    except Exception as err:  # an architecture transformers does not know still prunes by its explicit fields
        logger.debug("transformers could not derive layer_types for %s: %s", src, err)
        return None


def prune_checkpoint(
    src: Path,
    plan: LayerPlan,
    *,
    out_dir: Path,
    base_model: str = "",
    recipe_text: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> list[str]:
    """Write the pruned checkpoint to `out_dir`; returns the notes on what changed in config.json."""
    from .runtime import tqdm

    src = Path(src)
    config = read_config(src)
    _, index = weight_files(src)
    headers, prefix = read_layer_tensors(src, read_config_layers(src))
    names = [n for h in headers.values() for n in h]
    if text_config(config)["num_hidden_layers"] != plan.num_layers_before:
        raise PlanError(
            f"the plan is for {plan.num_layers_before} layers but {src}/config.json has "
            f"num_hidden_layers={text_config(config)['num_hidden_layers']}"
        )
    check_layer_tensors(src, headers, prefix, config, list(plan.keep))
    notes = slice_config(config, plan.keep, _derived_layer_types(src, config))
    if "quantization_config" in config:
        config["quantization_config"] = remap_module_names(config["quantization_config"], prefix, plan)
        notes.append("quantization_config: layer module names renumbered")
    rename = tensor_renames(names, prefix, plan)

    with output_transaction(Path(out_dir), force=force) as tmp:
        total = sum(s.stat().st_size for s in headers)
        weight_map: dict[str, str] = {}
        written = 0
        with tqdm(total=total, unit="B", unit_scale=True, desc="surgery", disable=not progress) as bar:
            for shard, header in headers.items():
                kept = [rename.get(n, n) for n in header]
                if not any(k is not None for k in kept):
                    bar.update(shard.stat().st_size)
                    continue  # a shard holding only removed layers disappears
                before = bar.n
                written += rewrite_safetensors(shard, tmp / shard.name, rename, bar)
                bar.update(shard.stat().st_size - (bar.n - before))  # bytes of removed layers count as done
                weight_map.update({k: shard.name for k in kept if k is not None})
        if index is not None:
            meta = dict(index.get("metadata", {}), total_size=written)
            (tmp / WEIGHTS_INDEX).write_text(
                json.dumps({"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n"
            )
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_side_files(src, tmp)
        (tmp / "README.md").write_text(model_card(plan, base_model or str(src), notes, recipe_text))
        plan.save(tmp / PLAN_FILE)
    kinds = Counter("removed" if v is None else "renamed" for v in rename.values())
    logger.info(
        "surgery: %d tensors renamed, %d dropped, %.1f MB written",
        kinds["renamed"],
        kinds["removed"],
        written / 1e6,
    )
    return notes


def model_card(plan: LayerPlan, base_model: str, notes: list[str], recipe_text: str | None) -> str:
    rows = "\n".join(f"| {i} | {plan.reasons.get(i, '')} |" for i in plan.remove)
    changes = "\n".join(f"- {n}" for n in notes)
    recipe = f"\n## Recipe\n\n```yaml\n{recipe_text.rstrip()}\n```\n" if recipe_text else ""
    return f"""---
base_model: {base_model}
tags: [shortgpt, layer-pruning, shortgpt-deploy]
---

# {Path(base_model).name or base_model} with {len(plan.remove)} layers removed

Depth-pruned with shortgpt-deploy (ShortGPT, Men et al., 2024): {plan.summary()}.
Kept layers (old indices, in order): {list(plan.keep)}.

| removed layer | why |
|---|---|
{rows}

## config.json changes

{changes}
{recipe}"""
