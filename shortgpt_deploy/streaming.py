"""Layer-streamed scoring: the one-pass metrics of a model larger than memory, one decoder layer at a time.

The in-memory scorer (importance.collect_stats) runs the whole model once per batch. Here the order is turned
around: the calibration tokens are embedded once, then each decoder layer in turn is read from the
safetensors files (in the recipe's dtype, onto the scoring device), every batch's hidden states go through it,
its statistics are folded in exactly as importance._Collector folds them, and it is freed. Peak memory is one
layer and the calibration hidden states (in RAM, or a scratch file when they do not fit); the embedding table
is freed once the tokens are embedded.

What each layer is called with besides its input (the attention mask of its attention type, the rotary
position embeddings, position ids) is recorded by one forward of the model's own body with every decoder
layer's forward swapped for a recorder: the body builds masks and rotary tables exactly as it does for a full
forward, so the streamed scores equal the in-memory ones (tests/test_streaming.py, every tiny family).

Each layer's checkpoint tensors become its parameters through transformers' own load-time conversions
(conversion_mapping.get_model_conversion_mapping, applied by core_model_loading as from_pretrained applies them):
MoE checkpoints store one tensor per expert that the model fuses (experts.N.w1/w3 -> experts.gate_up_proj) and
routers under other names, so only that replay, not reading the layer's own names, fills a MoE layer.

Weights are read with plain file reads at the offsets of the safetensors header rather than through a memory
map: mapped pages of a 26 GB file would stay resident (and count in the process's RSS) until unmapped.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .checkpoint import detect_layer_prefix, is_quantized, read_config, read_safetensors_header, text_config
from .errors import ModelLoadError, PlanError, UnsupportedArchitectureError

if TYPE_CHECKING:
    from .calibration import CalibrationSet
    from .importance import LayerScores, LayerStats
    from .recipe import PruneSpec

logger = logging.getLogger(__name__)

# The in-memory path's peak RSS is this many times the weights (2.16 measured on SmolLM2: transformers' load
# holds a copy while it converts); below it the whole model is loaded, above it the layers are streamed.
IN_MEMORY_PEAK_FACTOR = 2.2
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
STREAMABLE_METRICS = ("bi", "relative_magnitude", "angular", "sequential", "reverse")
# The families whose streamed scores were shown equal to the in-memory ones (tests/test_streaming.py, every tiny
# family): dense, MoE (their experts fused and routers renamed at load time by transformers' own conversions,
# replayed per layer by _load_layer) and state-space/hybrid ones.
STREAMED_FAMILIES = (
    "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3",
    "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "olmoe",
    "mamba", "mamba2", "bamba", "granitemoehybrid",
)  # fmt: skip


# -------------------------------------------------------------------------------------------------- choice
@dataclass(frozen=True)
class TensorEntry:
    shard: Path
    start: int  # absolute byte offset in the file
    end: int
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]


def tensor_index(folder: Path) -> dict[str, TensorEntry]:
    """Every tensor of the checkpoint: name → where its bytes are (headers only; no tensor is read)."""
    from .checkpoint import weight_files

    index: dict[str, TensorEntry] = {}
    for shard in weight_files(folder)[0]:
        header, data_start = read_safetensors_header(shard)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            index[name] = TensorEntry(shard, data_start + begin, data_start + end, info["dtype"], tuple(info["shape"]))
    return index


def weights_bytes(folder: Path, dtype: str) -> int:
    """Bytes the checkpoint's floating-point weights take once cast to `dtype` (what the scorer holds)."""
    size = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    total = 0
    for e in tensor_index(folder).values():
        numel = 1
        for d in e.shape:
            numel *= d
        total += numel * size if SAFETENSORS_DTYPES.get(e.dtype, torch.uint8).is_floating_point else e.end - e.start
    return total


