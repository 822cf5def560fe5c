"""State-space (Mamba, Mamba2) and hybrid (Bamba, GraniteMoeHybrid) families: scored, pruned and reloaded like the
transformers. Their layers each own a recurrent-state slot (hybrids: a KV slot too) in the cache at `layer_idx`, so
parity is checked on greedy generation with the cache as well as on one forward without it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import calibration, dense_folder, load, padded_batch
from tiny import SSM_FAMILIES

from shortgpt_deploy.checkpoint import read_config
from shortgpt_deploy.importance import collect_stats, score_layers
from shortgpt_deploy.modeling import decoder_layers, layers_removed
from shortgpt_deploy.plan import make_plan
from shortgpt_deploy.surgery import prune_checkpoint

FAMILIES = list(SSM_FAMILIES)
REMOVE = [1, 3]  # in both hybrids layer 1 is attention and layer 3 Mamba2
TOL = 1e-5
SEQ, PAD = 16, 5


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return padded_batch(SEQ, PAD)


def logits(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits[mask.bool()]


def logits_with_identity_layers(model: Any, removed: list[int], ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The reference that does not rely on layers_removed: each removed layer's output replaced by its input."""
    inputs: dict[int, torch.Tensor] = {}
    handles = []
    for i in removed:
        layer = decoder_layers(model)[i]

        def pre(module, args, kwargs, i=i):
            inputs[i] = args[0] if args else kwargs["hidden_states"]

        def post(module, args, output, i=i):
            x = inputs.pop(i)
            return (x, *output[1:]) if isinstance(output, tuple) else x

        handles += [layer.register_forward_pre_hook(pre, with_kwargs=True), layer.register_forward_hook(post)]
    try:
        return logits(model, ids, mask)
    finally:
        for h in handles:
            h.remove()


