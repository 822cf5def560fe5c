"""ShortGPT-gen: the paper's mode for generative tasks. Nothing is deleted; selected layers skip the prompt.

The rule (Men et al., ShortGPT, the authors' `shortgpt-gen` code): in a forward pass that processes more than
one new token (the prompt, `hidden_states.shape[1] > 1`), each selected layer is skipped for those tokens — the
residual stream passes through unchanged — but it still writes their keys and values into the KV cache,
computed from the hidden state that reaches it exactly as the layer itself would (its input norm, k/v
projections, k_norm where the family has one, rotary on the keys). A forward of one new token (a decoding step)
runs every layer, so generated tokens see the whole model, and attend to the prompt in every layer.

The authors' Llama code stores the skipped layers' prompt keys *without* rotary, although every query is
rotated; `rotate_skipped_keys: true` (our default) stores them rotated, as the layer would; `false` reproduces
theirs.

**The checkpoint** (`write_gen_checkpoint`): the dense checkpoint with config.json changed —
`architectures` becomes `["ShortGPTGen" + original]` (e.g. `ShortGPTGenLlamaForCausalLM`), `model_type` is
unchanged (transformers' Auto classes still load the dense model), and a top-level field

    "shortgpt_gen": {"format": 1, "skip_prefill_layers": [sorted original layer indices],
                     "rotate_skipped_keys": true, "architecture": "LlamaForCausalLM"}

plus `shortgpt_plan.json` (the LayerPlan whose `remove` layers are the skipped ones). Weight files are hard
links to the source's (a symlink where the filesystem refuses a link): the folder costs no disk, and editing a
source weight in place changes it too. Tokenizer and the other small files are copied. Written through
checkpoint.output_transaction: complete or not at all.

**In transformers** (`apply_gen`, called by modeling.load_model for such a folder): each skipped layer's class
is swapped for a subclass whose forward follows the rule. `continuation_logprobs` scores a continuation the way
generation sees it: the prompt in one (skipping) forward, then one decoding step per continuation token.
"""

from __future__ import annotations

import errno
import inspect
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import (
    PLAN_FILE,
    WEIGHTS_INDEX,
    check_layer_tensors,
    copy_side_files,
    output_transaction,
    read_config,
    read_json,
    read_layer_tensors,
    text_config,
    weight_files,
)
from .errors import CheckpointError, ModelLoadError, PlanError, UnsupportedArchitectureError
from .plan import LayerPlan

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

GEN_FORMAT = 1
GEN_FIELD = "shortgpt_gen"
ARCH_PREFIX = "ShortGPTGen"
# Decoder layers with `input_layernorm` and a `self_attn` holding k_proj, v_proj (and k_norm where the family
# has one), `head_dim`, `layer_idx`, and a module-level `apply_rotary_pos_emb(q, k, cos, sin)`; the layer is
# given `position_embeddings` (cos, sin) for its own attention type. Phi3 (fused qkv_proj) does not fit.
GEN_ARCHITECTURES = (
    "LlamaForCausalLM",  # SmolLM2
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",  # k_norm
    "Gemma3ForCausalLM",  # text-only Gemma 3: k_norm, sliding-window layers with their own rotary base
)


@dataclass(frozen=True)
class GenSpec:
    """The `shortgpt_gen` field of a gen checkpoint's config.json."""

    skip_prefill_layers: tuple[int, ...]  # sorted, original layer indices
    rotate_skipped_keys: bool
    architecture: str  # the dense architecture, e.g. LlamaForCausalLM
    format: int = GEN_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "skip_prefill_layers": list(self.skip_prefill_layers),
            "rotate_skipped_keys": self.rotate_skipped_keys,
            "architecture": self.architecture,
        }


