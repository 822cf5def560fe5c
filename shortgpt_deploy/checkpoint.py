"""Low level: reading a checkpoint folder's config and safetensors headers (validated), and writing an output
folder as one transaction (temporary folder beside the target, renamed into place only when complete).

A damaged input must fail here, with the file and the problem named, before anything is written: a truncated
shard would otherwise copy short, and a missing tensor would be filled by transformers with random weights.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import math
import os
import re
import shutil
import struct
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

from .errors import CheckpointError, ModelLoadError, OutputExistsError, OutputWriteError, UnsupportedArchitectureError

# Config fields that hold one entry per layer (lists, or a string with one character per layer).
PER_LAYER_FIELDS = (
    "layer_types",
    "no_rope_layers",
    "activation_sparsity_pattern",
    "hybrid_override_pattern",
    "mlp_layer_types",  # MoE: per-layer dense/sparse (the spelling newer transformers configs use)
)
# Fields that list layer indices.
LAYER_INDEX_FIELDS = (
    "mlp_only_layers",
    "moe_layers",
    "attn_layer_indices",  # Bamba: the attention layers of a Mamba2 hybrid (its layers_block_type derives from it)
)
# Lists that are one setting, not one entry per layer, whatever their length (a 2-layer Mamba2 has 2 of each).
FIXED_LIST_FIELDS = ("time_step_limit",)  # Mamba2 / Bamba / GraniteMoeHybrid: (min, max) of the SSM time step
# Fields "layers below this index are special": the new value counts the kept layers below the old one.
LAYER_THRESHOLD_FIELDS = ("max_window_layers", "first_k_dense_replace")

# MoE and hybrid layouts placed by a period: period field → the field of its offset (None: no offset). Layer i
# is "on" (sparse MLP, or attention for Jamba) as the modeling code of transformers 5.19 and vLLM 0.32 has it:
#   decoder_sparse_step (Qwen2/3-MoE)       (i + 1) % step == 0, and i not in mlp_only_layers
#   interleave_moe_layer_step (Llama 4)     (i + 1) % step == 0, unless moe_layers lists them
#   moe_layer_freq (DeepSeek; vLLM only)    i % freq == 0, and i >= first_k_dense_replace
#   attn/expert_layer_period (Jamba)        i % period == offset
LAYER_PERIOD_FIELDS: dict[str, str | None] = {
    "decoder_sparse_step": None,
    "interleave_moe_layer_step": None,
    "moe_layer_freq": None,
    "attn_layer_period": "attn_layer_offset",
    "expert_layer_period": "expert_layer_offset",
}
PERIOD_DEFAULT_OFFSETS = {"attn_layer_offset": 4, "expert_layer_offset": 1}  # JambaConfig's, if the file has none


def on_period(field: str, i: int, period: int, offset: int = 0) -> bool:
    """Whether the period field `field` (one of LAYER_PERIOD_FIELDS) alone turns layer i on."""
    if field in ("decoder_sparse_step", "interleave_moe_layer_step"):
        return (i + 1) % period == 0
    if field == "moe_layer_freq":
        return i % period == 0
    return i % period == offset


def period_settings(cfg: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(period, offset) of every period field `cfg` sets to a positive integer."""
    out = {}
    for field, offset_field in LAYER_PERIOD_FIELDS.items():
        period = cfg.get(field)
        if isinstance(period, int) and not isinstance(period, bool) and period >= 1:
            offset = cfg.get(offset_field, PERIOD_DEFAULT_OFFSETS.get(offset_field, 0)) if offset_field else 0
            out[field] = (period, offset if isinstance(offset, int) else 0)
    return out


# Bytes per element of the safetensors dtypes (sub-byte ones such as F4 are not checked by size).
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
# The safetensors library refuses headers above 100 MB; a larger length prefix is garbage, not a header.
MAX_HEADER_BYTES = 100_000_000

# The files of a checkpoint folder that every stage writing one knows by name.
WEIGHTS_INDEX = "model.safetensors.index.json"
PLAN_FILE = "shortgpt_plan.json"  # the plan travels with the checkpoint it produced
# Files that are weights in another format: never copied (they would still hold the removed layers).
OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


