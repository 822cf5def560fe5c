"""Layer-streamed scoring (streaming.py): the same scores as the in-memory pass for every tiny family (dense, MoE,
state-space and hybrid), sharded or not; the automatic choice; `score --stream`; `analyze --what metrics`
streamed; sources it refuses; a layer its checkpoint tensors do not fill."""

import json
import logging

import pytest
import torch
from helpers import run, words
from tiny import FAMILIES, MOE_FAMILIES, SSM_FAMILIES, tiny_llama, tiny_tokenizer

from shortgpt_deploy import runtime, streaming
from shortgpt_deploy.calibration import Batch, CalibrationSet
from shortgpt_deploy.errors import ModelLoadError, PlanError
from shortgpt_deploy.importance import score_layers
from shortgpt_deploy.recipe import PruneSpec


def load_model(folder, dtype="float32"):
    """The whole model in memory, as modeling.load_model loads it (tiny_checkpoint folders have no tokenizer)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval(), None


def flat(rows):
    return [v for row in rows for v in row]


def calibration() -> CalibrationSet:
    """Two batches, the second with padding: masked tokens must not count, in either path."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (2, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    batches = [Batch(ids, mask), Batch(ids.flip(1), mask.flip(0))]
    return CalibrationSet(batches, "test", 4, 16, 0, False)


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("family", streaming.STREAMED_FAMILIES)
def test_streamed_scores_equal_the_in_memory_ones(family, sharded, tiny_checkpoint, tmp_path):
    folder = tiny_checkpoint(family, tmp_path / family, max_shard_size="20KB" if sharded else None)
    assert (folder / "model.safetensors.index.json").is_file() == sharded
    model, _ = load_model(folder)
    cal = calibration()
    dense = score_layers(model, cal, metric="angular", progress=False)
    streamed = streaming.score_streamed(folder, cal, metric="angular", progress=False)
    assert set(streamed.all_metrics) == set(dense.all_metrics)
    for name, values in dense.all_metrics.items():
        assert streamed.all_metrics[name] == pytest.approx(values, abs=1e-5), name
    assert flat(streamed.angular_distance) == pytest.approx(flat(dense.angular_distance), abs=1e-5)
    assert streamed.removal_order == dense.removal_order
    assert len(set(streamed.all_metrics["bi"])) == 6  # every layer scored, not a copy of one


@pytest.mark.parametrize("family", ["llama", "mixtral", "mamba", "mamba2"])
def test_streaming_in_bfloat16_matches_the_in_memory_bfloat16_pass(family, tiny_checkpoint, tmp_path):
    """Mamba's layers return a float32 residual stream from bfloat16 inputs: it stays float32, as in memory."""
    folder = tiny_checkpoint(family, tmp_path / family)
    model, _ = load_model(folder, dtype="bfloat16")
    cal = calibration()
    dense = score_layers(model, cal, metric="bi", progress=False)
    streamed = streaming.score_streamed(folder, cal, metric="bi", dtype="bfloat16", progress=False)
    assert streamed.scores == pytest.approx(dense.scores, abs=1e-5)


def test_hidden_states_go_to_a_scratch_file_when_memory_is_short(tiny_checkpoint, tmp_path, monkeypatch):
    folder = tiny_checkpoint("qwen3", tmp_path / "qwen3")
    cal = calibration()
    in_ram = streaming.score_streamed(folder, cal, metric="angular", progress=False)
    made = []
    real_init = streaming._Scratch.__init__

    def spy(self, *a, **k):
        real_init(self, *a, **k)
        made.append(self.path)

    monkeypatch.setattr(runtime, "available_memory_bytes", lambda device: 1024)
    monkeypatch.setattr(streaming._Scratch, "__init__", spy)
    on_disk = streaming.score_streamed(folder, cal, metric="angular", progress=False)
    assert made and made[0] is not None and not made[0].exists()  # a scratch file, removed afterwards
    assert flat(on_disk.angular_distance) == pytest.approx(flat(in_ram.angular_distance), abs=1e-6)


def test_auto_streams_only_when_the_weights_do_not_fit(tiny_checkpoint, tmp_path, monkeypatch, caplog):
    folder = tiny_checkpoint("llama", tmp_path / "llama")
    size = streaming.weights_bytes(folder, "float32")
    n_params = sum(p.numel() for p in load_model(folder)[0].parameters())
    assert size == 4 * n_params
    assert streaming.weights_bytes(folder, "bfloat16") == size // 2
    prune = PruneSpec(metric="bi", n_remove=1)
    caplog.set_level(logging.INFO, logger="shortgpt_deploy.streaming")
    monkeypatch.setattr(runtime, "available_memory_bytes", lambda device: 100 * size)
    assert not streaming.should_stream(folder, "float32", prune)
    assert "scoring in memory" in caplog.text
    monkeypatch.setattr(runtime, "available_memory_bytes", lambda device: size)  # fits, not with load's copy
    assert streaming.should_stream(folder, "float32", prune)
    assert "scoring layer by layer" in caplog.text
    assert not streaming.should_stream(folder, "float32", PruneSpec(metric="bi", n_remove=1, stream="off"))
    # what cannot be streamed is loaded anyway when auto, and refused when forced
    assert not streaming.should_stream(folder, "float32", PruneSpec(metric="bi", n_remove=2, iterative=True))
    assert "streaming is not possible" in caplog.text
    with pytest.raises(PlanError, match="iterative re-scoring"):
        streaming.should_stream(folder, "float32", PruneSpec(metric="bi", n_remove=2, iterative=True, stream="on"))
    with pytest.raises(PlanError, match="ppl_greedy re-runs the whole model"):
        streaming.should_stream(folder, "float32", PruneSpec(metric="ppl_greedy", n_remove=2, stream="on"))


