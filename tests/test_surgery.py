"""Checkpoint surgery: a pruned checkpoint must compute exactly what the original computes with the removed
layers turned into identities, for every supported family, sharded or not, quantized tensors untouched."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import shortgpt_deploy.surgery as surgery
from shortgpt_deploy.errors import OutputExistsError, UnsupportedArchitectureError
from shortgpt_deploy.modeling import layers_removed
from shortgpt_deploy.plan import LayerPlan, make_plan
from shortgpt_deploy.surgery import PLAN_FILE, WEIGHTS_INDEX, prune_checkpoint, read_safetensors_header

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"]
REMOVE = [1, 3]
KEEP = [0, 2, 4, 5]
SEQ, PAD = 16, 5  # row 2 of the batch ends with PAD padding positions
TOL = 1e-5
MAX_DIFF: dict[str, float] = {}  # family → max |logits diff|, printed at the end of the session (-s)


# ------------------------------------------------------------------------------------------------ helpers
def plan_1_3() -> LayerPlan:
    return make_plan(num_layers=6, layers=REMOVE, protect=[0, -1])


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(3, 128, (2, SEQ), generator=g)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, SEQ - PAD :] = 0
    input_ids[1, SEQ - PAD :] = 0  # pad id
    return input_ids, mask


def load(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def logits(model: Any, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits


def logits_with_identity_layers(model: Any, removed: list[int], input_ids: torch.Tensor, mask: torch.Tensor):
    """Logits of `model` with the `removed` decoder layers replaced by identities (via hooks)."""
    fired: list[int] = []
    captured: dict[int, torch.Tensor] = {}

    def pre_hook(i: int):
        def hook(module, args, kwargs):
            captured[i] = args[0] if args else kwargs["hidden_states"]

        return hook

    def post_hook(i: int):
        def hook(module, args, output):
            fired.append(i)
            hidden = captured.pop(i)
            if isinstance(output, tuple):
                return (hidden, *output[1:])
            return hidden

        return hook

    handles = []
    for i in removed:
        layer = model.model.layers[i]
        handles.append(layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(post_hook(i)))
    try:
        out = logits(model, input_ids, mask)
    finally:
        for h in handles:
            h.remove()
    assert sorted(fired) == sorted(removed), "the identity hooks did not run"
    return out


def max_diff_on_tokens(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    keep = mask.bool()
    return float((a[keep] - b[keep]).abs().max())


def read_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text())


def check_logits_match(src: Path, out: Path, family: str | None = None) -> float:
    """Pruned logits == original-with-identity logits on real tokens; the removal itself changes logits."""
    input_ids, mask = batch()
    original = load(src)
    reference = logits_with_identity_layers(original, REMOVE, input_ids, mask)
    unpruned = logits(original, input_ids, mask)
    assert max_diff_on_tokens(reference, unpruned, mask) > 1e-3, "removing layers must change the logits"
    pruned_model = load(out)
    assert len(pruned_model.model.layers) == 4
    diff = max_diff_on_tokens(logits(pruned_model, input_ids, mask), reference, mask)
    if family is not None:
        MAX_DIFF[family] = diff
    assert diff <= TOL, f"pruned logits differ from the reference by {diff:.3g}"
    return diff


def holds_only_removed_layers(shard: Path) -> bool:
    names = [n for n in read_safetensors_header(shard)[0] if n != "__metadata__"]
    return all(n.startswith("model.layers.") and int(n.split(".")[2]) in REMOVE for n in names)


def tensors(folder: Path) -> dict[str, bytes]:
    """Every tensor of every safetensors file in `folder`, as raw bytes (bit-exact comparisons)."""
    out: dict[str, bytes] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                t = st.get_tensor(name)
                out[name] = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return out


@pytest.fixture(scope="session", autouse=True)
def _print_max_diffs():
    yield
    if MAX_DIFF:
        print("\nmax |logits diff| per family:", {k: f"{v:.3g}" for k, v in sorted(MAX_DIFF.items())})


# --------------------------------------------------------------------------------------- every family
@pytest.mark.parametrize("family", FAMILIES)
def test_prune_family_matches_identity_reference(family: str, tiny_checkpoint: Callable[..., Path], tmp_path: Path):
    src = tiny_checkpoint(family, tmp_path / "src")
    out = tmp_path / "out"
    notes = prune_checkpoint(src, plan_1_3(), out_dir=out, progress=False)
    assert any("num_hidden_layers: 6 → 4" in n for n in notes)

    before, after = read_config(src), read_config(out)
    assert after["num_hidden_layers"] == 4
    if before.get("layer_types") is not None:
        assert len(after["layer_types"]) == 4
        assert after["layer_types"] == [before["layer_types"][i] for i in KEEP]
    from transformers import AutoConfig

    loaded_types = getattr(AutoConfig.from_pretrained(out), "layer_types", None)
    original_types = getattr(AutoConfig.from_pretrained(src), "layer_types", None)
    if original_types is not None:
        assert list(loaded_types) == [original_types[i] for i in KEEP]

    check_logits_match(src, out, family)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "gemma2", "gemma3_text"])
def test_wrong_layer_types_would_be_caught(family: str, tiny_checkpoint: Callable[..., Path], tmp_path: Path):
    """The fixtures are sensitive enough: the naive slice layer_types[:4] gives different logits."""
    src = tiny_checkpoint(family, tmp_path / "src")
    out = tmp_path / "out"
    prune_checkpoint(src, plan_1_3(), out_dir=out, progress=False)
    cfg = read_config(out)
    naive = read_config(src)["layer_types"][:4]
    assert naive != cfg["layer_types"]
    input_ids, mask = batch()
    good = logits(load(out), input_ids, mask)
    cfg["layer_types"] = naive
    (out / "config.json").write_text(json.dumps(cfg))
    bad = logits(load(out), input_ids, mask)
    assert max_diff_on_tokens(good, bad, mask) > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_removed_view_equals_pruned_checkpoint(
    family: str, tiny_checkpoint: Callable[..., Path], tmp_path: Path
):
    """Scoring's in-memory removal (modeling.layers_removed) computes what the pruned checkpoint computes."""
    src = tiny_checkpoint(family, tmp_path / "src")
    out = tmp_path / "out"
    prune_checkpoint(src, plan_1_3(), out_dir=out, progress=False)
    input_ids, mask = batch()
    model = load(src)
    unpruned = logits(model, input_ids, mask)
    types_before = getattr(model.config, "layer_types", None)
    with layers_removed(model, set(REMOVE)):
        viewed = logits(model, input_ids, mask)
    assert len(model.model.layers) == 6  # restored on exit
    assert getattr(model.config, "layer_types", None) == types_before
    assert max_diff_on_tokens(logits(model, input_ids, mask), unpruned, mask) == 0.0
    pruned = logits(load(out), input_ids, mask)
    assert max_diff_on_tokens(viewed, pruned, mask) <= TOL


