"""ShortGPT-gen checkpoints served by stock vLLM through the plugin (shortgpt_deploy.gen_vllm*).

The vLLM tests run the engine in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), one engine per variant, so
the model's own prefill/decode split can be watched, and compare greedy tokens with an independent
transformers reference: forward hooks make each skipped layer return its input on the prompt pass (its
attention still runs on the hidden state that reaches it, so its K/V land in the cache exactly as the layer
computes them), then decode steps run every layer.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from shortgpt_deploy.errors import CheckpointError
from shortgpt_deploy.gen import GenSpec
from shortgpt_deploy.gen_vllm import served_gen_spec

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINT = "shortgpt_deploy.gen_vllm:register"


def section(**overrides):
    base = {"format": 1, "skip_prefill_layers": [1, 2], "rotate_skipped_keys": True,
            "architecture": "LlamaForCausalLM"}  # fmt: skip
    return {"architectures": ["ShortGPTGenLlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 4,
            "shortgpt_gen": {**base, **overrides}}  # fmt: skip


# ------------------------------------------------------------------------------------------ no engine needed
def test_served_gen_spec_needs_the_field_and_the_served_architecture():
    """The field itself is checked by gen.read_gen_config (tests/test_gen.py); vLLM's side adds two checks."""
    assert served_gen_spec(section(), architecture="LlamaForCausalLM") == GenSpec((1, 2), True, "LlamaForCausalLM")
    with pytest.raises(CheckpointError, match="has no shortgpt_gen field.*prune --mode gen"):
        served_gen_spec({"architectures": ["ShortGPTGenLlamaForCausalLM"]}, architecture="LlamaForCausalLM")
    with pytest.raises(CheckpointError, match="architectures and shortgpt_gen agree"):
        served_gen_spec(section(), architecture="Gemma3ForCausalLM")
    with pytest.raises(CheckpointError, match="format"):
        served_gen_spec(section(format=2), architecture="LlamaForCausalLM")


def test_entry_point_is_declared_and_registering_imports_nothing_heavy():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["entry-points"]["vllm.general_plugins"] == {"shortgpt_gen": ENTRY_POINT}
    # vLLM imports the entry point in every process; the model classes (and vLLM's models) only when used.
    code = "import sys, shortgpt_deploy.gen_vllm; print(sorted(m for m in ('torch', 'vllm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_prefill_rows_follow_query_lengths():
    pytest.importorskip("vllm")
    import torch

    from shortgpt_deploy.gen_vllm_models import prefill_rows

    # Requests of 1, 3, 1 and 2 new tokens, then 2 padding rows.
    mask = prefill_rows(torch.tensor([0, 1, 4, 5, 7], dtype=torch.int32), 9)
    assert mask.tolist() == [False, True, True, True, False, True, True, False, False]