# ------------------------------------------------------------------------------------------ the config field
def read_gen_config(source: Path | str | Mapping[str, Any] | Any) -> GenSpec | None:
    """The GenSpec of a checkpoint folder, a config.json path, a config dict or a transformers config; None when
    it is not a gen checkpoint. A malformed field is an error naming it."""
    if isinstance(source, str | Path):
        path = Path(source)
        config = read_config(path) if path.is_dir() else read_json(path)
        where = str(path / "config.json" if path.is_dir() else path)
    elif isinstance(source, Mapping):
        config, where = dict(source), "config"
    else:  # a transformers PretrainedConfig keeps unknown fields as attributes, and to_dict returns them
        config, where = source.to_dict(), "config"
    field = config.get(GEN_FIELD)
    if field is None:
        return None

    def bad(problem: str) -> CheckpointError:
        return CheckpointError(
            f"{where}: {GEN_FIELD} {problem}; rewrite the folder with `shortgpt-deploy prune --mode gen`"
        )

    if not isinstance(field, dict):
        raise bad("is not an object")
    if field.get("format") != GEN_FORMAT:
        raise bad(f"has format {field.get('format')!r}; this shortgpt-deploy reads format {GEN_FORMAT} (upgrade it?)")
    extra = set(field) - {"format", "skip_prefill_layers", "rotate_skipped_keys", "architecture"}
    if extra:
        raise bad(f"has unknown keys {sorted(extra)}")
    layers, rotate, arch = field.get("skip_prefill_layers"), field.get("rotate_skipped_keys"), field.get("architecture")
    n = config.get("num_hidden_layers")  # the supported architectures have flat configs
    if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise bad("skip_prefill_layers is not a list of layer indices")
    if layers != sorted(set(layers)) or (layers and (layers[0] < 0 or (n is not None and layers[-1] >= n))):
        raise bad(f"skip_prefill_layers {layers} is not sorted, unique and within 0..{n - 1 if n else '?'}")
    if not isinstance(rotate, bool):
        raise bad("rotate_skipped_keys is not true or false")
    if not isinstance(arch, str) or config.get("architectures") != [ARCH_PREFIX + arch]:
        raise bad(f"architecture {arch!r} does not match architectures {config.get('architectures')}")
    return GenSpec(tuple(layers), rotate, arch)


def is_gen_checkpoint(source: Path | str | Mapping[str, Any] | Any) -> bool:
    """Whether `source` (as read_gen_config takes it) is a gen checkpoint. A path with no config.json there is not
    (a missing checkpoint is for its consumer, e.g. vLLM, to report with the rest of its checks)."""
    if isinstance(source, str | Path) and not (Path(source).is_file() or (Path(source) / "config.json").is_file()):
        return False
    return read_gen_config(source) is not None


# -------------------------------------------------------------------------------------------- the checkpoint
def write_gen_checkpoint(
    src: Path,
    plan: LayerPlan,
    *,
    out_dir: Path,
    rotate_skipped_keys: bool = True,
    force: bool = False,
    base_model: str = "",
) -> GenSpec:
    """Write the gen checkpoint of `src` to `out_dir`: the plan's removed layers skip the prompt (see module doc).

    The same checks as surgery run first (plan against config.json, every shard's header against its file,
    every layer's tensors against its siblings'), so a damaged source fails before anything is written.
    """
    src = Path(src)
    config = read_config(src)
    arch = _dense_architecture(src, config)
    n = text_config(config)["num_hidden_layers"]
    if n != plan.num_layers_before:
        raise PlanError(
            f"the plan is for {plan.num_layers_before} layers but {src}/config.json has num_hidden_layers={n}"
        )
    shards, index = weight_files(src)
    headers, prefix = read_layer_tensors(src, n)
    check_layer_tensors(src, headers, prefix, config, list(range(n)))  # every layer still runs when decoding
    spec = GenSpec(tuple(sorted(plan.remove)), rotate_skipped_keys, arch)
    config["architectures"] = [ARCH_PREFIX + arch]
    config[GEN_FIELD] = spec.to_dict()
    with output_transaction(Path(out_dir), force=force) as tmp:
        for shard in shards:
            _link(shard, tmp / shard.name)
        if index is not None:
            shutil.copy2(src / WEIGHTS_INDEX, tmp / WEIGHTS_INDEX)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_side_files(src, tmp)
        (tmp / "README.md").write_text(_model_card(plan, spec, base_model or str(src)))
        plan.save(tmp / PLAN_FILE)
    logger.info(
        "gen checkpoint: layers %s skip the prompt, %d weight files linked", list(spec.skip_prefill_layers), len(shards)
    )
    return spec


