"""ShortGPT-gen: skipped layers pass the prompt through but cache its K/V; decoding runs every layer.

Checked against the dense model (no skips: identical), against the dense layer's own K/V of the hidden state
that reaches it (a hook), and against a slow token-by-token reference written here from the rule itself.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import dense_folder, gen_folder, plan_for
from tiny import WORDS
from transformers import DynamicCache
from typer.testing import CliRunner

import shortgpt_deploy.gen as gen
from shortgpt_deploy.cli import app
from shortgpt_deploy.errors import CheckpointError, RecipeError, UnsupportedArchitectureError
from shortgpt_deploy.gen import GenSpec, continuation_logprobs, read_gen_config, write_gen_checkpoint
from shortgpt_deploy.modeling import decoder_layers, load_model
from shortgpt_deploy.pipeline import build
from shortgpt_deploy.plan import LayerPlan
from shortgpt_deploy.preflight import parse_recipe

SKIP = [1, 2, 4]  # Gemma 3 fixture: full, sliding, full attention
PROMPT_LEN, NEW_TOKENS = 10, 8  # the prompt is longer than the sliding window (4)
TOL = 1e-5


# ------------------------------------------------------------------------------------------------ helpers
def prompt_ids(length: int = PROMPT_LEN) -> torch.Tensor:
    return torch.randint(4, 100, (1, length), generator=torch.Generator().manual_seed(7))


def greedy(model: Any, ids: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True,
            pad_token_id=0, eos_token_id=None,
        )  # fmt: skip
    return out.sequences[0, ids.shape[1] :].tolist(), torch.cat(out.logits)


# ---------------------------------------------------------------------------------- no skips: the dense model
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_no_skipped_layers_is_the_dense_model(tmp_path: Path, family: str) -> None:
    dense = dense_folder(family, tmp_path / "dense")
    g = gen_folder(dense, tmp_path / "gen", [])
    model, _ = load_model(g)
    ref, _ = load_model(dense)
    ids = prompt_ids()
    tokens, logits = greedy(model, ids)
    ref_tokens, ref_logits = greedy(ref, ids)
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, atol=TOL, rtol=0)
    # Scored token by token after the prompt = the dense model's one forward over prompt + continuation.
    cont = torch.tensor(ref_tokens)
    with torch.no_grad():
        full = torch.log_softmax(ref(torch.cat([ids[0], cont])[None]).logits[0].float(), -1)
    expected = full[PROMPT_LEN - 1 : -1].gather(1, cont[:, None]).squeeze(1)
    torch.testing.assert_close(continuation_logprobs(model, ids, cont), expected, atol=TOL, rtol=0)


# ------------------------------------------------------------------------------ the cache of a skipped layer
def dense_layer_inputs(model: Any, ids: torch.Tensor, skip: list[int]) -> tuple[dict[int, Any], torch.Tensor]:
    """Run the dense model with the `skip` layers as identities; return what reaches each skipped layer (its
    hidden state and keyword arguments) and the logits."""
    seen: dict[int, Any] = {}
    handles = []
    for i in skip:
        layer = decoder_layers(model)[i]

        def capture(module: Any, args: tuple, kwargs: dict, i: int = i) -> None:
            seen[i] = (args[0].detach().clone(), dict(kwargs))

        def identity(module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
            return args[0]

        handles.append(layer.register_forward_pre_hook(capture, with_kwargs=True))
        handles.append(layer.register_forward_hook(identity, with_kwargs=True))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    return seen, logits


def dense_kv(model: Any, i: int, hidden: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, ...]:
    """(rotated keys, values) as the dense layer i caches them for `hidden`, and its unrotated keys (hooks)."""
    layer = decoder_layers(model)[i]
    attn = layer.self_attn
    seen: dict[str, torch.Tensor] = {}
    src = attn.k_norm if hasattr(attn, "k_norm") else attn.k_proj
    handle = src.register_forward_hook(lambda m, a, out: seen.__setitem__("k", out))
    cache = DynamicCache(config=model.config)
    try:
        with torch.no_grad():
            layer(hidden, **{**kwargs, "past_key_values": cache})
    finally:
        handle.remove()
    k = seen["k"]
    if k.shape[1] == hidden.shape[1]:  # (batch, seq, ...) before the transpose to (batch, heads, seq, dim)
        k = k.reshape(*hidden.shape[:2], -1, attn.head_dim).transpose(1, 2)
    return cache.layers[i].keys, cache.layers[i].values, k


@pytest.mark.parametrize("rotate", [True, False])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"])
def test_skipped_layer_caches_its_own_kv_of_the_prompt(tmp_path: Path, family: str, rotate: bool) -> None:
    dense = dense_folder(family, tmp_path / "dense")
    model, _ = load_model(gen_folder(dense, tmp_path / "gen", SKIP, rotate))
    ref, _ = load_model(dense)
    ids = prompt_ids()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
    inputs, ref_logits = dense_layer_inputs(ref, ids, SKIP)
    torch.testing.assert_close(logits, ref_logits, atol=TOL, rtol=0)  # the prompt passed the layers unchanged
    for i in SKIP:
        rotated, values, unrotated = dense_kv(ref, i, *inputs[i])
        keys, stored = cache.layers[i].keys, cache.layers[i].values
        expected = rotated if rotate else unrotated[..., -keys.shape[-2] :, :]  # a sliding layer keeps a window
        assert keys.shape[-2] == rotated.shape[-2] >= min(3, PROMPT_LEN)
        torch.testing.assert_close(keys, expected, atol=TOL, rtol=0)
        torch.testing.assert_close(stored, values, atol=TOL, rtol=0)
        assert not torch.allclose(rotated, unrotated[..., -keys.shape[-2] :, :], atol=1e-3)  # the variants differ


# --------------------------------------------------------------------- a slow reference written from the rule
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class SlowGen:
    """Token by token, one position at a time, explicit attention over explicit per-layer K/V lists: prompt
    tokens skip `skip` layers (whose K/V are still stored), decoded tokens run all. Batch of one."""

    def __init__(self, model: Any, skip: list[int], rotate: bool) -> None:
        self.model, self.skip, self.rotate = model, set(skip), rotate
        self.cfg = model.config
        n = len(model.model.layers)
        self.keys: list[list[torch.Tensor]] = [[] for _ in range(n)]
        self.values: list[list[torch.Tensor]] = [[] for _ in range(n)]

    def rope(self, h: torch.Tensor, pos: int, layer_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        args = (h.view(1, 1, -1), torch.tensor([[pos]]))
        if "gemma3" in self.cfg.model_type:
            cos, sin = self.model.model.rotary_emb(*args, layer_type)
        else:
            cos, sin = self.model.model.rotary_emb(*args)
        return cos[0, 0], sin[0, 0]

    def attend(self, i: int, q: torch.Tensor, pos: int, window: int | None) -> torch.Tensor:
        attn = self.model.model.layers[i].self_attn
        first = max(0, pos - window + 1) if window else 0
        keys, values = torch.stack(self.keys[i][first:]), torch.stack(self.values[i][first:])  # (t, kv, d)
        group = q.shape[0] // keys.shape[1]
        out = []
        for head in range(q.shape[0]):
            scores = keys[:, head // group] @ q[head] * attn.scaling
            if getattr(self.cfg, "attn_logit_softcapping", None):
                scores = torch.tanh(scores / self.cfg.attn_logit_softcapping) * self.cfg.attn_logit_softcapping
            out.append(torch.softmax(scores, dim=0) @ values[:, head // group])
        return torch.cat(out)

    def token(self, tok: int, pos: int, prefill: bool) -> torch.Tensor:
        body = self.model.model
        h = body.embed_tokens(torch.tensor([[tok]]))[0, 0]
        for i, layer in enumerate(body.layers):
            attn = layer.self_attn
            layer_type = self.cfg.layer_types[i] if getattr(self.cfg, "layer_types", None) else "full_attention"
            cos, sin = self.rope(h, pos, layer_type)
            x = layer.input_layernorm(h)
            q, k = attn.q_proj(x).view(-1, attn.head_dim), attn.k_proj(x).view(-1, attn.head_dim)
            if hasattr(attn, "k_norm"):
                q, k = attn.q_norm(q), attn.k_norm(k)
            q_rot, k_rot = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            skipped = prefill and i in self.skip
            self.keys[i].append(k if skipped and not self.rotate else k_rot)
            self.values[i].append(attn.v_proj(x).view(-1, attn.head_dim))
            if skipped:
                continue
            window = self.cfg.sliding_window if layer_type == "sliding_attention" else None
            o = attn.o_proj(self.attend(i, q_rot, pos, window))
            if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma: norms after attention and MLP too
                h = h + layer.post_attention_layernorm(o)
                h = h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))
            else:
                h = h + o
                h = h + layer.mlp(layer.post_attention_layernorm(h))
        logits = self.model.lm_head(body.norm(h))
        if cap := getattr(self.cfg, "final_logit_softcapping", None):
            logits = torch.tanh(logits / cap) * cap
        return logits

    def generate(self, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
        with torch.no_grad():
            for pos, tok in enumerate(prompt):
                last = self.token(tok, pos, prefill=len(prompt) > 1)
            tokens, logits = [], [last]
            for step in range(n):
                tokens.append(int(last.argmax()))
                if step < n - 1:
                    last = self.token(tokens[-1], len(prompt) + step, prefill=False)
                    logits.append(last)
        return tokens, torch.stack(logits)


@pytest.mark.parametrize("rotate", [True, False])
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_generate_matches_slow_reference(tmp_path: Path, family: str, rotate: bool) -> None:
    dense = dense_folder(family, tmp_path / "dense")
    model, _ = load_model(gen_folder(dense, tmp_path / "gen", SKIP, rotate))
    ref, _ = load_model(dense)
    ids = prompt_ids()
    tokens, logits = greedy(model, ids)
    slow_tokens, slow_logits = SlowGen(ref, SKIP, rotate).generate(ids[0].tolist(), NEW_TOKENS)
    assert tokens == slow_tokens
    torch.testing.assert_close(logits, slow_logits, atol=1e-4, rtol=0)
    # Not the dense model, and scoring a continuation sees what generation saw.
    _, dense_logits = greedy(ref, ids)
    assert not torch.allclose(logits, dense_logits, atol=1e-3)
    lp = continuation_logprobs(model, ids, torch.tensor(tokens))
    expected = torch.log_softmax(slow_logits, -1).gather(1, torch.tensor(tokens)[:, None]).squeeze(1)
    torch.testing.assert_close(lp, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_left_padded_batch_generates_as_each_prompt_alone(tmp_path: Path, family: str) -> None:
    model, _ = load_model(gen_folder(dense_folder(family, tmp_path / "dense"), tmp_path / "gen", SKIP))
    long, short = prompt_ids(PROMPT_LEN)[0], prompt_ids(PROMPT_LEN - 3)[0].flip(0)
    ids = torch.zeros(2, PROMPT_LEN, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[0], ids[1, 3:], mask[0], mask[1, 3:] = long, short, 1, 1  # the pad positions' K/V are masked out
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
            return_dict_in_generate=True, pad_token_id=0, eos_token_id=None,
        )  # fmt: skip
    for row, prompt in enumerate((long, short)):
        tokens, logits = greedy(model, prompt[None])
        assert out.sequences[row, PROMPT_LEN:].tolist() == tokens
        torch.testing.assert_close(torch.stack(out.logits)[:, row], logits, atol=TOL, rtol=0)


# ------------------------------------------------------------------------------------------ the written folder
def test_folder_contract_links_weights_and_saves_plan(tmp_path: Path) -> None:
    dense = dense_folder("llama", tmp_path / "dense", max_shard_size="20KB")  # sharded: an index too
    plan = plan_for([4, 1, 2])
    spec = write_gen_checkpoint(dense, plan, out_dir=tmp_path / "gen")
    out = tmp_path / "gen"
    assert spec == GenSpec((1, 2, 4), True, "LlamaForCausalLM")
    config, src_config = json.loads((out / "config.json").read_text()), json.loads((dense / "config.json").read_text())
    assert config["architectures"] == ["ShortGPTGenLlamaForCausalLM"]
    assert config["model_type"] == src_config["model_type"] == "llama"
    assert config["shortgpt_gen"] == {
        "format": 1, "skip_prefill_layers": [1, 2, 4], "rotate_skipped_keys": True, "architecture": "LlamaForCausalLM"
    }  # fmt: skip
    assert {k: v for k, v in config.items() if k not in ("architectures", "shortgpt_gen")} == {
        k: v for k, v in src_config.items() if k != "architectures"
    }
    shards = sorted(dense.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    for shard in shards:
        linked = out / shard.name
        assert not linked.is_symlink() and linked.stat().st_ino == shard.stat().st_ino
    assert (out / "tokenizer.json").stat().st_ino != (dense / "tokenizer.json").stat().st_ino
    assert (out / "tokenizer.json").read_bytes() == (dense / "tokenizer.json").read_bytes()
    assert LayerPlan.load(out / "shortgpt_plan.json") == plan
    assert read_gen_config(out) == spec == read_gen_config(out / "config.json")
    assert read_gen_config(dense) is None
    model, _ = load_model(out)
    assert read_gen_config(model.config) == spec
    assert [type(layer).__name__.startswith("ShortGPTGen") for layer in decoder_layers(model)] == [
        i in (1, 2, 4) for i in range(6)
    ]
    assert set(model.state_dict()) == set(load_model(dense)[0].state_dict())  # weight names unchanged


def test_unrotated_option_and_symlink_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dense = dense_folder("llama", tmp_path / "dense")

    def no_link(src: Any, dst: Any) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(gen.os, "link", no_link)
    spec = write_gen_checkpoint(dense, plan_for([3]), out_dir=tmp_path / "gen", rotate_skipped_keys=False)
    assert spec.rotate_skipped_keys is False
    assert json.loads((tmp_path / "gen" / "config.json").read_text())["shortgpt_gen"]["rotate_skipped_keys"] is False
    linked = tmp_path / "gen" / "model.safetensors"
    assert linked.is_symlink() and Path(os.readlink(linked)) == (dense / "model.safetensors").resolve()


def test_a_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dense = dense_folder("llama", tmp_path / "dense")

    def broken(src: Path, dst: Path) -> None:
        raise OSError(errno.EIO, "simulated failure")

    monkeypatch.setattr(gen, "copy_side_files", broken)
    with pytest.raises(OSError, match="simulated"):
        write_gen_checkpoint(dense, plan_for([1]), out_dir=tmp_path / "out" / "gen")
    assert list((tmp_path / "out").iterdir()) == []  # no output, no hidden partial folder
    assert (dense / "model.safetensors").stat().st_nlink == 1


def test_unsupported_family_and_gen_source_refused(tmp_path: Path) -> None:
    phi = dense_folder("phi3", tmp_path / "phi3")
    with pytest.raises(UnsupportedArchitectureError, match="Phi3ForCausalLM.*LlamaForCausalLM.*Gemma3ForCausalLM"):
        write_gen_checkpoint(phi, plan_for([1]), out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    g = gen_folder(dense_folder("llama", tmp_path / "dense"), tmp_path / "gen", [1])
    with pytest.raises(UnsupportedArchitectureError, match="already a ShortGPT-gen checkpoint"):
        write_gen_checkpoint(g, plan_for([2]), out_dir=tmp_path / "gen2")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": 2}, "format 2"),
        ({"skip_prefill_layers": [4, 1]}, "not sorted"),
        ({"skip_prefill_layers": [6]}, "within 0..5"),
        ({"rotate_skipped_keys": "yes"}, "rotate_skipped_keys"),
        ({"architecture": "MistralForCausalLM"}, "does not match"),
        ({"extra": 1}, "unknown keys"),
    ],
)
def test_malformed_gen_field_is_named(change: dict[str, Any], message: str) -> None:
    config = {
        "architectures": ["ShortGPTGenLlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 6,
        "shortgpt_gen": {"format": 1, "skip_prefill_layers": [1, 4], "rotate_skipped_keys": True,
                         "architecture": "LlamaForCausalLM"},
    }  # fmt: skip
    assert read_gen_config(config) == GenSpec((1, 4), True, "LlamaForCausalLM")
    config["shortgpt_gen"].update(change)
    with pytest.raises(CheckpointError, match=message):
        read_gen_config(config)


# ----------------------------------------------------------------------------------- recipe, CLI and build
def recipe_data(tmp_path: Path, model: Path, **prune: Any) -> dict[str, Any]:
    (tmp_path / "calib.txt").write_text(" ".join(WORDS * 20))
    return {
        "model": {"path": str(model)},
        "calibration": {"files": [str(tmp_path / "calib.txt")], "samples": 2, "seq_len": 16},
        "prune": {"layers": [1, 2], **prune},
        "output": {"dir": str(tmp_path / "run")},
    }


def test_recipe_mode(tmp_path: Path) -> None:
    assert parse_recipe(recipe_data(tmp_path, tmp_path)).prune.mode == ("delete",)
    spec = parse_recipe(recipe_data(tmp_path, tmp_path, mode="gen", rotate_skipped_keys=False)).prune
    assert (spec.mode, spec.rotate_skipped_keys) == (("gen",), False)
    assert parse_recipe(recipe_data(tmp_path, tmp_path, mode=["delete", "gen"])).prune.mode == ("delete", "gen")
    with pytest.raises(RecipeError, match="each once"):
        parse_recipe(recipe_data(tmp_path, tmp_path, mode=["gen", "gen"]))
    with pytest.raises(RecipeError, match="prune.mode.0: Input should be 'delete' or 'gen'"):
        parse_recipe(recipe_data(tmp_path, tmp_path, mode="gem"))
    with pytest.raises(RecipeError, match="prune.rotate_skiped_keys: unknown field"):
        parse_recipe(recipe_data(tmp_path, tmp_path, mode="gen", rotate_skiped_keys=False))
    with pytest.raises(RecipeError, match="rotate_skipped_keys only applies to mode: gen"):
        parse_recipe(recipe_data(tmp_path, tmp_path, rotate_skipped_keys=False))
    data = recipe_data(tmp_path, tmp_path, mode="gen")
    data["eval"] = {}  # eval knows a gen variant
    data["quantize"] = {"variants": ["dense", "pruned"]}
    with pytest.raises(RecipeError, match=r"no pruned checkpoint for quantize.variants: pruned: add delete"):
        parse_recipe(data)
    data = recipe_data(tmp_path, tmp_path)
    data["bench"] = {"variants": ["dense", "gen"]}
    with pytest.raises(RecipeError, match=r"bench.variants names gen but prune.mode has no gen"):
        parse_recipe(data)


def test_prune_command_mode_gen(tmp_path: Path) -> None:
    dense = dense_folder("llama", tmp_path / "dense")
    runner = CliRunner()
    result = runner.invoke(app, ["prune", str(dense), "--out", str(tmp_path / "gen"), "--layers", "1,3", "--mode",
                                 "gen", "--no-rotate-skipped-keys", "--no-progress"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "gen: nothing is deleted" in result.output
    assert read_gen_config(tmp_path / "gen") == GenSpec((1, 3), False, "LlamaForCausalLM")
    phi = dense_folder("phi3", tmp_path / "phi3")
    result = runner.invoke(app, ["prune", str(phi), "--out", str(tmp_path / "x"), "--layers", "1", "--mode", "gen",
                                 "--dry-run"])  # fmt: skip
    assert result.exit_code == 2 and "supported: LlamaForCausalLM" in result.output
    assert not (tmp_path / "x").exists()


def test_build_mode_gen_writes_gen_folder(tmp_path: Path) -> None:
    dense = dense_folder("llama", tmp_path / "dense")
    data = recipe_data(tmp_path, dense, mode="gen")
    result = build(parse_recipe(data), recipe_text=json.dumps(data), progress=False)
    run = tmp_path / "run"
    assert result.pruned_dir == run / "gen" and not (run / "pruned").exists()
    assert read_gen_config(run / "gen") == GenSpec((1, 2), True, "LlamaForCausalLM")
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["variants"]["gen"] == "gen" and manifest["stages"]["prune"]["state"] == "complete"
    assert LayerPlan.load(run / "plan.json") == LayerPlan.load(run / "gen" / "shortgpt_plan.json")


def test_build_both_modes_writes_pruned_and_gen_from_one_plan(tmp_path: Path) -> None:
    dense = dense_folder("llama", tmp_path / "dense")
    data = recipe_data(tmp_path, dense, mode=["delete", "gen"])
    result = build(parse_recipe(data), recipe_text=json.dumps(data), progress=False)
    run = tmp_path / "run"
    assert result.pruned_dir == run / "pruned"
    manifest = json.loads((run / "manifest.json").read_text())
    assert {k: v for k, v in manifest["variants"].items() if k != "dense"} == {"pruned": "pruned", "gen": "gen"}
    assert json.loads((run / "pruned" / "config.json").read_text())["num_hidden_layers"] == 4
    assert read_gen_config(run / "gen") == GenSpec((1, 2), True, "LlamaForCausalLM")
    assert LayerPlan.load(run / "gen" / "shortgpt_plan.json") == LayerPlan.load(run / "plan.json")
