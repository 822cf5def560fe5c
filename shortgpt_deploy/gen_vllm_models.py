"""vLLM model classes for ShortGPT-gen checkpoints (see gen_vllm for the contract). Imports vLLM.

Which tokens are prefill: every attention backend's metadata carries `query_start_loc` (request r's new tokens
are rows query_start_loc[r]:query_start_loc[r+1] of this step's flattened batch; for the CPU backend
vllm/v1/attention/backends/cpu_attn.py, CPUAttentionMetadata). A request with more than one new token is
processing a prompt (chunk); with one, it decodes. The CPU runner does not reorder decodes first, so the rows are
found per request rather than as a leading block.

How a listed ("skipped") layer runs, for the whole batch:
- no prefill rows (a decode-only step): the stock layer;
- only prefill rows: input norm, qkv projection, k_norm (Gemma3), rotary on keys, K/V written into the cache;
  no attention, o_proj or MLP at all; the stream passes through;
- both: K/V as above for all rows; attention, o_proj, post norms and MLP only on the decode rows. For the CPU
  backend the decode requests are handed to its kernel as a batch of their own (_attend_decode_rows); on any
  other backend attention runs for every row and the prefill rows' outputs are dropped.
What a skipped layer still computes for prefill rows beyond K/V: their queries (qkv_proj is one fused matrix, and
on the CPU its weight may be repacked for oneDNN, so the k/v columns cannot simply be sliced out).

torch.compile: vLLM's CPU platform traces the model once with Dynamo (CompilationMode.DYNAMO_TRACE_ONCE, no
guards) and hands the graph to Inductor, so a Python branch on the batch layout would be frozen at trace time.
The compiled graph is therefore the stock model's (a listed layer traces as its base class: `forward` checks
torch.compiler.is_compiling()), and it serves every decode-only step at the dense model's speed. A step with
prompt tokens sets the forward context's `skip_compiled` (vLLM's own switch, vllm/compilation/decorators.py,
used there for encoder inputs), so the model runs eagerly and the listed layers apply the rule above. Losing
Inductor's fusions costs such a step about 8% (BENCHMARKS.md, gen-prefill: SmolLM2's prefill 1.20x faster than
dense against 1.29x when the skipped layer was an opaque custom op inside the compiled graph, a design that made
every decoding step 14% slower instead). No --enforce-eager is needed.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from typing import Any

import torch
from torch import nn
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.layers.attention.attention import unified_kv_cache_update
from vllm.model_executor.models.gemma3 import Gemma3DecoderLayer, Gemma3ForCausalLM
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM

from .errors import ModelLoadError
from .gen_vllm import GenSpec, gen_architecture, served_gen_spec

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ the step
def _layer_metadata(layer_name: str) -> Any:
    metadata = get_forward_context().attn_metadata
    if isinstance(metadata, list):  # speculative decoding: [0] is the base model's
        metadata = metadata[0]
    if isinstance(metadata, dict):
        metadata = metadata.get(layer_name)
    return metadata


def prefill_rows(query_start_loc: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Bool mask over this step's `num_rows` token rows: True where the row's request has more than one new
    token (query_len = query_start_loc[r+1] - query_start_loc[r] > 1); False for decode rows and for padding
    rows past the last request."""
    starts = query_start_loc.to("cpu", torch.long)
    query_lens = starts[1:] - starts[:-1]
    per_row = torch.repeat_interleave(query_lens > 1, query_lens)
    mask = torch.zeros(num_rows, dtype=torch.bool)
    mask[: per_row.numel()] = per_row[:num_rows]
    return mask


def _attend_decode_rows(attn, q, k, v, metadata, decode: torch.Tensor) -> torch.Tensor | None:
    """Write K/V of every row into the cache, then attention for the decode rows only (num_decode x hidden);
    None (nothing written) where the backend is not the CPU one this knows how to call for a subset."""
    from vllm import _custom_ops as ops
    from vllm import envs
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl, CPUAttentionMetadata

    impl = attn.impl
    if not (isinstance(metadata, CPUAttentionMetadata) and type(impl) is CPUAttentionBackendImpl):
        return None
    if metadata.dynamic_causal is not None or metadata.encoder_cache is not None:
        return None
    heads, kv_heads, dim = impl.num_heads, impl.num_kv_heads, impl.head_size
    unified_kv_cache_update(k.view(-1, kv_heads, dim), v.view(-1, kv_heads, dim), attn.layer_name)
    if decode.numel() == 0:
        return q.new_empty(0, heads * dim)
    # The decode requests as a batch of their own: one query each, their own sequence lengths and blocks; the
    # kernel's work partition (scheduler metadata) is built for that batch as CPUAttentionMetadataBuilder does.
    starts = metadata.query_start_loc.to(torch.long)
    requests = torch.nonzero(starts[1:] - starts[:-1] == 1).squeeze(1)
    seq_lens = metadata.seq_lens.index_select(0, requests)
    query_start_loc = torch.arange(requests.numel() + 1, dtype=metadata.query_start_loc.dtype)
    scheduler = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=requests.numel(), num_heads=heads, num_kv_heads=kv_heads, head_dim=dim, seq_lens=seq_lens,
        dtype=q.dtype, query_start_loc=query_start_loc, causal=True, sliding_window_size=impl.sliding_window,
        isa=attn.isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, kv_cache_dtype=impl.kv_cache_dtype,
    )  # fmt: skip
    sub = dataclasses.replace(
        metadata, num_actual_tokens=requests.numel(), max_query_len=1, query_start_loc=query_start_loc,
        max_seq_len=int(seq_lens.max()), seq_lens=seq_lens, block_table=metadata.block_table.index_select(0, requests),
        slot_mapping=metadata.slot_mapping.index_select(0, decode), scheduler_metadata=scheduler, causal=True,
    )  # fmt: skip
    output = q.new_empty(decode.numel(), heads, dim)
    q_d = q.index_select(0, decode).view(-1, heads, dim)
    impl.forward(attn, q_d, k.index_select(0, decode).view(-1, kv_heads, dim),
                 v.index_select(0, decode).view(-1, kv_heads, dim), attn.kv_cache, sub, output)  # fmt: skip
    return output.view(decode.numel(), heads * dim)


