"""Shared fixtures: an isolated cache folder, and tiny random checkpoints of the supported families."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# Small enough to build, save and run in well under a second; the sliding window (4) is shorter than the test
# sequences (16), so a layer that wrongly switches between sliding and full attention changes the logits.
TINY_COMMON: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}
SLIDING_WINDOW = 4

# Family → (config class name, family-specific settings). Per-layer attention types differ between layers.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": SLIDING_WINDOW}),
    "qwen2": (
        "Qwen2Config",
        {"use_sliding_window": True, "sliding_window": SLIDING_WINDOW, "max_window_layers": 3},
    ),
    "qwen3": (
        "Qwen3Config",
        {
            "use_sliding_window": True,
            "sliding_window": SLIDING_WINDOW,
            "head_dim": 8,
            "layer_types": [
                "full_attention",
                "sliding_attention",
                "full_attention",
                "full_attention",
                "sliding_attention",
                "sliding_attention",
            ],
        },
    ),
    "gemma2": ("Gemma2Config", {"sliding_window": SLIDING_WINDOW, "head_dim": 8, "query_pre_attn_scalar": 8}),
    "gemma3_text": (
        "Gemma3TextConfig",
        {
            "sliding_window": SLIDING_WINDOW,
            "head_dim": 8,
            "query_pre_attn_scalar": 8,
            "layer_types": [
                "sliding_attention",
                "full_attention",
                "sliding_attention",
                "sliding_attention",
                "full_attention",
                "sliding_attention",
            ],
        },
    ),
    "phi3": ("Phi3Config", {"sliding_window": SLIDING_WINDOW}),
}


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point SHORTGPT_CACHE at a session temp folder so no test writes to ~/.cache."""
    cache = tmp_path_factory.mktemp("shortgpt-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SHORTGPT_CACHE", str(cache))
        yield cache


def build_tiny_checkpoint(
    family: str, folder: Path, *, seed: int = 0, max_shard_size: int | str | None = None, **overrides: Any
) -> Path:
    """Build a tiny random float32 model of `family` and save it (safetensors) into `folder`; return `folder`.

    `overrides` replace config fields; `max_shard_size` is passed to save_pretrained (sharded checkpoint with
    model.safetensors.index.json).
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    if family not in FAMILIES:
        raise KeyError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    class_name, family_settings = FAMILIES[family]
    config = getattr(transformers, class_name)(**{**TINY_COMMON, **family_settings, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # Random init leaves norms at exactly 1 (or 0 for Gemma's 1+w); perturb every parameter so that each
        # layer matters and a wrongly mapped tensor cannot go unnoticed.
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    folder = Path(folder)
    save_kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(folder, **save_kwargs)
    return folder


@pytest.fixture
def tiny_checkpoint() -> Callable[..., Path]:
    """Factory: `tiny_checkpoint(family, folder, **overrides) -> Path` (see build_tiny_checkpoint)."""
    return build_tiny_checkpoint