def test_gptq_sources_are_refused_with_the_reason(tiny_checkpoint, tmp_path):
    folder = tiny_checkpoint("llama", tmp_path / "llama")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(PlanError, match="GPTQ checkpoint's layers are packed 4-bit"):
        streaming.should_stream(folder, "float32", PruneSpec(metric="bi", n_remove=1, stream="on"))


def test_every_tiny_family_is_streamed():
    """MoE (experts fused, routers renamed at load time) and state-space/hybrid families included."""
    assert set(FAMILIES) <= set(streaming.STREAMED_FAMILIES)
    assert set(MOE_FAMILIES) | set(SSM_FAMILIES) <= set(streaming.STREAMED_FAMILIES)


def test_a_family_outside_the_streamed_ones_is_scored_in_memory(tiny_checkpoint, tmp_path, monkeypatch, caplog):
    """Refused with the reason when forced, loaded whole (with the reason) when auto finds the weights too big."""
    folder = tiny_checkpoint("mixtral", tmp_path / "mixtral")
    monkeypatch.setattr(streaming, "STREAMED_FAMILIES", ("llama",))
    with pytest.raises(PlanError, match="not mixtral; score it in memory .stream: off"):
        streaming.should_stream(folder, "float32", PruneSpec(metric="bi", n_remove=1, stream="on"))
    monkeypatch.setattr(runtime, "available_memory_bytes", lambda device: 1)
    caplog.set_level(logging.WARNING, logger="shortgpt_deploy.streaming")
    assert not streaming.should_stream(folder, "float32", PruneSpec(metric="bi", n_remove=1))
    assert "streaming is not possible" in caplog.text


def test_a_layer_its_checkpoint_tensors_do_not_fill_is_an_error_naming_it(tiny_checkpoint, tmp_path):
    """An expert missing from layer 2's tensors: the fused experts cannot be built, and no garbage is scored."""
    from safetensors.torch import load_file, save_file

    folder = tiny_checkpoint("mixtral", tmp_path / "mixtral")
    state = load_file(folder / "model.safetensors")
    dropped = [k for k in state if k.startswith("model.layers.2.") and ".experts.1." in k]
    assert dropped
    save_file({k: v for k, v in state.items() if k not in dropped}, folder / "model.safetensors", {"format": "pt"})
    with pytest.raises(ModelLoadError, match="layer 2 of the checkpoint does not fill MixtralDecoderLayer"):
        streaming.score_streamed(folder, calibration(), metric="bi", progress=False)


def test_recipe_stream_field_is_strict():
    assert PruneSpec(metric="bi", n_remove=1).stream == "auto"
    with pytest.raises(ValueError, match="stream"):
        PruneSpec(metric="bi", n_remove=1, stream="yes")


@pytest.fixture
def text_llama(tmp_path):
    folder = tiny_llama(tmp_path / "llama", num_layers=4, seed=1)
    tiny_tokenizer().save_pretrained(folder)
    return folder, words(tmp_path / "text.txt", 3000, seed=0)


def test_score_cli_stream_writes_the_in_memory_scores(text_llama, tmp_path, monkeypatch):
    folder, text = text_llama
    common = ("--calibration", text, "--samples", 4, "--seq-len", 32, "--batch-size", 2, "--metric", "angular")
    code, output = run("score", folder, *common, "--no-stream", "--out", tmp_path / "dense.json")
    assert code == 0, output
    called = []
    real = streaming.stream_stats
    monkeypatch.setattr(streaming, "stream_stats", lambda *a, **k: called.append(1) or real(*a, **k))
    code, output = run("score", folder, *common, "--stream", "--out", tmp_path / "streamed.json")
    assert code == 0, output
    assert called == [1]
    dense, streamed = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("dense", "streamed"))
    assert streamed["scores"] == pytest.approx(dense["scores"], abs=1e-5)
    assert flat(streamed["angular_distance"]) == pytest.approx(flat(dense["angular_distance"]), abs=1e-5)
    assert streamed["calibration"] == dense["calibration"]


def test_score_cli_stream_refuses_a_greedy_metric(text_llama, tmp_path):
    folder, text = text_llama
    code, output = run("score", folder, "--calibration", text, "--metric", "ppl_greedy", "--stream")
    assert code != 0 and "re-runs the whole model" in " ".join(output.split()), output


def test_analyze_metrics_streams_when_the_model_does_not_fit(text_llama, tmp_path, monkeypatch):
    from shortgpt_deploy import modeling

    folder, text = text_llama
    args = ("analyze", folder, "--what", "metrics", "--calibration", text, "--samples", 4, "--seq-len", 32)
    code, output = run(*args, "--out", tmp_path / "dense")
    assert code == 0, output
    monkeypatch.setattr(runtime, "available_memory_bytes", lambda device: 1)  # nothing fits: stream
    monkeypatch.setattr(modeling, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code, output = run(*args, "--out", tmp_path / "streamed")
    assert code == 0, output
    dense, streamed = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("dense", "streamed"))
    for name, values in dense["raw"].items():
        assert streamed["raw"][name] == pytest.approx(values, abs=1e-5), name