def scoring_device() -> torch.device:
    """Where streamed layers run: the GPU when there is one (a layer at a time fits a card the model does not)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def refusal(folder: Path, prune: PruneSpec) -> str | None:
    """Why `prune`'s scoring of `folder` cannot be streamed, or None when it can."""
    from .gen import is_gen_checkpoint

    if is_quantized(folder, "gptq"):
        return (
            "a GPTQ checkpoint's layers are packed 4-bit weights that only GPTQModel dequantizes, and it loads the "
            "whole model to do so; it is about a quarter of the float model's size, so score it in memory "
            "(stream: off), or stream the float checkpoint it was quantized from"
        )
    if is_quantized(folder):
        return "a quantized checkpoint's layers are not float tensors; score it in memory (stream: off)"
    mtype = str(read_config(folder).get("model_type"))
    if mtype not in STREAMED_FAMILIES:
        return (
            f"layer-streamed scoring is built and tested for {', '.join(STREAMED_FAMILIES)}, not {mtype}; score "
            "it in memory (stream: off)"
        )
    if is_gen_checkpoint(folder):
        return "a ShortGPT-gen checkpoint changes how its skipped layers run; score its dense source instead"
    if prune.metric not in STREAMABLE_METRICS:
        return f"{prune.metric} re-runs the whole model after each removal; streaming serves the one-pass metrics"
    if prune.iterative:
        return "iterative re-scoring re-runs the whole model after each removal; streaming serves one pass"
    if prune.budget is not None:
        return "prune.budget measures perplexity with the whole model loaded"
    return None


def should_stream(folder: Path, dtype: str, prune: PruneSpec) -> bool:
    """Whether to score layer by layer: `prune.stream` on/off, or (auto) when the weights do not fit in memory."""
    from .runtime import available_memory_bytes

    why_not = refusal(folder, prune)
    if prune.stream == "off":
        return False
    if prune.stream == "on":
        if why_not:
            raise PlanError(f"cannot stream the scoring of {folder}: {why_not}")
        logger.info("scoring layer by layer (stream: on)")
        return True
    device = scoring_device()
    need = int(weights_bytes(folder, dtype) * IN_MEMORY_PEAK_FACTOR)
    have = available_memory_bytes(device)
    gib = 2**30
    if need <= have:
        logger.info(
            "scoring in memory: the %s weights need about %.1f GiB to load, %.1f GiB is available on %s",
            dtype, need / gib, have / gib, device.type,
        )  # fmt: skip
        return False
    if why_not:
        logger.warning(
            "the weights need about %.1f GiB to load and %.1f GiB is available, but streaming is not possible "
            "(%s): loading the whole model anyway",
            need / gib, have / gib, why_not,
        )  # fmt: skip
        return False
    logger.info(
        "scoring layer by layer: the %s weights need about %.1f GiB to load in memory, only %.1f GiB is available "
        "on %s", dtype, need / gib, have / gib, device.type,
    )  # fmt: skip
    return True


