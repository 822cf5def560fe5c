"""Helpers for tests: a tiny word-level tokenizer, and a tiny Llama checkpoint that uses it."""

from __future__ import annotations

from pathlib import Path

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
