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
from typing import Any

from .errors import CheckpointError
from .gen import ARCH_PREFIX, GEN_FIELD, GenSpec, read_gen_config

logger = logging.getLogger(__name__)

# Original architecture -> the class in gen_vllm_models that serves its gen checkpoints. Text-only: these are the
# families of the two offline models (SmolLM2 = Llama, Gemma-3-270m = Gemma3ForCausalLM).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Gemma3ForCausalLM")
MODELS_MODULE = "shortgpt_deploy.gen_vllm_models"


def gen_architecture(architecture: str) -> str:
    return ARCH_PREFIX + architecture


def served_gen_spec(config: Any, *, architecture: str) -> GenSpec:
    """The gen field of the config vLLM loads (gen.read_gen_config checks it), which must exist and name the
    `architecture` this class serves; CheckpointError naming the fix otherwise."""
    spec = read_gen_config(config)
    if spec is None:
        raise CheckpointError(
            f"config.json of a {gen_architecture(architecture)} checkpoint has no {GEN_FIELD} field; rewrite the "
            "checkpoint with `shortgpt-deploy prune --mode gen`"
        )
    if spec.architecture != architecture:
        raise CheckpointError(
            f"{GEN_FIELD}.architecture is {spec.architecture!r} but the checkpoint is served as "
            f"{gen_architecture(architecture)}; make config.json's architectures and {GEN_FIELD} agree"
        )
    return spec


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
