"""Serving ShortGPT-gen checkpoints with stock vLLM: the plugin entry point and the checkpoint contract.

A gen checkpoint is a dense checkpoint whose config.json names the architecture "ShortGPTGen" + the original one
and carries

    "shortgpt_gen": {"format": 1, "skip_prefill_layers": [3, 12], "rotate_skipped_keys": true,
                     "architecture": "LlamaForCausalLM"}

The rule: nothing is deleted. Tokens of a request that processes more than one new token in a step (a prompt or
prompt chunk) pass through each listed layer unchanged, but that layer still writes their K/V into the KV cache,
computed from the hidden state that reaches it; tokens of a request that decodes one token run every layer. The
model classes that do this are in gen_vllm_models (they import vLLM); this module stays light because vLLM
imports it in every process through the `vllm.general_plugins` entry point (pyproject.toml), and registering
with "module:Class" strings lets vLLM import the classes only where a gen checkpoint is loaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .errors import CheckpointError

logger = logging.getLogger(__name__)

GEN_PREFIX = "ShortGPTGen"
GEN_FORMAT = 1
# Original architecture -> the class in gen_vllm_models that serves its gen checkpoints. Text-only: these are the
# families of the two offline models (SmolLM2 = Llama, Gemma-3-270m = Gemma3ForCausalLM).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Gemma3ForCausalLM")
MODELS_MODULE = "shortgpt_deploy.gen_vllm_models"


@dataclass(frozen=True)
class GenSpec:
    """The `shortgpt_gen` section of a gen checkpoint's config, validated."""

    skip_prefill_layers: tuple[int, ...]
    rotate_skipped_keys: bool
    architecture: str


def gen_architecture(architecture: str) -> str:
    return GEN_PREFIX + architecture


def read_gen_spec(config: Any, *, architecture: str, num_layers: int) -> GenSpec:
    """The gen section of `config` (a transformers config object or a config.json dict), checked against the
    architecture being loaded and the model's layer count; CheckpointError naming the fix otherwise."""
    section = config.get("shortgpt_gen") if isinstance(config, dict) else getattr(config, "shortgpt_gen", None)
    fix = "rewrite the checkpoint with shortgpt-deploy's gen writer"
    if not isinstance(section, dict):
        raise CheckpointError(f"config.json of a {gen_architecture(architecture)} checkpoint has no shortgpt_gen "
                              f"section; {fix}")  # fmt: skip
    if section.get("format") != GEN_FORMAT:
        raise CheckpointError(
            f"shortgpt_gen format {section.get('format')!r} is not supported (this version reads format "
            f"{GEN_FORMAT}); {fix}, or upgrade shortgpt-deploy"
        )
    if section.get("architecture") != architecture:
        raise CheckpointError(
            f"shortgpt_gen.architecture is {section.get('architecture')!r} but the checkpoint is served as "
            f"{gen_architecture(architecture)}; make config.json's architectures and shortgpt_gen agree"
        )
    layers = section.get("skip_prefill_layers")
    if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise CheckpointError(f"shortgpt_gen.skip_prefill_layers must be a list of layer indices, got {layers!r}")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad or len(set(layers)) != len(layers):
        raise CheckpointError(
            f"shortgpt_gen.skip_prefill_layers {layers} must be distinct indices in 0..{num_layers - 1}; {fix}"
        )
    rotate = section.get("rotate_skipped_keys", True)
    if not isinstance(rotate, bool):
        raise CheckpointError(f"shortgpt_gen.rotate_skipped_keys must be true or false, got {rotate!r}")
    return GenSpec(tuple(sorted(layers)), rotate, architecture)


def register() -> None:
    """The `vllm.general_plugins` entry point: make vLLM know the gen architectures.

    vLLM calls it in each of its processes (API server, engine core, workers), possibly more than once; a name
    already known is left alone (vLLM warns when one is overwritten).
    """
    from vllm import ModelRegistry

    known = set(ModelRegistry.get_supported_archs())
    for architecture in SUPPORTED_ARCHITECTURES:
        name = gen_architecture(architecture)
        if name not in known:
            ModelRegistry.register_model(name, f"{MODELS_MODULE}:{name}")
    logger.debug("registered %s with vLLM", ", ".join(map(gen_architecture, SUPPORTED_ARCHITECTURES)))
