"""Tiny models for tests: a word-level tokenizer, a tiny Llama checkpoint that uses it, and tiny random
checkpoints of every supported family (the `tiny_checkpoint` fixture of conftest.py builds them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

WORDS = (
    "the of and to a in was her it i that she not he be as his had for with you is but at on all have by my "
    "which so mr they no were this very said could would been from their what one will any there an me must "
    "him more such much do or when if emma elliot anne upon own than time every should think might being"
).split()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def tiny_llama(folder: Path, *, num_layers: int = 6, seed: int = 0, hidden_size: int = 32, num_heads: int = 4) -> Path:
    """vLLM's CPU attention needs head_dim (hidden_size / num_heads) of 32 or more; the default is smaller."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads // 2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


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

# State-space and hybrid. Their configs have no (or other) attention fields, so they start from SSM_COMMON, not
# TINY_COMMON. The scan chunk (8) is shorter than the test sequences (16), so the state carried across chunks
# matters; the hybrids mix Mamba2 and attention layers, and the tests remove one of each.
SSM_COMMON: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 6,
    "vocab_size": 128,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}
HYBRID_COMMON: dict[str, Any] = {
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "mamba_n_heads": 4,  # head width 2 * 32 / 4 = 16
    "mamba_n_groups": 1,
    "mamba_d_state": 8,
    "mamba_chunk_size": 8,
}
SSM_FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "mamba": ("MambaConfig", {"state_size": 8, "expand": 2, "conv_kernel": 4}),
    "mamba2": ("Mamba2Config", {"num_heads": 4, "head_dim": 16, "expand": 2, "n_groups": 1, "state_size": 8,
                                "chunk_size": 8}),
    # Attention at explicit indices (layers_block_type derives from them).
    "bamba": ("BambaConfig", {**HYBRID_COMMON, "attn_layer_indices": [1, 4]}),
    # An explicit per-layer list, and a small MoE feed-forward beside a shared MLP in every layer.
    "granitemoehybrid": (
        "GraniteMoeHybridConfig",
        {
            **HYBRID_COMMON,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "shared_intermediate_size": 64,
            "layer_types": ["linear_attention", "full_attention", "linear_attention", "linear_attention",
                            "full_attention", "linear_attention"],
        },
    ),
}  # fmt: skip
FAMILIES.update(SSM_FAMILIES)


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
    common = SSM_COMMON if family in SSM_FAMILIES else TINY_COMMON
    config = getattr(transformers, class_name)(**{**common, **family_settings, **overrides})
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


# MoE: tiny mixture-of-experts models (4 experts, 2 per token). Where the family places dense and sparse layers,
# the fixture mixes them, so that a layer rebuilt as the wrong kind fails to load or changes the logits:
# Qwen2-MoE by period (decoder_sparse_step 2: layers 1, 3, 5 sparse), Qwen3-MoE by period and list (layer 5 made
# dense by mlp_only_layers), DeepSeek by a dense prefix (first_k_dense_replace).
MOE_COMMON: dict[str, Any] = {"num_experts_per_tok": 2, "moe_intermediate_size": 16}
MLA: dict[str, Any] = {  # DeepSeek's multi-head latent attention, tiny
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
    "n_routed_experts": 4, "n_shared_experts": 1, "num_key_value_heads": 4,  # MLA: as many K/V heads as queries
}  # fmt: skip
MOE_FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {**MOE_COMMON, "num_experts": 4, "shared_expert_intermediate_size": 32, "decoder_sparse_step": 2},
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        {**MOE_COMMON, "num_experts": 4, "head_dim": 8, "decoder_sparse_step": 1, "mlp_only_layers": [5]},
    ),
    # Routing settings as the hub's configs spell them (V2-Lite; V3), which vLLM reads and transformers ignores.
    "deepseek_v2": (
        "DeepseekV2Config",
        {**MOE_COMMON, **MLA, "first_k_dense_replace": 2, "n_group": 1, "topk_group": 1},
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        {
            **MOE_COMMON,
            **MLA,
            "first_k_dense_replace": 2,
            "n_group": 2,
            "topk_group": 1,
            "topk_method": "noaux_tc",
            "scoring_func": "sigmoid",
        },
    ),
    "olmoe": ("OlmoeConfig", {"num_experts": 4, "num_experts_per_tok": 2}),
}
FAMILIES.update(MOE_FAMILIES)