# ------------------------------------------------------------------------------------------ checkpoints
def gen_folder(folder: Path, family: str, skip: list[int], *, rotate: bool = True, seed: int = 0) -> Path:
    """A tiny random checkpoint (head_dim 32, the CPU attention kernel's minimum) made a gen folder by hand."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    common = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 256, "bos_token_id": 1,
              "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False}  # fmt: skip
    if family == "llama":
        config, arch = transformers.LlamaConfig(**common), "LlamaForCausalLM"
    else:  # sliding window 8 is shorter than the longer prompts, so local and global layers differ
        config = transformers.Gemma3TextConfig(**common, head_dim=32, query_pre_attn_scalar=32, sliding_window=8,
                                               layer_types=["sliding_attention", "full_attention"] * 2)  # fmt: skip
        arch = "Gemma3ForCausalLM"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random init is too gentle: each layer must change the tokens
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.08)
    model.save_pretrained(folder)
    config_path = folder / "config.json"
    cfg = json.loads(config_path.read_text())
    assert cfg["architectures"] == [arch]
    cfg["architectures"] = ["ShortGPTGen" + arch]
    cfg["shortgpt_gen"] = {"format": 1, "skip_prefill_layers": skip, "rotate_skipped_keys": rotate,
                           "architecture": arch}  # fmt: skip
    config_path.write_text(json.dumps(cfg))
    return folder


def plugin_dist_info(folder: Path) -> Path:
    """A throw-away distribution that declares only pyproject.toml's vllm.general_plugins entry point (the
    installed shortgpt-deploy metadata predates it); `folder` goes on sys.path."""
    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["vllm.general_plugins"]
    info = folder / "shortgpt_gen_dev-0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: shortgpt-gen-dev\nVersion: 0\n")
    lines = "".join(f"{name} = {value}\n" for name, value in entry.items())
    (info / "entry_points.txt").write_text("[vllm.general_plugins]\n" + lines)
    return folder


# ------------------------------------------------------------------------------------------ the reference
def reference_tokens(folder: Path, prompt: list[int], n: int, skip: list[int], rotate: bool) -> list[int]:
    """Greedy tokens of the gen rule in transformers: prompt pass with the skipped layers passing the stream
    through (their K/V still cached; with `rotate` false replaced by unrotated keys), then decode steps with
    every layer."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    layers = model.model.layers
    inputs: dict[int, torch.Tensor] = {}

    def keep_input(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        inputs[module.self_attn.layer_idx] = hidden
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    hooks = [layers[i].register_forward_hook(keep_input, with_kwargs=True) for i in skip]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), past_key_values=cache, use_cache=True).logits
        for h in hooks:
            h.remove()
        if not rotate:
            for i in skip:
                attn = layers[i].self_attn
                k = attn.k_proj(layers[i].input_layernorm(inputs[i]))
                k = k.view(1, len(prompt), -1, attn.head_dim).transpose(1, 2)
                cache.layers[i].keys = k
        tokens = [int(logits[0, -1].argmax())]
        while len(tokens) < n:
            logits = model(torch.tensor([tokens[-1:]]), past_key_values=cache, use_cache=True).logits
            tokens.append(int(logits[0, -1].argmax()))
    return tokens


def dense_tokens(folder: Path, prompt: list[int], n: int) -> list[int]:
    return reference_tokens(folder, prompt, n, skip=[], rotate=True)


# ------------------------------------------------------------------------------------------ the engine
PROMPTS = [[1, 5, 9, 13, 40, 22], [1, 70, 8, 8, 33, 12, 14, 15, 16, 17, 18, 90, 3], [1, 7, 9],
           [1, *range(20, 50)], [1, 100, 101, 4, 4, 4, 4, 120, 7, 7, 9, 11, 60, 61, 62, 63, 64, 65, 3]]  # fmt: skip
N_TOKENS = 8