# ------------------------------------------------------------------------------------------------ config
def read_json(path: Path) -> Any:
    """A JSON file of a checkpoint, or one error naming the file and where it stops being JSON."""
    try:
        return json.loads(Path(path).read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); restore it from the original checkpoint") from None


def read_config(folder: Path) -> dict[str, Any]:
    """config.json of a checkpoint folder, checked to be a JSON object."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder} is not a model folder (no config.json)")
    config = read_json(path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a JSON object; restore it from the original checkpoint")
    return config


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The (sub)dict that holds num_hidden_layers: the config itself, or text_config of a multimodal model."""
    if "num_hidden_layers" in config:
        return config
    sub = config.get("text_config")
    if isinstance(sub, dict) and "num_hidden_layers" in sub:
        return sub
    raise UnsupportedArchitectureError("config.json has no num_hidden_layers (nor text_config.num_hidden_layers)")


def read_config_layers(folder: Path) -> int:
    """num_hidden_layers of a checkpoint folder, without loading the model."""
    n = text_config(read_config(folder))["num_hidden_layers"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise CheckpointError(f"{Path(folder) / 'config.json'}: num_hidden_layers is {n!r}, not a positive integer")
    return n


def is_quantized(folder: Path, method: str | None = None) -> bool:
    """Whether config.json of `folder` has a quantization_config (of `quant_method` `method`, e.g. "gptq", when
    given). A folder without a readable config.json is not quantized: loading it fails later, with that error."""
    try:
        config = read_config(folder)
    except (OSError, ModelLoadError):  # CheckpointError is a ModelLoadError
        return False
    quant = config.get("quantization_config")
    if quant is None:
        return False
    return method is None or (isinstance(quant, dict) and quant.get("quant_method") == method)


# ------------------------------------------------------------------------------------------- safetensors
def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """Return (header, byte offset where tensor data starts), after checking the whole file against it.

    Checked once per file, before any byte is copied: the length prefix fits the file, the header is a JSON
    object of well-formed entries, each entry's byte range matches its dtype and shape, and the ranges tile
    the data section exactly up to the end of the file (what the safetensors library itself demands).
    """
    path = Path(path)
    if not path.is_file():  # e.g. a shard the index lists but the download lost
        raise CheckpointError(f"{path} is missing; re-download or re-save the checkpoint")
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _damaged(path, f"{size} bytes, too short for the 8-byte header length")
        (n,) = struct.unpack("<Q", prefix)
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise _damaged(path, f"header length prefix says {n} bytes but the file has {size}: garbage or truncated")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _damaged(path, f"header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise _damaged(path, "header is not a JSON object")
    _check_data_section(path, header, size - 8 - n)
    return header, 8 + n


def _check_data_section(path: Path, header: dict[str, Any], data_bytes: int) -> None:
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(x, int) for x in offsets)
            or not 0 <= offsets[0] <= offsets[1]
            or not isinstance(shape, list)
            or not all(isinstance(x, int) and x >= 0 for x in shape)
        ):
            raise _damaged(path, f"header entry {name} is malformed ({info!r:.80})")
        width = DTYPE_BYTES.get(info.get("dtype"))
        if width is not None and offsets[1] - offsets[0] != width * math.prod(shape):
            raise _damaged(path, f"tensor {name} has {offsets[1] - offsets[0]} bytes for {info['dtype']} {shape}")
        spans.append((offsets[0], offsets[1], name))
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            raise _damaged(path, f"tensor {name} starts at byte {begin} of the data, expected {pos} (overlap or gap)")
        pos = end
    if pos > data_bytes:
        raise _damaged(path, f"truncated: the header needs {pos} bytes of tensor data, the file holds {data_bytes}")
    if pos < data_bytes:
        raise _damaged(path, f"{data_bytes - pos} bytes after the last tensor the header lists")


