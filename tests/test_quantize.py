"""GPTQ after pruning: scheme choice (the CPU kernel probe both ways), early errors, and a real run (slow)."""

import json
import os
import random
import sys
from pathlib import Path

import pytest
from tiny import WORDS, tiny_llama

from shortgpt_deploy import quantize
from shortgpt_deploy.errors import OutputExistsError, ShortGPTError
from shortgpt_deploy.quantize import (
    MissingDependencyError,
    QuantizeError,
    SchemeError,
    UnservableSchemeError,
    check_cpu_shapes,
    choose_scheme,
    fit_group_size,
    layer_linear_shapes,
    parse_scheme,
    quantize_checkpoint,
)
from shortgpt_deploy.recipe import CalibrationSpec


def machine(monkeypatch, *, gpu: bool = False, int4_kernel: bool = True) -> None:
    """Pretend to be a GPU machine, an AVX-512 CPU (vLLM has cpu_gemm_wna16) or an AVX2 one (it has not)."""
    monkeypatch.setattr(quantize, "on_gpu", lambda: gpu)
    monkeypatch.setattr(quantize, "cpu_has_int4_kernel", lambda: int4_kernel)


def word_text(path: Path, n_words: int = 4000) -> Path:
    rng = random.Random(0)
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(n_words)))
    return path


@pytest.fixture
def tiny(tmp_path) -> Path:
    return tiny_llama(tmp_path / "src", num_layers=4, hidden_size=128, num_heads=4)


def test_scheme_names():
    assert parse_scheme("auto") == "auto"
    assert parse_scheme(" W4A16 ") == "w4a16"
    with pytest.raises(SchemeError, match=r"unknown quantization scheme 'w3a16'; known: auto, w4a16, w8a16"):
        parse_scheme("w3a16")
    with pytest.raises(SchemeError, match="weight-only.*compressed-tensors.*llm-compressor"):
        parse_scheme("w8a8")
    with pytest.raises(SchemeError, match="unknown serving target 'tpu'"):
        choose_scheme("auto", target="tpu")


def test_auto_on_a_cpu_with_the_4bit_kernel(monkeypatch):
    machine(monkeypatch, int4_kernel=True)
    scheme, target = choose_scheme("auto")
    assert (scheme.name, scheme.bits, scheme.group_size, target) == ("w4a16", 4, 128, "cpu")


def test_auto_on_a_cpu_without_it_says_what_to_do(monkeypatch):
    machine(monkeypatch, int4_kernel=False)
    with pytest.raises(UnservableSchemeError, match="cpu_gemm_wna16.*AVX-512") as err:
        choose_scheme("auto")
    assert "unquantized" in str(err.value) and "target=gpu" in str(err.value)


def test_auto_on_a_gpu_does_not_probe_the_cpu_kernel(monkeypatch):
    machine(monkeypatch, gpu=True)
    monkeypatch.setattr(quantize, "cpu_has_int4_kernel", lambda: pytest.fail("probed the CPU kernel on a GPU"))
    assert choose_scheme("auto")[0].name == "w4a16"
    assert choose_scheme("w8a16") == (quantize.SCHEMES["w8a16"], "gpu")


def test_explicit_scheme_the_target_cannot_serve(monkeypatch):
    machine(monkeypatch, int4_kernel=False)
    with pytest.raises(UnservableSchemeError, match="w4a16 cannot be served on cpu.*serve the unquantized"):
        choose_scheme("w4a16")
    machine(monkeypatch, int4_kernel=True)
    with pytest.raises(UnservableSchemeError, match="no 8-bit GPTQ kernel.*use scheme w4a16"):
        choose_scheme("w8a16")
    # Quantizing here for a GPU machine is allowed whatever this CPU has.
    assert choose_scheme("w8a16", target="gpu")[1] == "gpu"
    assert issubclass(UnservableSchemeError, ShortGPTError)


def test_group_size_divides_every_input_width():
    assert fit_group_size([128, 256], 128) == 128
    assert fit_group_size([576, 1536], 128) == 64  # SmolLM2: 576 / 128 is not whole, and vLLM would refuse it
    assert fit_group_size([576], 32) == 32
    assert fit_group_size([48, 96], 128) == -1  # per channel


def test_layer_shapes_from_the_headers(tiny):
    shapes = layer_linear_shapes(tiny)
    assert len(shapes) == 4 * 7  # q k v o gate up down in each layer; norms, embeddings, LM head excluded
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (256, 128)
    assert shapes["model.layers.3.self_attn.k_proj.weight"] == (128, 64)
    check_cpu_shapes(shapes)
    with pytest.raises(UnservableSchemeError, match="multiples of 32.*in 16, out 8"):
        check_cpu_shapes({"x.weight": (16, 8)})