class Engine:
    """One in-process vLLM engine; `run` feeds requests in two waves so that the second wave's prompts are
    prefilled in the same steps as the first wave's decodes."""

    def __init__(self, folder: Path, monkeypatch: pytest.MonkeyPatch, **engine_args):
        from vllm import LLM

        from shortgpt_deploy import gen_vllm_models

        self.steps: list[tuple[int, int]] = []  # (prefill rows, decode rows) of each eager skipped-layer call
        original = gen_vllm_models.prefill_rows

        def watched(query_start_loc, num_rows):
            mask = original(query_start_loc, num_rows)
            n_real = int(query_start_loc[-1])
            self.steps.append((int(mask.sum()), n_real - int(mask.sum())))
            return mask

        monkeypatch.setattr(gen_vllm_models, "prefill_rows", watched)
        self.llm = LLM(str(folder), dtype="float32", max_model_len=256, max_num_seqs=8, skip_tokenizer_init=True,
                       enable_prefix_caching=False, seed=0, **engine_args)  # fmt: skip

    def run(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        from vllm import SamplingParams

        engine = self.llm.llm_engine
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False)
        first, second = prompts[: len(prompts) // 2], prompts[len(prompts) // 2 :]
        for i, p in enumerate(first):
            engine.add_request(str(i), {"prompt_token_ids": p}, params)
        done: dict[str, list[int]] = {}
        for _ in range(2):  # the first wave's prefill step, then one decode step
            done |= {o.request_id: list(o.outputs[0].token_ids) for o in engine.step() if o.finished}
        for i, p in enumerate(second, start=len(first)):
            engine.add_request(str(i), {"prompt_token_ids": p}, params)
        while engine.has_unfinished_requests():
            done |= {o.request_id: list(o.outputs[0].token_ids) for o in engine.step() if o.finished}
        return [done[str(i)] for i in range(len(prompts))]

    def run_one_by_one(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        return [self.run([p], n)[0] for p in prompts]


@pytest.fixture(scope="module")
def engine_env(tmp_path_factory):
    pytest.importorskip("vllm")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: its steps can be watched
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        mp.syspath_prepend(str(plugin_dist_info(tmp_path_factory.mktemp("plugin"))))
        from vllm.plugins import load_plugins_by_group

        # vLLM loads general plugins once per process (an earlier test may have done so): load ours explicitly,
        # through the entry point as vLLM finds it.
        plugins = load_plugins_by_group("vllm.general_plugins")
        assert "shortgpt_gen" in plugins
        plugins["shortgpt_gen"]()
        yield mp


def stop(engine: Engine) -> None:
    import gc

    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    engine.llm.llm_engine.engine_core.shutdown()
    del engine.llm
    gc.collect()
    cleanup_dist_env_and_memory()


VARIANTS = {
    "llama-skip-1-2": ("llama", [1, 2], True),
    "llama-dense": ("llama", [], True),
    "llama-unrotated-0-2": ("llama", [0, 2], False),
    "gemma3-skip-1-2": ("gemma3", [1, 2], True),
}


# Each variant is one engine start (40-60 s here): `make test` runs the Llama ones that pin the rule and the dense
# equivalence; unrotated keys, Gemma3 and chunked prefill run with the slow tests (`make test-all`).
SLOW_VARIANTS = {"llama-unrotated-0-2", "gemma3-skip-1-2"}


@pytest.mark.vllm
@pytest.mark.parametrize(
    "variant", [pytest.param(v, marks=[pytest.mark.slow] if v in SLOW_VARIANTS else []) for v in VARIANTS]
)
def test_vllm_greedy_tokens_equal_the_reference(variant, engine_env, tmp_path, monkeypatch):
    family, skip, rotate = VARIANTS[variant]
    folder = gen_folder(tmp_path / variant, family, skip, rotate=rotate)
    engine = Engine(folder, monkeypatch)
    try:
        got = engine.run(PROMPTS, N_TOKENS)
    finally:
        stop(engine)
    assert all(len(t) == N_TOKENS for t in got)
    expected = [reference_tokens(folder, p, N_TOKENS, skip, rotate) for p in PROMPTS]
    dense = [dense_tokens(folder, p, N_TOKENS) for p in PROMPTS]
    assert got == expected
    if skip:
        assert expected != dense  # the layers skipped do change the tokens: the test can tell
        # Some step mixed prompt and decode rows (only the prompt rows skipped), and some was all prompt.
        assert any(p and d for p, d in engine.steps) and any(p and not d for p, d in engine.steps)
        # Decode-only steps never reached the eager rule: they ran the compiled stock graph.
        assert all(p for p, _ in engine.steps)
    else:
        assert got == dense and not engine.steps  # a dense gen folder never enters the skipped-layer rule


@pytest.mark.vllm
@pytest.mark.slow
def test_chunked_prompts_skip_in_every_chunk(engine_env, tmp_path, monkeypatch):
    """A prompt longer than the step's token budget is prefilled in chunks of 16 (none of one token: 31 and 19
    leave 15 and 3); every chunk skips, and later chunks attend to the K/V the skipped layers wrote earlier."""
    skip = [1, 2]
    folder = gen_folder(tmp_path / "gen", "llama", skip, seed=1)
    engine = Engine(folder, monkeypatch, max_num_batched_tokens=16)
    try:
        got = engine.run_one_by_one(PROMPTS, N_TOKENS)
    finally:
        stop(engine)
    assert got == [reference_tokens(folder, p, N_TOKENS, skip, True) for p in PROMPTS]
    assert (16, 0) in engine.steps and (15, 0) in engine.steps  # the 31-token prompt went in two chunks