def greedy(model: Any, prompt: torch.Tensor, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens and the logits of every step, with the cache (recurrent states, and KV in the hybrids)."""
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        use_cache=True,
        return_dict_in_generate=True,
        output_logits=True,
        pad_token_id=0,
    )
    return out.sequences[:, prompt.shape[1] :], torch.stack(out.logits, dim=1)


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    family = request.param
    root = tmp_path_factory.mktemp(family)
    dense = dense_folder(family, root / "dense")
    prune_checkpoint(dense, make_plan(num_layers=6, layers=REMOVE, protect=[]), out_dir=root / "pruned", progress=False)
    return family, dense, root / "pruned"


def test_pruned_checkpoint_reloads_with_the_logits_of_the_skipped_layers(pair):
    family, dense, pruned = pair
    ids, mask = batch()
    original = load(dense)
    reference = logits_with_identity_layers(original, REMOVE, ids, mask)
    assert (reference - logits(original, ids, mask)).abs().max() > 1e-3, "removing layers must change the logits"
    with layers_removed(original, set(REMOVE)):
        view = logits(original, ids, mask)  # the view scoring re-scores with, iteratively
    model = load(pruned)
    layers = decoder_layers(model)
    assert len(layers) == 4 and model.config.num_hidden_layers == 4
    assert float((logits(model, ids, mask) - reference).abs().max()) <= TOL
    assert float((view - reference).abs().max()) <= TOL
    # Every layer's cache slot is its new position (transformers numbers them on load).
    for pos, layer in enumerate(layers):
        assert {m.layer_idx for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)} == {pos}


def test_per_layer_block_types_follow_the_kept_layers(pair):
    family, _, pruned = pair
    config = read_config(pruned)
    assert config["num_hidden_layers"] == 4
    if family == "bamba":
        assert config["attn_layer_indices"] == [2]  # old 4; old 1 removed
    if family == "granitemoehybrid":
        assert config["layer_types"] == ["linear_attention", "linear_attention", "full_attention", "linear_attention"]
    if family in ("bamba", "granitemoehybrid"):
        model = load(pruned)
        kinds = [layer.block_type for layer in decoder_layers(model)]  # what each layer was built as
        assert kinds == ["linear_attention", "linear_attention", "full_attention", "linear_attention"]


@pytest.mark.parametrize("family", ["mamba2", "bamba"])
def test_a_two_layer_model_keeps_its_two_value_settings(family, tmp_path):
    """time_step_limit is (min, max): with two layers it has one entry per layer, and must still not be sliced."""
    hybrid = {"attn_layer_indices": [1]} if family == "bamba" else {}
    dense = dense_folder(family, tmp_path / "dense", num_hidden_layers=2, **hybrid)
    prune_checkpoint(dense, make_plan(num_layers=2, layers=[0], protect=[]), out_dir=tmp_path / "p", progress=False)
    assert read_config(tmp_path / "p")["time_step_limit"] == read_config(dense)["time_step_limit"]
    ids, mask = batch()
    reference = logits_with_identity_layers(load(dense), [0], ids, mask)
    assert float((logits(load(tmp_path / "p"), ids, mask) - reference).abs().max()) <= TOL


def test_generation_with_cache_matches_the_skipped_layers_view(pair):
    """Greedy generation reads each layer's cached state by layer_idx: the pruned model and the original with the
    layers skipped must agree step by step, and the cached steps must agree with a full forward."""
    family, dense, pruned = pair
    prompt = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(5))
    original, model = load(dense), load(pruned)
    with torch.no_grad():
        tokens, steps = greedy(model, prompt)
        with layers_removed(original, set(REMOVE)):
            view_tokens, view_steps = greedy(original, prompt)
        full = torch.cat([prompt, tokens], dim=1)
        no_cache = model(full, use_cache=False).logits[:, prompt.shape[1] - 1 : -1]
    assert torch.equal(tokens, view_tokens)
    assert float((steps - view_steps).abs().max()) <= TOL
    assert float((steps - no_cache).abs().max()) <= TOL
    assert len(decoder_layers(original)) == 6 and original.config.num_hidden_layers == 6  # restored


# ---------------------------------------------------------------------------------------------- scoring
@pytest.fixture(scope="module")
def mamba(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load(dense_folder("mamba", tmp_path_factory.mktemp("mamba") / "dense"))


def test_block_influence_per_layer_on_a_tiny_mamba(mamba):
    """The paper's redundancy finding is about non-transformers too: BI is defined and differs per Mamba layer, and
    a layer that adds nothing to the residual stream (out_proj zeroed) scores 0."""
    cal = calibration()
    bi = score_layers(mamba, cal, metric="bi", progress=False).scores
    assert len(bi) == 6 and all(math.isfinite(s) and 0.0 <= s <= 2.0 for s in bi)
    assert max(bi) - min(bi) > 1e-3 and all(s > 1e-4 for s in bi)
    out_proj = decoder_layers(mamba)[2].mixer.out_proj
    saved = out_proj.weight.detach().clone()
    try:
        with torch.no_grad():
            out_proj.weight.zero_()
        zeroed = score_layers(mamba, cal, metric="bi", progress=False)
    finally:
        with torch.no_grad():
            out_proj.weight.copy_(saved)
    assert zeroed.scores[2] == pytest.approx(0.0, abs=1e-6)
    assert zeroed.removal_order[0] == 2
    assert all(zeroed.scores[i] > 1e-4 for i in (0, 1, 3, 4, 5))


def test_iterative_rescoring_on_mamba_scores_the_pruned_model(mamba, tmp_path):
    """collect_stats with a layer skipped (the view iterative BI re-scores with) gives the scores the pruned
    checkpoint has itself."""
    cal = calibration()
    dense = dense_folder("mamba", tmp_path / "dense")
    prune_checkpoint(dense, make_plan(num_layers=6, layers=[2], protect=[]), out_dir=tmp_path / "p", progress=False)
    skipped = collect_stats(mamba, cal, skip=frozenset({2}), progress=False)
    pruned = score_layers(load(tmp_path / "p"), cal, metric="bi", progress=False).scores
    rescored = [1 - c / skipped.num_tokens for c in skipped.cos_sum]
    assert skipped.cos_sum[2] == 0.0  # the skipped layer is not scored
    assert [rescored[i] for i in (0, 1, 3, 4, 5)] == pytest.approx(pruned, abs=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_state_space_family_scores(family, tmp_path):
    model = load(dense_folder(family, tmp_path / "dense"))
    scores = score_layers(model, calibration(n_batches=2), metric="bi", progress=False).scores
    assert len(scores) == 6 and all(math.isfinite(s) and 0.0 < s <= 2.0 for s in scores)
    assert len({round(s, 6) for s in scores}) == 6


# ---------------------------------------------------------------------------------------------- serving
# What vLLM 0.32's CPU backend does with each family here (ARCH_NOTES / README): the reason a family cannot be
# served is asserted, so the test says when a vLLM upgrade starts serving it.
VLLM_CPU: dict[str, str | None] = {
    "mamba2": None,
    # Its profile run hands out_proj a transposed tensor; the CPU oneDNN GEMM wants a contiguous last dimension.
    "mamba": "a.stride(-1) == 1",
    # Removed from vLLM in 0.23.0; its Transformers backend, the fallback, serves attention layers only.
    "bamba": "does not dispatch through the Transformers attention interface",
    "granitemoehybrid": None,
}
# Wide enough for vLLM's CPU attention (head_dim 32) and its Mamba kernels.
VLLM_SIZES: dict[str, dict[str, Any]] = {
    "mamba": {"hidden_size": 128},
    "mamba2": {"hidden_size": 128, "num_heads": 4, "head_dim": 64, "chunk_size": 64},
    "bamba": {"hidden_size": 128, "intermediate_size": 256, "mamba_chunk_size": 64, "max_position_embeddings": 256},
    "granitemoehybrid": {"hidden_size": 128, "intermediate_size": 256, "shared_intermediate_size": 256,
                         "mamba_chunk_size": 64, "max_position_embeddings": 256},
}  # fmt: skip


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served_greedy(url: str, model: str, prompt: list[int], n: int) -> list[int]:
    import json
    import urllib.request

    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0.0, "ignore_eos": True,
            "return_token_ids": True}  # fmt: skip
    headers = {"Content-Type": "application/json"}
    req = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(), headers)
    with urllib.request.urlopen(req, timeout=120) as r:  # noqa: S310 (loopback)
        return json.loads(r.read())["choices"][0]["token_ids"]


@pytest.mark.vllm
@pytest.mark.parametrize("family", FAMILIES)
def test_vllm_serves_the_pruned_model_like_transformers(family, tmp_path):
    pytest.importorskip("vllm")
    from shortgpt_deploy.serve import ServeError, ServeOptions, VLLMServer

    dense = dense_folder(family, tmp_path / "dense", **VLLM_SIZES[family])
    pruned = tmp_path / "pruned"
    prune_checkpoint(dense, make_plan(num_layers=6, layers=REMOVE, protect=[]), out_dir=pruned, progress=False)
    prompts, n = [[1, 5, 9, 13, 40, 22], [1, 70, 8, 8, 33]], 8
    expected = [greedy(load(pruned), torch.tensor([p]), n)[0][0].tolist() for p in prompts]
    opts = ServeOptions(model_dir=pruned, port=free_port(), dtype="float32", max_model_len=128, kv_cache_gib=1)
    log = tmp_path / "serve.log"
    if VLLM_CPU[family] is not None:
        with pytest.raises(ServeError, match="vLLM exited with code"), VLLMServer(opts, log, startup_timeout_s=300):
            pass
        assert VLLM_CPU[family] in log.read_text()  # refused for the reason we record, not another
        return
    with VLLMServer(opts, log, startup_timeout_s=300) as server:
        got = [served_greedy(server.opts.url, "pruned", p, n) for p in prompts]
    assert got == expected
