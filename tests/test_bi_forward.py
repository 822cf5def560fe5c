"""Block Influence on a real forward pass, for several families: the project's scorer (`score_layers`, and the
`score` entry point that writes scores.json) gives BI_i = 1 − mean over non-padded tokens of cos(X_i, X_i+1),
checked against a reference written here, and padded tokens change nothing.

The reference takes its hidden states from other points than the scorer does: X_0 is the embedding module's
output and X_i+1 layer i's output (the scorer hooks each layer's input instead), the cosine is torch's own in
float64, and the mean is one division over all batches. So a scorer that read the wrong tensor (say the
final-norm output that `output_hidden_states` ends with), counted padding, or averaged per batch would differ.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import words
from tiny import build_tiny_checkpoint, tiny_llama

from shortgpt_deploy.calibration import Batch, CalibrationSet, build_calibration, load_documents
from shortgpt_deploy.importance import score_layers
from shortgpt_deploy.pipeline import score_model
from shortgpt_deploy.recipe import CalibrationSpec, ModelSpec

# Llama-style; Qwen2 with sliding-window layers; Gemma 3 with its scaled embedding, four norms per layer and
# sliding/full layer types (see conftest's tiny configs: the window, 4, is shorter than these sequences).
FAMILIES = ["llama", "qwen2", "gemma3_text"]
TOL = 1e-6
PAD = 0  # the tiny configs' pad_token_id


@pytest.fixture(scope="module", params=FAMILIES)
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoModelForCausalLM

    folder = build_tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param) / "dense", seed=1)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def reference_bi(model: Any, batches: list[Batch]) -> list[float]:
    """1 − Σ cos(X_i,t, X_i+1,t) / (number of non-padded tokens), summed over every batch, from forward hooks
    on the embedding (X_0) and on each decoder layer's output (X_i+1)."""
    body = model.model
    seen: dict[int, torch.Tensor] = {}

    def keep(index: int) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            seen[index] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [body.embed_tokens.register_forward_hook(keep(0))]
    handles += [layer.register_forward_hook(keep(i + 1)) for i, layer in enumerate(body.layers)]
    n = len(body.layers)
    cos_sum, tokens = torch.zeros(n, dtype=torch.float64), 0
    try:
        with torch.no_grad():
            for b in batches:
                model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
                real = b.attention_mask.bool()
                for i in range(n):
                    x, y = seen[i][real].double(), seen[i + 1][real].double()
                    cos_sum[i] += torch.nn.functional.cosine_similarity(x, y, dim=-1).sum()
                tokens += int(real.sum())
    finally:
        for h in handles:
            h.remove()
    return (1.0 - cos_sum / tokens).tolist()


def calib(batches: list[Batch]) -> CalibrationSet:
    rows = sum(b.input_ids.shape[0] for b in batches)
    return CalibrationSet(batches, "test", rows, max(b.input_ids.shape[1] for b in batches), 0, False)


def ids(length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 128, (length,), generator=torch.Generator().manual_seed(seed))


def right_padded(seqs: list[torch.Tensor], fill: torch.Tensor | None = None) -> Batch:
    """Sequences right-padded (as calibration pads them) with PAD, or with `fill`'s ids at the padded places."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), PAD) if fill is None else fill[: len(seqs), :width].clone()
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for row, s in enumerate(seqs):
        input_ids[row, : len(s)], mask[row, : len(s)] = s, 1
    return Batch(input_ids, mask)


def bi(model: Any, batches: list[Batch]) -> list[float]:
    return score_layers(model, calib(batches), metric="bi", progress=False).scores


# --------------------------------------------------------------------------------------------- score_layers
def test_bi_is_one_minus_the_mean_token_cosine_of_every_layer(model):
    # Two batches of unequal widths, padding in both: the mean is over all their real tokens at once.
    batches = [right_padded([ids(16, 0), ids(9, 1), ids(12, 2)]), right_padded([ids(7, 3), ids(11, 4)])]
    got, want = bi(model, batches), reference_bi(model, batches)
    assert len(got) == model.config.num_hidden_layers
    assert got == pytest.approx(want, abs=TOL)
    assert max(want) - min(want) > 1e-3  # the layers differ: equal lists are not trivially equal


def test_padded_tokens_do_not_change_the_scores(model):
    a, b = ids(16, 5), ids(9, 6)
    alone = bi(model, [right_padded([a]), right_padded([b])])  # no padding anywhere
    padded = right_padded([a, b])
    garbage = right_padded([a, b], fill=torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(9)))
    assert bi(model, [padded]) == pytest.approx(alone, abs=TOL)
    assert bi(model, [garbage]) == pytest.approx(alone, abs=TOL)  # whatever the padded places hold
    assert reference_bi(model, [padded]) == pytest.approx(alone, abs=TOL)
    # The check can fail: counting the padded places as tokens does change the scores.
    counted = Batch(garbage.input_ids, torch.ones_like(garbage.attention_mask))
    assert bi(model, [counted]) != pytest.approx(alone, abs=1e-4)


# ------------------------------------------------------------------------------------- the score entry point
def test_the_score_entry_point_writes_the_reference_bi(tmp_path: Path):
    """`shortgpt-deploy score`'s library function, from checkpoint folder and text file to scores.json."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_llama(tmp_path / "llama", num_layers=4, seed=4)
    spec = CalibrationSpec(files=[words(tmp_path / "calib.txt", 800, 3)], samples=6, seq_len=24, batch_size=4)
    out = tmp_path / "scores.json"
    score_model(ModelSpec(path=str(folder)), spec, metric="bi", out=out, progress=False)
    written = json.loads(out.read_text())

    # The same calibration blocks (the BOS choice as recorded), scored by the reference on a fresh model.
    tokenizer = AutoTokenizer.from_pretrained(folder)
    add_bos = written["calibration"]["add_bos"]
    batches = build_calibration(load_documents(spec), tokenizer, spec, add_bos=add_bos, source=spec.source).batches
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert written["metric"] == "bi" and written["num_layers"] == 4
    assert written["scores"] == pytest.approx(reference_bi(reference, batches), abs=TOL)