# -------------------------------------------------------------------------------------------- sharded
@pytest.mark.parametrize("shard_size", ["40KB", "10KB"])  # layers span shards / shards of removed layers only
def test_sharded_checkpoint(shard_size: str, tiny_checkpoint: Callable[..., Path], tmp_path: Path):
    src = tiny_checkpoint("llama", tmp_path / "src", max_shard_size=shard_size)
    src_shards = sorted(src.glob("*.safetensors"))
    assert len(src_shards) >= 3 and (src / WEIGHTS_INDEX).is_file()
    out = tmp_path / "out"
    prune_checkpoint(src, plan_1_3(), out_dir=out, progress=False)
    only_removed = [f.name for f in src_shards if holds_only_removed_layers(f)]
    if shard_size == "10KB":
        assert only_removed, "the fixture should have shards holding removed layers only"
    assert sorted(f.name for f in out.glob("*.safetensors")) == [
        f.name for f in src_shards if f.name not in only_removed
    ]

    index = json.loads((out / WEIGHTS_INDEX).read_text())
    weight_map: dict[str, str] = index["weight_map"]
    files = sorted(out.glob("*.safetensors"))
    assert sorted(set(weight_map.values())) == [f.name for f in files]  # no stray or missing shard
    in_shards: dict[str, str] = {}
    total = 0
    for f in files:
        header, data_start = read_safetensors_header(f)
        assert data_start % 8 == 0, "safetensors header must be padded to 8-byte alignment"
        for name, info in header.items():
            if name == "__metadata__":
                continue
            assert name not in in_shards, f"{name} is in two shards"
            in_shards[name] = f.name
            begin, end = info["data_offsets"]
            total += end - begin
    assert in_shards == weight_map
    assert index["metadata"]["total_size"] == total

    layer_ids = {int(n.split(".")[2]) for n in weight_map if n.startswith("model.layers.")}
    assert layer_ids == {0, 1, 2, 3}
    src_map = json.loads((src / WEIGHTS_INDEX).read_text())["weight_map"]
    per_layer = {n.split(".", 3)[3] for n in src_map if n.startswith("model.layers.0.")}
    for j in range(4):
        assert {n.split(".", 3)[3] for n in weight_map if n.startswith(f"model.layers.{j}.")} == per_layer
    assert len(weight_map) == len(src_map) - 2 * len(per_layer)

    # Renamed tensors hold the bytes of the layer they came from.
    old, new = tensors(src), tensors(out)
    for j, i in enumerate(KEEP):
        for suffix in per_layer:
            assert new[f"model.layers.{j}.{suffix}"] == old[f"model.layers.{i}.{suffix}"]
    check_logits_match(src, out)