# ------------------------------------------------------------------------------------------------ layers
class _SkippedLayer:
    """Mixed into a decoder layer class listed in skip_prefill_layers. The family hooks are `_qkv` (after the
    input norm) and `_finish` (o_proj to the layer's output, on decode rows)."""

    _gen_base: type[nn.Module]
    _gen_rotate_keys: bool

    def forward(self, positions, hidden_states, residual, **kwargs):
        if kwargs:  # no caller of the supported families passes any; refuse rather than drop them silently
            raise TypeError(f"unexpected decoder-layer arguments {sorted(kwargs)}")
        if torch.compiler.is_compiling():  # the compiled graph serves decode-only steps: the stock layer
            return self._gen_base.forward(self, positions, hidden_states, residual)
        return self.gen_forward(positions, hidden_states, residual)

    def gen_forward(self, positions, hidden_states, residual):
        attn = self.self_attn.attn
        metadata = _layer_metadata(attn.layer_name)
        if metadata is None:  # vLLM's warm-up and profiling runs
            return self._gen_base.forward(self, positions, hidden_states, residual)
        prefill = prefill_rows(metadata.query_start_loc, hidden_states.shape[0]).to(hidden_states.device)
        if not bool(prefill.any()):
            return self._gen_base.forward(self, positions, hidden_states, residual)
        if residual is None:
            stream, normed = hidden_states, self.input_layernorm(hidden_states)
        else:
            normed, stream = self.input_layernorm(hidden_states, residual)
        q, k, v = self._qkv(positions, normed, None if self._gen_rotate_keys else prefill)
        # Rows past the last request (padding, if the runner pads) are neither: they keep the pass-through.
        num_real = int(metadata.query_start_loc[-1])
        decode = torch.nonzero(~prefill[:num_real]).squeeze(1)
        # The pass-through in vLLM's fused-residual convention: (0, stream) adds up to the stream unchanged.
        out_hidden, out_residual = torch.zeros_like(stream), stream
        attn_output = _attend_decode_rows(attn, q, k, v, metadata, decode)
        if attn_output is None:  # a backend we cannot call for a subset: attention over every row
            attn_output = attn(q, k, v).index_select(0, decode)  # writes K/V of every row
        if decode.numel():
            h, r = self._finish(attn_output, stream.index_select(0, decode))
            out_hidden = out_hidden.index_copy(0, decode, h)
            out_residual = out_residual.index_copy(0, decode, r)
        return out_hidden, out_residual

    @staticmethod
    def _keep_unrotated(k: torch.Tensor, rotated: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        return rotated if rows is None else torch.where(rows.unsqueeze(1), k, rotated)


class _SkippedLlamaLayer(_SkippedLayer):
    def _qkv(self, positions, normed, unrotated_rows):
        sa = self.self_attn
        qkv, _ = sa.qkv_proj(normed)
        q, k, v = qkv.split([sa.q_size, sa.kv_size, sa.kv_size], dim=-1)
        raw_k = None if unrotated_rows is None else k.clone()  # the CPU rotary kernel rotates in place
        q, k_rot = sa.rotary_emb(positions, q, k)
        return q, (k_rot if raw_k is None else self._keep_unrotated(raw_k, k_rot, unrotated_rows)), v

    def _finish(self, attn_output, stream):
        out, _ = self.self_attn.o_proj(attn_output)
        h, r = self.post_attention_layernorm(out, stream)
        return self.mlp(h), r


class _SkippedGemma3Layer(_SkippedLayer):
    def _qkv(self, positions, normed, unrotated_rows):
        sa = self.self_attn
        qkv, _ = sa.qkv_proj(normed)
        q, k, v = qkv.split([sa.q_size, sa.kv_size, sa.kv_size], dim=-1)
        q = sa.q_norm(q.unflatten(-1, (sa.num_heads, sa.head_dim))).flatten(-2, -1)
        k = sa.k_norm(k.unflatten(-1, (sa.num_kv_heads, sa.head_dim))).flatten(-2, -1)
        raw_k = None if unrotated_rows is None else k.clone()
        q, k_rot = sa.rotary_emb(positions, q, k)
        return q, (k_rot if raw_k is None else self._keep_unrotated(raw_k, k_rot, unrotated_rows)), v

    def _finish(self, attn_output, stream):
        out, _ = self.self_attn.o_proj(attn_output)
        out = self.post_attention_layernorm(out)
        h, r = self.pre_feedforward_layernorm(out, stream)
        return self.post_feedforward_layernorm(self.mlp(h)), r


_SKIPPED_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def _skipped_class(base: type[nn.Module], mixin: type[_SkippedLayer]) -> type[nn.Module]:
    if base not in _SKIPPED_CLASSES:
        _SKIPPED_CLASSES[base] = type(f"ShortGPTGenSkipped{base.__name__}", (mixin, base), {"_gen_base": base})
    return _SKIPPED_CLASSES[base]


def _install(model: nn.Module, spec: GenSpec, mixin: type[_SkippedLayer], base: type[nn.Module]) -> None:
    """Turn the listed decoder layers of `model` (a LlamaModel / Gemma3Model) into skipped layers.

    The layer's class is swapped rather than the layer rebuilt or wrapped: its parameters keep their names, so
    vLLM's weight loading and the compiled decoder loop of the stock model are untouched, and Gemma3Model,
    which builds its layers itself, needs no copy of its constructor.
    """
    for index in spec.skip_prefill_layers:
        if not model.start_layer <= index < model.end_layer:
            continue  # another pipeline stage holds it
        layer = model.layers[index]
        if type(layer) is not base:
            raise TypeError(f"layer {index} is a {type(layer).__name__}, expected {base.__name__}")
        layer.__class__ = _skipped_class(base, mixin)
        layer._gen_rotate_keys = spec.rotate_skipped_keys
        object.__setattr__(layer.self_attn.attn, "_shortgpt_gen_owner", weakref.ref(layer))


def _gen_spec(vllm_config: Any, architecture: str) -> GenSpec:
    """The checkpoint's gen section, and the engine settings under which "query_len > 1" still means prefill."""
    if vllm_config.speculative_config is not None:
        # Verifying k draft tokens is a step with query_len k + 1 for a decoding request: it would skip layers.
        raise ModelLoadError(f"{gen_architecture(architecture)} cannot be served with speculative decoding; "
                             "start vLLM without --speculative-config")  # fmt: skip
    if vllm_config.cache_config.enable_prefix_caching:
        logger.warning(
            "prefix caching is on: a prompt found in the cache recomputes only its last token (query_len 1, every "
            "layer), and cached blocks of generated text hold K/V from every layer, so repeated prompts can "
            "answer differently from fresh ones; start vLLM with --no-enable-prefix-caching for the gen rule exactly"
        )
    return served_gen_spec(vllm_config.model_config.hf_config, architecture=architecture)


def step_has_prompt_tokens() -> bool:
    """Whether some request of this step brings more than one new token (a prompt or a chunk of one)."""
    if not is_forward_context_available():
        return False
    metadata = get_forward_context().attn_metadata
    if isinstance(metadata, list):
        metadata = metadata[0] if metadata else None
    if isinstance(metadata, dict):  # one entry per layer; every entry describes the same batch
        metadata = next(iter(metadata.values()), None)
    if metadata is None:  # warm-up and profiling runs
        return False
    starts = metadata.query_start_loc
    return bool(((starts[1:] - starts[:-1]) > 1).any())


class _GenModel:
    """Mixed into the served model class: a step with prompt tokens runs eagerly (see the module docstring)."""

    def forward(self, input_ids, positions, *args, **kwargs):
        if step_has_prompt_tokens():
            get_forward_context().skip_compiled = True
        return super().forward(input_ids, positions, *args, **kwargs)


class ShortGPTGenLlamaForCausalLM(_GenModel, LlamaForCausalLM):
    """A Llama-family gen checkpoint (architectures = ["ShortGPTGenLlamaForCausalLM"])."""

    def __init__(self, *, vllm_config, prefix: str = "", layer_type: type[nn.Module] = LlamaDecoderLayer):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)
        _install(self.model, _gen_spec(vllm_config, "LlamaForCausalLM"), _SkippedLlamaLayer, layer_type)


class ShortGPTGenGemma3ForCausalLM(_GenModel, Gemma3ForCausalLM):
    """A Gemma-3 text gen checkpoint (architectures = ["ShortGPTGenGemma3ForCausalLM"])."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        _install(self.model, _gen_spec(vllm_config, "Gemma3ForCausalLM"), _SkippedGemma3Layer, Gemma3DecoderLayer)