def test_missing_gptq_library_names_the_extra(tiny, tmp_path, monkeypatch):
    machine(monkeypatch)
    monkeypatch.setitem(sys.modules, "gptqmodel", None)  # `import gptqmodel` raises ImportError
    monkeypatch.setenv("GPTQMODEL_CPU_WORKERS", "")  # restored after the test...
    monkeypatch.delenv("GPTQMODEL_CPU_WORKERS")  # ...and unset during it
    out = tmp_path / "q"
    with pytest.raises(MissingDependencyError, match=r"pip install 'shortgpt-deploy\[gptq\]'"):
        quantize_checkpoint(tiny, out_dir=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no partial folder
    # GPTQModel 7.6.0 fails with fewer than 2 CPU workers, its default on a 2-core machine.
    assert int(os.environ["GPTQMODEL_CPU_WORKERS"]) >= 2


def test_existing_output_is_refused_before_any_work(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(quantize, "choose_scheme", lambda *a, **k: pytest.fail("got past the output check"))
    out = tmp_path / "q"
    out.mkdir()
    with pytest.raises(OutputExistsError, match="already exists.*--force"):
        quantize_checkpoint(tiny, out_dir=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "src"]


def test_unservable_scheme_fails_before_the_gptq_import(tiny, tmp_path, monkeypatch):
    machine(monkeypatch, int4_kernel=False)
    monkeypatch.setattr(quantize, "import_gptqmodel", lambda: pytest.fail("imported GPTQModel"))
    with pytest.raises(UnservableSchemeError):
        quantize_checkpoint(tiny, out_dir=tmp_path / "q", scheme="w4a16")
    assert not (tmp_path / "q").exists()


def test_already_quantized_source(tiny, tmp_path):
    config = json.loads((tiny / "config.json").read_text())
    (tiny / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(QuantizeError, match="already quantized"):
        quantize_checkpoint(tiny, out_dir=tmp_path / "q")


@pytest.mark.slow
def test_gptq_of_a_tiny_model_end_to_end(tiny, tmp_path, monkeypatch, capsys):
    try:
        import gptqmodel  # noqa: F401
    except ImportError as err:
        pytest.skip(f"GPTQModel is not importable ({err}); install it with: pip install 'shortgpt-deploy[gptq]'")
    from safetensors import safe_open

    machine(monkeypatch, int4_kernel=True)
    monkeypatch.chdir(tmp_path)  # GPTQModel writes logs/ into the working directory unless told otherwise
    calib = CalibrationSpec(files=[word_text(tmp_path / "words.txt")], samples=16, seq_len=64, batch_size=4)
    out = tmp_path / "q"
    capsys.readouterr()  # what importing GPTQModel above printed
    result = quantize_checkpoint(tiny, out_dir=out, calibration=calib)
    assert capsys.readouterr().out == ""  # GPTQModel's chatter goes to stderr: stdout is the caller's (--json)

    assert (result.scheme, result.bits, result.group_size, result.target) == ("w4a16", 4, 128, "cpu")
    assert result.calibration["samples"] == 16 and result.producer.startswith("gptqmodel ")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {k: qc[k] for k in ("quant_method", "bits", "group_size", "sym", "desc_act")} == {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": 128,
        "sym": True,
        "desc_act": False,
    }
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
    for kind in ("qweight", "qzeros", "scales"):
        assert len([n for n in names if n.endswith("." + kind)]) == 4 * 7, kind
    assert "model.layers.0.mlp.down_proj.weight" not in names
    # Everything but weights and config comes from the source untouched.
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (tiny / name).read_bytes(), name
    assert "## Quantization" in (out / "README.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "src", "words.txt"]


def test_model_dir_without_config_json(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShortGPTError, match=r"empty is not a model folder \(no config.json\)"):
        quantize_checkpoint(tmp_path / "empty", out_dir=tmp_path / "q")
    assert not (tmp_path / "q").exists()


@pytest.mark.slow
def test_gptq_folder_loads_dequantized_quietly(tiny, tmp_path, monkeypatch, capsys):
    """modeling.load_model reads a GPTQ folder through GPTQModel into float layers, printing nothing on stdout."""
    pytest.importorskip("gptqmodel")
    import torch

    from shortgpt_deploy.modeling import load_model

    machine(monkeypatch, int4_kernel=True)
    monkeypatch.chdir(tmp_path)
    calib = CalibrationSpec(files=[word_text(tmp_path / "words.txt")], samples=16, seq_len=64, batch_size=4)
    quantize_checkpoint(tiny, out_dir=tmp_path / "q", calibration=calib)
    capsys.readouterr()
    model, _ = load_model(tmp_path / "q")
    assert capsys.readouterr().out == ""  # stdout belongs to `eval --json`
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 4 * 7 + 1 and all(m.weight.dtype == torch.float32 for m in linears)
    float_model, _ = load_model(tiny)
    ids = torch.tensor([[5, 9, 13, 7, 21, 4]])
    with torch.inference_mode():
        diff = (model(ids).logits - float_model(ids).logits).abs().max()
    assert 0 < diff < 1.0  # quantized: close to the float model, not identical


@pytest.mark.parametrize(("gpu", "native_bf16", "expected"), [(True, False, "bfloat16"), (False, True, "bfloat16"),
                                                             (False, False, "float32")])  # fmt: skip
def test_gptq_runs_in_float32_where_bf16_math_is_emulated(monkeypatch, gpu, native_bf16, expected):
    import torch

    monkeypatch.setattr(quantize, "on_gpu", lambda: gpu)
    monkeypatch.setattr(quantize, "cpu_has_native_bf16", lambda: native_bf16)
    assert quantize.gptq_dtype() == getattr(torch, expected)