# ------------------------------------------------------------------------------------------------ loading
class _Reader:
    """Reads named tensors from the shards by byte offset, cast to `dtype` on `device`."""

    def __init__(self, index: dict[str, TensorEntry], dtype: torch.dtype, device: torch.device):
        self.index, self.dtype, self.device = index, dtype, device

    def read(self, name: str) -> torch.Tensor:
        e = self.index.get(name)
        if e is None:
            raise ModelLoadError(f"tensor {name} is not in the checkpoint; is it a sharded folder with a stale index?")
        raw = torch.empty(e.end - e.start, dtype=torch.uint8)
        with e.shard.open("rb") as f:
            f.seek(e.start)
            if f.readinto(memoryview(raw.numpy())) != e.end - e.start:
                raise ModelLoadError(f"{e.shard} ended inside tensor {name}; re-download or re-save the checkpoint")
        if e.dtype not in SAFETENSORS_DTYPES:
            raise UnsupportedArchitectureError(f"tensor {name} has dtype {e.dtype}, which streaming cannot read")
        t = raw.view(SAFETENSORS_DTYPES[e.dtype]).reshape(e.shape)
        target = self.dtype if t.is_floating_point() else t.dtype
        return t.to(device=self.device, dtype=target)

    def load(self, module: torch.nn.Module, prefix: str) -> None:
        """Fill `module` (parameters and persistent buffers) from the tensors named `prefix` + its keys."""
        keys = list(module.state_dict(keep_vars=True))
        state = {k: self.read(prefix + k) for k in keys}
        module.load_state_dict(state, strict=True, assign=True)

    def layer_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every checkpoint tensor whose name starts with `prefix` (one layer's), by its checkpoint name."""
        return {name: self.read(name) for name in self.index if name.startswith(prefix)}


def _load_layer(sk: _Skeleton, i: int, reader: _Reader) -> None:
    """Fill the materialized layer i from its checkpoint tensors through transformers' own load-time conversions
    (get_model_conversion_mapping: MoE experts fused into gate_up_proj, routers renamed, ...), as from_pretrained
    applies them; only layer i's tensors are read."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig
    from transformers.utils import logging as hf_logging

    config = LoadStateDictConfig(
        dtype=reader.dtype, device_map={"": reader.device}, weight_mapping=get_model_conversion_mapping(sk.model)
    )
    state = reader.layer_tensors(f"{sk.layer_prefix}{i}.")
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its "Loading weights" bar would print once per layer
    try:
        info, _ = convert_and_load_state_dict_in_model(sk.model, state, config)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    own = f"{sk.layer_names[i]}."
    missing = sorted(k for k in info.missing_keys if k.startswith(own))
    wrong = sorted(str(k) for k in info.mismatched_keys) + [str(e) for e in info.conversion_errors.values()]
    if missing or wrong:
        raise ModelLoadError(
            f"layer {i} of the checkpoint does not fill {type(sk.layers[i]).__name__}: missing "
            f"{', '.join(missing) or 'none'}; mismatched or failed {', '.join(wrong) or 'none'}; is the folder's "
            "config the one its weights were saved with? Else score it in memory (stream: off)"
        )
    if info.unexpected_keys:  # as from_pretrained, tensors the layer has no place for (old rotary inv_freq) are left
        logger.debug("layer %d: checkpoint tensors not used: %s", i, ", ".join(sorted(info.unexpected_keys)))


@dataclass
class _Skeleton:
    body: torch.nn.Module  # the decoder body: real embeddings, rotary tables and norm; meta layers
    layers: torch.nn.ModuleList
    layer_prefix: str  # checkpoint tensor names of layer i start with layer_prefix + f"{i}."
    model: torch.nn.Module  # the meta causal LM sharing `layers`: what transformers' conversions load into
    layer_names: list[str]  # layer i's name in `model` ("model.layers.3")


def _skeleton(folder: Path, reader: _Reader) -> _Skeleton:
    """The model's decoder body without weights in its layers (meta tensors), the rest loaded from `folder`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .modeling import DECODER_LAYERS

    config = AutoConfig.from_pretrained(folder)
    mtype = str(config.model_type)
    if mtype not in DECODER_LAYERS:
        raise UnsupportedArchitectureError(
            f"architecture {mtype!r} is not supported for scoring; supported: {', '.join(sorted(DECODER_LAYERS))}"
        )
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, dtype=reader.dtype)
    meta_body = meta.get_decoder()
    layers = meta_body.layers if isinstance(getattr(meta_body, "layers", None), torch.nn.ModuleList) else None
    num_layers = int(text_config(read_config(folder))["num_hidden_layers"])
    if layers is None or len(layers) != num_layers:
        raise UnsupportedArchitectureError(
            f"{type(meta_body).__name__} keeps no `layers` list of its {num_layers} decoder layers; streaming cannot "
            "run it layer by layer: score it in memory (stream: off)"
        )
    # The body without layers, built for real: embeddings, norm, and the buffers no checkpoint holds (rotary
    # tables, Gemma's embedding scale) come out of the model's own constructor.
    cfg = copy.deepcopy(meta_body.config)
    cfg.num_hidden_layers = 0
    with torch.device(reader.device):
        body = type(meta_body)._from_config(cfg, dtype=reader.dtype)
    cfg.num_hidden_layers = num_layers
    body.eval()
    layer_prefix = detect_layer_prefix(list(reader.index), num_layers)
    own = DECODER_LAYERS[mtype].rsplit(".", 1)[-1] + "."  # "layers."
    if not layer_prefix.endswith(own):
        raise UnsupportedArchitectureError(f"checkpoint layer tensors are named {layer_prefix}N.*, not *{own}N.*")
    reader.load(body, layer_prefix[: -len(own)])
    body.layers = layers
    for layer in layers:
        own_buffers = {k for k, _ in layer.named_buffers()} - set(layer.state_dict())
        if own_buffers:
            raise UnsupportedArchitectureError(
                f"{type(layer).__name__} keeps buffers no checkpoint holds ({', '.join(sorted(own_buffers))}); "
                "streaming cannot rebuild them: score it in memory (stream: off)"
            )
    names = {id(m): name for name, m in meta.named_modules()}
    return _Skeleton(body, layers, layer_prefix, meta, [names[id(layer)] for layer in layers])