def check_gen_source(src: Path) -> str:
    """The architecture of a dense checkpoint ShortGPT-gen supports (else the error naming the supported ones),
    from config.json alone: a build checks it before any model loads."""
    return _dense_architecture(Path(src), read_config(Path(src)))


def _dense_architecture(src: Path, config: dict[str, Any]) -> str:
    archs = config.get("architectures")
    arch = archs[0] if isinstance(archs, list) and len(archs) == 1 and isinstance(archs[0], str) else None
    if arch is not None and arch.startswith(ARCH_PREFIX):
        raise UnsupportedArchitectureError(
            f"{src} is already a ShortGPT-gen checkpoint ({arch}); give the dense checkpoint it was made from"
        )
    if arch not in GEN_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{src}: ShortGPT-gen does not support architecture {arch or archs!r}; supported: "
            f"{', '.join(GEN_ARCHITECTURES)} (or use prune mode delete)"
        )
    return arch


def _link(src: Path, dst: Path) -> None:
    """Hard-link a weight file (no bytes copied); a symlink where linking fails, e.g. across filesystems."""
    target = src.resolve()  # a hub cache's snapshot files are symlinks to blobs: link the blob
    try:
        os.link(target, dst)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
        logger.info("cannot hard-link %s (%s): symlinked instead", target, err.strerror)
        os.symlink(target, dst)


def _model_card(plan: LayerPlan, spec: GenSpec, base_model: str) -> str:
    rotated = "rotated (as the layer computes them)" if spec.rotate_skipped_keys else "unrotated (the authors' code)"
    return f"""---
base_model: {base_model}
tags: [shortgpt, shortgpt-gen, shortgpt-deploy]
---

# {Path(base_model).name or base_model}, ShortGPT-gen: {len(spec.skip_prefill_layers)} layers skip the prompt

No layer is deleted. Layers {list(spec.skip_prefill_layers)} (of {plan.num_layers_before}) pass the prompt's
hidden states through unchanged but still write its keys and values into the KV cache; keys are stored
{rotated}. Every layer runs for generated tokens. Chosen by {plan.metric}: {plan.summary()}.
config.json field `{GEN_FIELD}` says so; transformers loads the dense model (model_type unchanged), and
shortgpt-deploy's loader applies the rule.
"""


# ------------------------------------------------------------------------------------------- in transformers
class _SkipPrefill:
    """Put in front of a decoder layer's class (see apply_gen): the layer skips multi-token forwards.

    A class swap rather than a wrapping module: parameter names (state_dict, save_pretrained), isinstance checks
    (transformers records hidden states by the layer's class) and hooks on the layer all stay as they are.
    """

    shortgpt_rotate_keys: bool = True

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        dense_forward = super().forward  # type: ignore[misc]
        if hidden_states.shape[1] <= 1 or _DECODING.get():  # a decoding step (or several at once): the whole layer
            return dense_forward(hidden_states, *args, **kwargs)
        bound = inspect.signature(dense_forward).bind(hidden_states, *args, **kwargs).arguments
        if bound.get("past_key_values") is not None:
            _store_prompt_kv(self, hidden_states, bound)
        return hidden_states  # the residual stream passes through