# -------------------------------------------------------------------------------------------- config
def test_derived_layer_types_written_explicitly(tiny_checkpoint: Callable[..., Path], tmp_path: Path):
    """qwen2's layer_types come from use_sliding_window + max_window_layers when config.json has none."""
    from transformers import AutoConfig

    src = tiny_checkpoint("qwen2", tmp_path / "src")
    raw = read_config(src)
    raw.pop("layer_types", None)
    (src / "config.json").write_text(json.dumps(raw, indent=2))
    derived = list(AutoConfig.from_pretrained(src).layer_types)
    assert derived == ["full_attention"] * 3 + ["sliding_attention"] * 3

    out = tmp_path / "out"
    notes = prune_checkpoint(src, plan_1_3(), out_dir=out, progress=False)
    cfg = read_config(out)
    assert cfg["layer_types"] == [derived[i] for i in KEEP]
    assert cfg["layer_types"] == ["full_attention"] * 2 + ["sliding_attention"] * 2
    assert cfg["max_window_layers"] == sum(1 for i in KEEP if i < 3) == 2
    assert any("written out explicitly" in n for n in notes)
    check_logits_match(src, out)


def test_unknown_per_layer_list_is_sliced(tiny_checkpoint: Callable[..., Path], tmp_path: Path):
    src = tiny_checkpoint("llama", tmp_path / "src")
    raw = read_config(src)
    raw["my_layer_scales"] = [10, 11, 12, 13, 14, 15]
    raw["not_per_layer"] = [1, 2, 3]
    (src / "config.json").write_text(json.dumps(raw))
    out = tmp_path / "out"
    prune_checkpoint(src, plan_1_3(), out_dir=out, progress=False)
    cfg = read_config(out)
    assert cfg["my_layer_scales"] == [10, 12, 14, 15]
    assert cfg["not_per_layer"] == [1, 2, 3]