# ------------------------------------------------------------------------------------------ hidden states
class _Scratch:
    """Tensors in RAM, or in one memory-mapped scratch file when they would not fit there."""

    def __init__(self, nbytes: int, device: torch.device, stack: ExitStack):
        from .runtime import available_memory_bytes

        self.device = device
        self.path: Path | None = None
        if device.type == "cpu" and nbytes > available_memory_bytes(device) // 2:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="shortgpt-stream-")))
            self.path = folder / "hidden.bin"
            self._file = torch.from_file(str(self.path), shared=True, size=max(nbytes, 1), dtype=torch.uint8)
            self._used = 0
            logger.info("calibration hidden states (%.1f GiB) go to a scratch file %s", nbytes / 2**30, self.path)

    def new(self, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or like.dtype
        if self.path is None:
            return torch.empty(like.shape, dtype=dtype, device=self.device)
        n = like.numel() * torch.empty((), dtype=dtype).element_size()
        t = self._file[self._used : self._used + n].view(dtype).view(like.shape)
        self._used += n
        return t


def _record_calls(sk: _Skeleton, calibration: CalibrationSet, device: torch.device) -> tuple[list, list]:
    """For every batch: layer 0's input (the embedded tokens) and, per layer, the arguments besides it."""
    calls: list[list[tuple[tuple, dict]]] = []
    embedded: list[torch.Tensor] = []
    current: list[tuple[tuple, dict]] = []
    first: list[torch.Tensor] = []
    as_pair = False

    def recorder(layer: torch.nn.Module) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if not current:
                first.append(hidden)
            current.append((args[1:], kwargs))
            # what the next layer sees is not used, only its arguments are; but the body may unpack what a layer
            # returns (Bamba's `hidden_states, attn_weights = decoder_layer(...)`)
            return (hidden, None) if as_pair else hidden

        return forward

    for layer in sk.layers:
        layer.forward = recorder(layer)
    try:
        for batch in calibration.batches:
            current, first = [], []
            inputs = {"input_ids": batch.input_ids.to(device), "attention_mask": batch.attention_mask.to(device)}
            try:
                sk.body(**inputs, use_cache=False)
            except (TypeError, ValueError) as e:
                if as_pair or "unpack" not in str(e):
                    raise
                as_pair, current, first = True, [], []  # the body unpacks (hidden, attention weights)
                sk.body(**inputs, use_cache=False)
            if len(current) != len(sk.layers):
                raise UnsupportedArchitectureError(
                    f"{type(sk.body).__name__} called {len(current)} of its {len(sk.layers)} layers in one forward; "
                    "streaming cannot replay it: score it in memory (stream: off)"
                )
            calls.append(current)
            embedded.append(first[0])
    finally:
        for layer in sk.layers:
            del layer.forward
    return embedded, calls


# ------------------------------------------------------------------------------------------------- scoring
def stream_stats(
    folder: Path, calibration: CalibrationSet, *, dtype: str, pairs: bool = False, progress: bool = True
) -> LayerStats:
    """importance.collect_stats, one decoder layer in memory at a time (see the module docstring)."""
    from .importance import LayerStats, _unit, token_cosine, token_relative_magnitude
    from .runtime import tqdm

    device = scoring_device()
    reader = _Reader(tensor_index(folder), getattr(torch, dtype), device)
    with ExitStack() as stack, torch.no_grad():  # no_grad: inference tensors cannot become Parameters
        sk = _skeleton(folder, reader)
        n = len(sk.layers)
        stats = LayerStats(num_layers=n, cos_sum=[0.0] * n, relmag_sum=[0.0] * n)
        if pairs:
            stats.pair_angle_sum = [[0.0] * (n + 1) for _ in range(n + 1)]
        embedded, calls = _record_calls(sk, calibration, device)
        for child in sk.body.children():  # the embedding table and final norm are not needed again: free them
            if child is not sk.layers:
                child.to_empty(device="meta")
        masks = [b.attention_mask.to(device).bool() for b in calibration.batches]
        stats.num_tokens = sum(int(m.sum()) for m in masks)
        per_batch = sum(x.numel() for x in embedded) * 4  # float32 unit vectors for pairs
        need = sum(x.numel() * x.element_size() for x in embedded) + (per_batch * (n + 1) if pairs else 0)
        # room for the hidden states in float32 too: a layer may widen them (Mamba's residual_in_fp32)
        need += per_batch if any(x.element_size() < 4 for x in embedded) else 0
        scratch = _Scratch(need, device, stack)
        hidden = []
        for x in embedded:
            h = scratch.new(x)
            h.copy_(x)
            hidden.append(h)
        del embedded
        units: list[list[torch.Tensor]] = [[] for _ in hidden]  # [batch][boundary]
        if pairs:
            for b, h in enumerate(hidden):
                units[b].append(_stored(scratch, _unit(h)))
        for i in tqdm(range(n), desc="layers (streamed)", unit="layer", disable=not progress):
            layer = sk.layers[i]
            layer.to_empty(device=device)
            _load_layer(sk, i, reader)
            for b, h in enumerate(hidden):
                args, kwargs = calls[b][i]
                out = layer(h, *args, **kwargs)
                x_out = out[0] if isinstance(out, tuple) else out
                mask = masks[b]
                stats.cos_sum[i] += float(token_cosine(h, x_out).double()[mask].sum())
                stats.relmag_sum[i] += float(token_relative_magnitude(h, x_out).double()[mask].sum())
                if pairs:
                    _fold_pairs(stats, units[b], _stored(scratch, _unit(x_out)), mask)
                if x_out.dtype == h.dtype:
                    h.copy_(x_out)
                else:  # the layer widened the residual stream (Mamba's residual_in_fp32): keep it wide, as in memory
                    hidden[b] = _stored(scratch, x_out)
            layer.to_empty(device="meta")  # frees this layer's weights
    return stats


def _stored(scratch: _Scratch, x: torch.Tensor) -> torch.Tensor:
    t = scratch.new(x)
    t.copy_(x)
    return t


def _fold_pairs(stats: LayerStats, units: list[torch.Tensor], new: torch.Tensor, mask: torch.Tensor) -> None:
    """Angular distance of the new boundary j to every earlier one i < j, as importance._Collector.fold_pairs."""
    assert stats.pair_angle_sum is not None
    j = len(units)
    for i, u in enumerate(units):
        angle = torch.arccos((u * new).sum(-1).clamp(-1.0, 1.0)) / torch.pi
        stats.pair_angle_sum[i][j] += float(angle.double()[mask].sum())
    units.append(new)


def score_streamed(
    folder: Path,
    calibration: CalibrationSet,
    *,
    metric: str = "bi",
    dtype: str = "float32",
    model_name: str = "",
    progress: bool = True,
) -> LayerScores:
    """importance.score_layers with the layers streamed from `folder` (a float safetensors checkpoint)."""
    from .checkpoint import read_config_layers
    from .importance import scores_from_pass

    return scores_from_pass(
        lambda pairs: stream_stats(folder, calibration, dtype=dtype, pairs=pairs, progress=progress),
        read_config_layers(folder),
        calibration,
        metric=metric,
        model_name=model_name,
    )