def _damaged(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a valid safetensors file: {problem}; re-download or re-save the checkpoint")


# ------------------------------------------------------------------------------------------ layer tensors
def weight_files(src: Path) -> tuple[list[Path], dict[str, Any] | None]:
    index_path = src / WEIGHTS_INDEX
    if index_path.is_file():
        index = read_json(index_path)
        return sorted({src / f for f in index["weight_map"].values()}), index
    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        other = [p.name for p in src.iterdir() if p.suffix in OTHER_WEIGHTS]
        hint = (
            f" (found {', '.join(other)}: convert to safetensors first, e.g. load and save_pretrained)" if other else ""
        )
        raise ModelLoadError(f"{src} has no .safetensors weights{hint}")
    return shards, None


def read_layer_tensors(src: Path, num_layers: int) -> tuple[dict[Path, dict[str, Any]], str]:
    """Every shard's tensor entries (name → dtype, shape, offsets; metadata dropped) and the decoder-layer prefix.

    Surgery, quantization and FLOP counting all need both; the headers are read once, without loading tensors.
    """
    shards, _ = weight_files(src)
    headers = {s: {n: v for n, v in read_safetensors_header(s)[0].items() if n != "__metadata__"} for s in shards}
    prefix = detect_layer_prefix([n for h in headers.values() for n in h], num_layers)
    return headers, prefix


def detect_layer_prefix(names: list[str], num_layers: int) -> str:
    """The tensor-name prefix of the decoder layers, e.g. `model.layers.`: the one numbered exactly 0..L-1."""
    seen: dict[str, set[int]] = defaultdict(set)
    for name in names:
        for m in re.finditer(r"(?:^|\.)(\d+)\.", name):
            seen[name[: m.start(1)]].add(int(m.group(1)))
    matches = [p for p, idx in seen.items() if idx == set(range(num_layers))]
    if len(matches) != 1:
        raise UnsupportedArchitectureError(
            f"cannot tell which tensors belong to the {num_layers} decoder layers (candidates: {matches or 'none'})"
        )
    return matches[0]


def copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer files, chat template, generation_config, licences: everything that is not weights or config."""
    for p in sorted(src.iterdir()):
        if (
            p.is_file()
            and p.suffix not in (".safetensors", *OTHER_WEIGHTS)
            and p.name
            not in (
                "config.json",
                WEIGHTS_INDEX,
                "README.md",
                PLAN_FILE,
            )
        ):
            shutil.copy2(p, dst / p.name)


def layer_kinds(config: dict[str, Any]) -> list[tuple[Any, ...]]:
    """A key per decoder layer: layers with the same key must hold the same tensors (same names and shapes).

    What tells layers apart is whatever config.json says per layer: per-layer lists and strings (layer_types,
    hybrid patterns, widths per layer), index lists (mlp_only_layers), thresholds (first_k_dense_replace) and
    periods (decoder_sparse_step).
    """
    cfg = text_config(config)
    n = cfg["num_hidden_layers"]
    kinds: list[tuple[Any, ...]] = [() for _ in range(n)]
    settings = period_settings(cfg)
    for key, value in sorted(cfg.items()):
        if key in LAYER_INDEX_FIELDS and isinstance(value, list):
            members = set(value)
            per_layer: list[Any] = [i in members for i in range(n)]
        elif key in LAYER_THRESHOLD_FIELDS and isinstance(value, int):
            per_layer = [i < value for i in range(n)]
        elif key in FIXED_LIST_FIELDS:
            continue
        elif key in settings:
            per_layer = [on_period(key, i, *settings[key]) for i in range(n)]
        elif isinstance(value, list | str) and len(value) == n and (key in PER_LAYER_FIELDS or isinstance(value, list)):
            per_layer = [json.dumps(v, sort_keys=True) for v in value]
        else:
            continue
        kinds = [(*k, v) for k, v in zip(kinds, per_layer, strict=True)]
    return kinds


def check_layer_tensors(
    folder: Path, headers: dict[Path, dict[str, Any]], prefix: str, config: dict[str, Any], keep: list[int]
) -> None:
    """Refuse a checkpoint where a kept layer lacks a tensor its siblings have, or holds one of another shape.

    Siblings are the layers of the same kind (see layer_kinds); the expected shape of a tensor is the one
    most of them have. Without this, transformers loads the pruned checkpoint and initialises the gap randomly.
    """
    layers: dict[int, dict[str, list[int]]] = defaultdict(dict)
    for header in headers.values():
        for name, info in header.items():
            if name.startswith(prefix):
                index, _, rest = name[len(prefix) :].partition(".")
                if index.isdigit():
                    layers[int(index)][rest] = info["shape"]
    kinds = layer_kinds(config)
    groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
    for i, kind in enumerate(kinds):
        groups[kind].append(i)
    problems = []
    for members in groups.values():
        shapes: dict[str, Counter[str]] = defaultdict(Counter)
        for i in members:
            for rest, shape in layers[i].items():
                shapes[rest][json.dumps(shape)] += 1
        for i in sorted(set(members) & set(keep)):
            for rest, counts in sorted(shapes.items()):
                expected = counts.most_common(1)[0][0]
                if rest not in layers[i]:
                    problems.append(f"{prefix}{i}.{rest} is missing (its sibling layers have it)")
                elif json.dumps(layers[i][rest]) != expected:
                    problems.append(f"{prefix}{i}.{rest} has shape {layers[i][rest]}, its sibling layers {expected}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(
            f"{folder} is damaged: {'; '.join(problems[:3])}{more}; re-download or re-save the checkpoint"
        )


# ----------------------------------------------------------------------------------- the output transaction
@contextlib.contextmanager
def output_transaction(out_dir: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `out_dir`; rename it into place when the block completes.

    On any failure the temporary folder is removed and an existing output is untouched. The final rename never
    replaces what appeared at `out_dir` meanwhile (another command writing the same output) unless `force`.
    A full disk becomes one OutputWriteError naming the output.
    """
    tmp = begin_output(out_dir, force=force)
    try:
        yield tmp
        finish_output(tmp, out_dir, force=force)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if (full := disk_full(err, out_dir)) is not None:
            raise full from None
        raise


def disk_full(err: BaseException, out_dir: Path) -> OutputWriteError | None:
    """The project error for a write that failed for lack of space (None for any other error)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputWriteError(
            f"no space left on the device while writing {out_dir}; free some space or choose another output "
            "folder (nothing was written)"
        )
    return None


def begin_output(out_dir: Path, *, force: bool) -> Path:
    """Refuse an output that exists (unless forced) or is not a folder; return a new empty temporary folder.

    (Use output_transaction, which pairs it with finish_output and cleans up on failure.)
    """
    out_dir = Path(out_dir)
    if (out_dir.exists() or out_dir.is_symlink()) and not out_dir.is_dir():
        raise OutputExistsError(f"{out_dir} exists and is not a folder; remove it or choose another output folder")
    if out_dir.exists() and not force:
        raise OutputExistsError(
            f"output folder {out_dir} already exists; choose another, or pass --force to replace it"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-{os.getpid()}-", dir=out_dir.parent))


def finish_output(tmp: Path, out_dir: Path, *, force: bool) -> None:
    """Move a completed temporary folder into place; replace what is there only when forced."""
    out_dir = Path(out_dir)
    try:
        rename_noreplace(tmp, out_dir)
        return
    except FileExistsError:
        if not force:
            raise OutputExistsError(
                f"{out_dir} appeared while this command was writing it (another command writing the same output?); "
                "it was left as it is and nothing of this run was kept: choose another output folder, or pass --force"
            ) from None
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-{os.getpid()}-", dir=out_dir.parent))
    os.rename(out_dir, old / "x")  # inside a fresh folder: a file or folder moves there alike
    try:
        os.rename(tmp, out_dir)
    except OSError:
        with contextlib.suppress(OSError):
            os.rename(old / "x", out_dir)  # put the old output back
            os.rmdir(old)
        raise
    shutil.rmtree(old)


# Linux renameat2(2): RENAME_NOREPLACE fails with EEXIST when the target exists, atomically.
AT_FDCWD = -100
RENAME_NOREPLACE = 1


@cache
def _renameat2() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not glibc/Linux, or a glibc older than 2.28
        return None


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename the folder `src` to `dst`; FileExistsError if `dst` exists, however recently it appeared.

    renameat2(RENAME_NOREPLACE) where the kernel and filesystem have it; elsewhere mkdir(dst) claims the
    name atomically and the rename then replaces that empty folder (POSIX rename replaces an empty directory).
    """
    fn = _renameat2()
    if fn is not None:
        if fn(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # unsupported here: fall back below
            raise OSError(code, os.strerror(code), str(src), None, str(dst))
    os.mkdir(dst)  # FileExistsError if anything is there
    try:
        os.rename(src, dst)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.rmdir(dst)  # only our empty placeholder; a folder someone filled meanwhile is theirs
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        raise