@pytest.mark.parametrize(
    "fields",
    [
        {"decoder_sparse_step": 2},
        {"attn_layer_period": 2, "attn_layer_offset": 1},
        {"expert_layer_period": 2, "expert_layer_offset": 1},
    ],
    ids=lambda f: next(iter(f)),
)
def test_period_without_a_list_to_write_is_refused(
    fields: dict[str, int], tiny_checkpoint: Callable[..., Path], tmp_path: Path
):
    """Layers 1, 3, 5 are the period's; without layer 2 they are 1, 2, 4, which no period gives, and this
    config.json has no explicit list (mlp_only_layers) to write them in: refused, naming the field."""
    src = tiny_checkpoint("llama", tmp_path / "src")
    raw = read_config(src)
    raw.update(fields)
    (src / "config.json").write_text(json.dumps(raw))
    out = tmp_path / "out"
    with pytest.raises(UnsupportedArchitectureError, match=f"{next(iter(fields))}=2"):
        prune_checkpoint(src, make_plan(num_layers=6, layers=[2], protect=[]), out_dir=out, progress=False)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_period_is_rewritten(tiny_checkpoint: Callable[..., Path], tmp_path: Path):
    """decoder_sparse_step 3 (layers 2, 5): without 1 and 3 they are 1 and 3, every 2nd; with mlp_only_layers in
    the file, a layout no step gives is written out as the dense layers' list."""
    src = tiny_checkpoint("llama", tmp_path / "src")
    raw = read_config(src)
    (src / "config.json").write_text(json.dumps({**raw, "decoder_sparse_step": 3}))
    notes = prune_checkpoint(src, plan_1_3(), out_dir=tmp_path / "a", progress=False)
    assert read_config(tmp_path / "a")["decoder_sparse_step"] == 2
    assert any(n.startswith("decoder_sparse_step: 3 → 2") for n in notes)
    (src / "config.json").write_text(json.dumps({**raw, "decoder_sparse_step": 2, "mlp_only_layers": []}))
    plan = make_plan(num_layers=6, layers=[2], protect=[])
    prune_checkpoint(src, plan, out_dir=tmp_path / "b", progress=False)
    cfg = read_config(tmp_path / "b")
    assert (cfg["decoder_sparse_step"], cfg["mlp_only_layers"]) == (1, [0, 3])  # sparse: old 1, 3, 5 = new 1, 2, 4


def test_trivial_period_is_accepted(tiny_checkpoint: Callable[..., Path], tmp_path: Path):
    src = tiny_checkpoint("llama", tmp_path / "src")
    raw = read_config(src)
    raw["decoder_sparse_step"] = 1
    (src / "config.json").write_text(json.dumps(raw))
    out = tmp_path / "out"
    prune_checkpoint(src, plan_1_3(), out_dir=out, progress=False)
    assert read_config(out)["decoder_sparse_step"] == 1