def _store_prompt_kv(layer: Any, hidden_states: torch.Tensor, args: dict[str, Any]) -> None:
    """Write the keys and values the layer's attention would cache for these tokens (nothing else runs)."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden_states)
    shape = (*x.shape[:-1], -1, attn.head_dim)
    key = attn.k_proj(x).view(shape)
    value = attn.v_proj(x).view(shape).transpose(1, 2)
    k_norm = getattr(attn, "k_norm", None)
    if k_norm is not None:  # normalises over head_dim: the same before or after the transpose
        key = k_norm(key)
    key = key.transpose(1, 2)
    if layer.shortgpt_rotate_keys:
        cos, sin = args["position_embeddings"]  # the layer's own (sliding layers of Gemma 3 have their own base)
        _, key = sys.modules[type(attn).__module__].apply_rotary_pos_emb(key, key, cos, sin)
    args["past_key_values"].update(key, value, attn.layer_idx)


_SKIP_CLASSES: dict[type, type] = {}
# Inside `decoding()`, a forward of several tokens counts as that many decoding steps: every layer runs for all of
# them. With a KV cache and causal attention, one forward over tokens t..t+k computes what k+1 decoding steps
# would, so scoring a known continuation needs one forward instead of one per token.
_DECODING: ContextVar[bool] = ContextVar("shortgpt_gen_decoding", default=False)


@contextmanager
def decoding() -> Iterator[None]:
    token = _DECODING.set(True)
    try:
        yield
    finally:
        _DECODING.reset(token)


def apply_gen(model: PreTrainedModel, spec: GenSpec, layers: Sequence[torch.nn.Module]) -> None:
    """Make a loaded dense model follow the ShortGPT-gen rule for `spec`'s layers (in place).

    `layers` are the model's decoder layers (modeling.decoder_layers): passed in by modeling.load_model, which
    calls this, so that gen never imports the module that imports it."""
    if type(model).__name__ != spec.architecture:
        raise UnsupportedArchitectureError(
            f"the gen config is for {spec.architecture} but transformers loaded {type(model).__name__}"
        )
    for i in spec.skip_prefill_layers:
        layer = layers[i]
        dense = type(layer)
        if not issubclass(dense, _SkipPrefill):
            if dense not in _SKIP_CLASSES:
                _SKIP_CLASSES[dense] = type(f"{ARCH_PREFIX}{dense.__name__}", (_SkipPrefill, dense), {})
            layer.__class__ = _SKIP_CLASSES[dense]
        layer.shortgpt_rotate_keys = spec.rotate_skipped_keys
    logger.info("ShortGPT-gen: layers %s skip the prompt", list(spec.skip_prefill_layers))


def continuation_logprobs(
    model: PreTrainedModel, prompt_ids: torch.Tensor, continuation_ids: torch.Tensor
) -> torch.Tensor:
    """log p(continuation[t] | prompt, continuation[:t]) for each t, as generation computes it: the prompt in one
    forward (which a gen model skips its layers for), then the continuation as decoding steps — all of them in
    one forward inside `decoding()`, which with the cache computes what one step per token would.

    One sequence (1-D ids, or a batch of one). A plain forward over the continuation would skip too, so it would
    not be what generation sees.
    """
    import torch
    from transformers import DynamicCache

    prompt = prompt_ids.reshape(1, -1)
    cont = continuation_ids.reshape(-1)
    if prompt.shape[1] < 1 or cont.numel() < 1:
        raise ModelLoadError("continuation_logprobs needs at least one prompt token and one continuation token")
    with torch.no_grad():
        out = model(input_ids=prompt, past_key_values=DynamicCache(config=model.config), use_cache=True)
        logits = out.logits[0, -1:]
        if cont.numel() > 1:
            with decoding():
                steps = model(input_ids=cont[None, :-1], past_key_values=out.past_key_values, use_cache=True)
            logits = torch.cat([logits, steps.logits[0]])
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(1, cont.view(-1, 1).to(logp.device)).squeeze(1)