# ----------------------------------------------------------------------------------------------- GPTQ
def write_fake_gptq(folder: Path) -> dict[str, torch.Tensor]:
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(7)
    ts: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": torch.randn(128, 32, generator=g).to(torch.float16),
    }
    for i in range(6):
        p = f"model.layers.{i}.self_attn.q_proj."
        ts[p + "qweight"] = torch.randint(-(2**31), 2**31 - 1, (4, 32), generator=g, dtype=torch.int32)
        ts[p + "qzeros"] = torch.randint(-(2**31), 2**31 - 1, (1, 4), generator=g, dtype=torch.int32)
        ts[p + "scales"] = torch.randn(1, 32, generator=g).to(torch.float16)
        ts[p + "g_idx"] = torch.zeros(32, dtype=torch.int32) + i
    save_file(ts, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 6,
        "vocab_size": 128,
        "quantization_config": {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": 128,
            "modules_to_not_convert": ["model.layers.1.mlp.down_proj", "model.layers.4.mlp.down_proj"],
            "dynamic": {"-:model\\.layers\\.3\\..*": {}, "+:model\\.layers\\.5\\.mlp\\..*": {"bits": 8}},
        },
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return ts


def test_fake_gptq_checkpoint(tmp_path: Path):
    src = tmp_path / "gptq"
    write_fake_gptq(src)
    old = tensors(src)
    out = tmp_path / "out"
    prune_checkpoint(src, plan_1_3(), out_dir=out, progress=False)
    new = tensors(out)

    suffixes = ["qweight", "qzeros", "scales", "g_idx"]
    expected = {"model.embed_tokens.weight"} | {
        f"model.layers.{j}.self_attn.q_proj.{s}" for j in range(4) for s in suffixes
    }
    assert set(new) == expected
    assert new["model.embed_tokens.weight"] == old["model.embed_tokens.weight"]
    for old_i, new_i in {0: 0, 2: 1, 4: 2, 5: 3}.items():
        for s in suffixes:
            name = "model.layers.{}.self_attn.q_proj." + s
            assert new[name.format(new_i)] == old[name.format(old_i)]
    # Dtypes and metadata survive.
    header, data_start = read_safetensors_header(out / "model.safetensors")
    assert data_start % 8 == 0
    assert header["__metadata__"] == {"format": "pt"}
    assert header["model.layers.1.self_attn.q_proj.qweight"]["dtype"] == "I32"
    assert header["model.layers.1.self_attn.q_proj.scales"]["dtype"] == "F16"

    q = read_config(out)["quantization_config"]
    assert q["modules_to_not_convert"] == ["model.layers.2.mlp.down_proj"]
    assert q["dynamic"] == {"+:model\\.layers\\.3\\.mlp\\..*": {"bits": 8}}
    assert (q["quant_method"], q["bits"], q["group_size"]) == ("gptq", 4, 128)
    assert read_config(out)["num_hidden_layers"] == 4


# ------------------------------------------------------------------------------------------ side files
def test_side_files_model_card_and_plan(tiny_checkpoint: Callable[..., Path], tmp_path: Path):
    src = tiny_checkpoint("llama", tmp_path / "src")
    (src / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    (src / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    (src / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    (src / "README.md").write_text("# the original model card\n")
    (src / "pytorch_model.bin").write_bytes(b"stale weights in another format")
    assert (src / "generation_config.json").is_file()
    out = tmp_path / "out"
    prune_checkpoint(src, plan_1_3(), out_dir=out, base_model="org/tiny-llama", progress=False)

    for name in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"]:
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert not (out / "pytorch_model.bin").exists()

    card = (out / "README.md").read_text()
    assert "original model card" not in card
    assert "base_model: org/tiny-llama" in card
    assert "| 1 |" in card and "| 3 |" in card
    assert "| 0 |" not in card and "| 2 |" not in card
    assert str(KEEP) in card

    saved = LayerPlan.load(out / PLAN_FILE)
    assert saved.remove == (1, 3) and saved.keep == tuple(KEEP)


# ---------------------------------------------------------------------------------------- output safety
def test_existing_output_is_refused_and_untouched(tiny_checkpoint: Callable[..., Path], tmp_path: Path):
    src = tiny_checkpoint("llama", tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep-me.txt").write_text("precious")
    with pytest.raises(OutputExistsError):
        prune_checkpoint(src, plan_1_3(), out_dir=out, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep-me.txt"]
    assert (out / "keep-me.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def _fail_on_second_call(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    real = surgery.rewrite_safetensors
    calls: list[Path] = []

    def flaky(src: Path, dst: Path, *args: Any, **kwargs: Any) -> int:
        calls.append(dst)
        if len(calls) > 1:
            raise RuntimeError("disk on fire")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(surgery, "rewrite_safetensors", flaky)
    return calls


def test_failure_midway_leaves_nothing(
    tiny_checkpoint: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    src = tiny_checkpoint("llama", tmp_path / "src", max_shard_size="40KB")
    calls = _fail_on_second_call(monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk on fire"):
        prune_checkpoint(src, plan_1_3(), out_dir=out, progress=False)
    assert len(calls) == 2 and calls[0].exists() is False  # the first shard was written, then cleaned up
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no .partial folder


def test_failure_midway_keeps_old_output_when_forced(
    tiny_checkpoint: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    src = tiny_checkpoint("llama", tmp_path / "src", max_shard_size="40KB")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    _fail_on_second_call(monkeypatch)
    with pytest.raises(RuntimeError):
        prune_checkpoint(src, plan_1_3(), out_dir=out, force=True, progress=False)
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_force_replaces_existing_output(tiny_checkpoint: Callable[..., Path], tmp_path: Path):
    src = tiny_checkpoint("llama", tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    prune_checkpoint(src, plan_1_3(), out_dir=out, force=True, progress=False)
    assert not (out / "old.txt").exists()
    assert read_config(out)["num_hidden_layers"] == 4
    assert (out / "model.safetensors").is_file() and (out / PLAN_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no .old or .partial left over
    check_logits_match(src, out)


def test_source_is_not_modified(tiny_checkpoint: Callable[..., Path], tmp_path: Path):
    src = tiny_checkpoint("qwen2", tmp_path / "src")
    snapshot = {p.name: p.read_bytes() for p in src.iterdir()}
    prune_checkpoint(src, plan_1_3(), out_dir=tmp_path / "out", progress=False)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == snapshot
    shutil.rmtree(tmp_path / "out")
