"""Damaged checkpoints, a full disk and concurrent writers: `prune` ends in one line naming the file and the
problem, exit code 2, and the output folder's parent holds nothing new (no output, no .partial or .old folder)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file, save_file
from tiny import tiny_llama
from typer.testing import CliRunner

import shortgpt_deploy.surgery as surgery
from shortgpt_deploy.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("pristine") / "llama")


@pytest.fixture
def src(pristine: Path, tmp_path: Path) -> Path:
    """A fresh copy of the tiny checkpoint, to damage; outputs go to tmp_path / "work"."""
    (tmp_path / "work").mkdir()
    return Path(shutil.copytree(pristine, tmp_path / "src"))


def prune(src: Path, out: Path, *extra: str) -> tuple[int, str]:
    result = runner.invoke(app, ["prune", str(src), "--out", str(out), "--layers", "2,3", "--no-progress", *extra])
    return result.exit_code, result.output


def refused(src: Path, out: Path, *extra: str, before: set[str] | None = None) -> str:
    """Run prune, check it failed cleanly, and return its one error line."""
    before = set(os.listdir(out.parent)) if before is None else before
    code, output = prune(src, out, *extra)
    assert code == 2, output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    # Only the command's log may stay (the libraries' output, kept for the post-mortem), and the error names it.
    log = out.name + ".log"
    assert set(os.listdir(out.parent)) - {log} == before, "something was left behind"
    if log in os.listdir(out.parent):
        assert log in " ".join(output.split()), output
    return errors[0]


def rewrite_tensors(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


# ---------------------------------------------------------------------------------- tensors of a kept layer
def test_missing_tensor_of_a_kept_layer_is_refused(src: Path, tmp_path: Path):
    rewrite_tensors(src / "model.safetensors", lambda t: t.pop("model.layers.4.mlp.down_proj.weight"))
    line = refused(src, tmp_path / "work" / "out")
    assert "model.layers.4.mlp.down_proj.weight is missing" in line
    assert str(src) in line


def test_missing_tensor_of_a_removed_layer_is_fine(src: Path, tmp_path: Path):
    rewrite_tensors(src / "model.safetensors", lambda t: t.pop("model.layers.3.mlp.down_proj.weight"))
    code, output = prune(src, tmp_path / "work" / "out")
    assert code == 0, output


def test_tensor_of_another_shape_is_refused(src: Path, tmp_path: Path):
    def narrow(t: dict[str, Any]) -> None:
        t["model.layers.1.self_attn.q_proj.weight"] = t["model.layers.1.self_attn.q_proj.weight"][:8].clone()

    rewrite_tensors(src / "model.safetensors", narrow)
    line = refused(src, tmp_path / "work" / "out")
    assert "model.layers.1.self_attn.q_proj.weight has shape [8, 32]" in line


# ------------------------------------------------------------------------------------- damaged files
def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 100)


def garbage_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[9:21] = b"\xff" * 12
    path.write_bytes(bytes(data))


def garbage_prefix(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2**60) + data[8:])


def trailing_bytes(path: Path) -> None:
    with path.open("ab") as f:
        f.write(b"\0" * 16)


def tiny_file(path: Path) -> None:
    path.write_bytes(b"\x01\x02")


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (truncate, "truncated: the header needs"),
        (garbage_header, "header is not valid JSON"),
        (garbage_prefix, "header length prefix says 1152921504606846976 bytes"),
        (trailing_bytes, "16 bytes after the last tensor"),
        (tiny_file, "too short for the 8-byte header length"),
    ],
)
def test_damaged_safetensors_is_refused(src: Path, tmp_path: Path, damage: Callable[[Path], None], problem: str):
    damage(src / "model.safetensors")
    line = refused(src, tmp_path / "work" / "out")
    assert f"{src / 'model.safetensors'} is not a valid safetensors file" in line
    assert problem in line


@pytest.mark.parametrize("damage", [truncate, garbage_header, garbage_prefix], ids=["truncated", "header", "prefix"])
def test_damaged_safetensors_is_one_line_when_a_model_loads(src: Path, tmp_path: Path, damage: Callable[[Path], None]):
    damage(src / "model.safetensors")
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(["she was not the one to think of it"] * 100))
    args = ["score", str(src), "--calibration", str(text), "--out", str(tmp_path / "s.json"), "--samples", "2",
            "--seq-len", "16", "--no-progress"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    (line,) = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert f"{src / 'model.safetensors'} is not a valid safetensors file" in " ".join(result.output.split())
    assert not (tmp_path / "s.json").exists()


def test_invalid_config_is_refused(src: Path, tmp_path: Path):
    (src / "config.json").write_text('{"num_hidden_layers": 6,, }')
    line = refused(src, tmp_path / "work" / "out")
    assert f"{src / 'config.json'} is not valid JSON" in line


def test_invalid_shard_index_is_refused(src: Path, tmp_path: Path):
    (src / surgery.WEIGHTS_INDEX).write_text("{")
    line = refused(src, tmp_path / "work" / "out")
    assert f"{src / surgery.WEIGHTS_INDEX} is not valid JSON" in line


# ------------------------------------------------------------------------------------------ writing it
def test_full_disk_leaves_nothing(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def full(*args: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(surgery, "_copy_range", full)
    out = tmp_path / "work" / "out"
    line = refused(src, out)
    assert f"no space left on the device while writing {out}" in line


def test_full_disk_is_not_hidden_by_the_buffered_fallback(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """copy_file_range failing for lack of space must not fall back to a plain copy (that only fails later)."""

    def full(*args: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "copy_file_range", full)
    line = refused(src, tmp_path / "work" / "out")
    assert "no space left on the device" in line


def test_force_onto_a_file_is_refused_up_front(src: Path, tmp_path: Path):
    out = tmp_path / "work" / "out"
    out.write_text("not a folder")
    line = refused(src, out, "--force")
    assert f"{out} exists and is not a folder" in line
    assert out.read_text() == "not a folder"


def appears_meanwhile(monkeypatch: pytest.MonkeyPatch, out: Path) -> None:
    """Another writer finishes `out` while this one copies tensors."""
    real = surgery.rewrite_safetensors

    def racing(*args: Any, **kwargs: Any) -> int:
        out.mkdir()
        (out / "theirs.txt").write_text("the other command's output")
        return real(*args, **kwargs)

    monkeypatch.setattr(surgery, "rewrite_safetensors", racing)


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "mkdir-fallback"])
def test_concurrent_writer_is_not_replaced(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, renameat2: bool):
    import shortgpt_deploy.checkpoint as checkpoint

    if not renameat2:
        monkeypatch.setattr(checkpoint, "_renameat2", lambda: None)
    out = tmp_path / "work" / "out"
    appears_meanwhile(monkeypatch, out)
    line = refused(src, out, before={"out"})
    assert f"{out} appeared while this command was writing it" in line
    assert os.listdir(out) == ["theirs.txt"]


def test_concurrent_writer_is_replaced_with_force(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    out = tmp_path / "work" / "out"
    appears_meanwhile(monkeypatch, out)
    code, output = prune(src, out, "--force")
    assert code == 0, output
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    assert not (out / "theirs.txt").exists()
    assert sorted(os.listdir(out.parent)) == ["out", "out.log"]


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "mkdir-fallback"])
def test_rename_noreplace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, renameat2: bool):
    import shortgpt_deploy.checkpoint as checkpoint

    if not renameat2:
        monkeypatch.setattr(checkpoint, "_renameat2", lambda: None)
    elif checkpoint._renameat2() is None:
        pytest.skip("no renameat2 in this C library")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_text("a")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileExistsError):
        checkpoint.rename_noreplace(tmp_path / "a", tmp_path / "empty")  # even an empty folder is not replaced
    checkpoint.rename_noreplace(tmp_path / "a", tmp_path / "b")
    assert sorted(os.listdir(tmp_path)) == ["b", "empty"]
    assert (tmp_path / "b" / "f").read_text() == "a"


def test_full_disk_during_build_leaves_nothing(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import yaml

    import shortgpt_deploy.pipeline as pipeline

    text = tmp_path / "text.txt"
    text.write_text(("she was not the one to think of it and he had said so . " * 60).strip())
    run_dir = tmp_path / "work" / "run"
    recipe = {
        "model": {"path": str(src)},
        "calibration": {"files": [str(text)], "samples": 2, "seq_len": 16, "batch_size": 2},
        "prune": {"layers": [2, 3]},
        "output": {"dir": str(run_dir)},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pipeline.RunDir, "save_plan", full)  # the disk fills while the run folder is written
    result = runner.invoke(app, ["build", str(tmp_path / "recipe.yaml"), "--no-progress"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    log = Path(os.environ["SHORTGPT_CACHE"]) / "logs" / "run-score.log"  # a build with no run folder logs here
    assert errors == [
        f"error: no space left on the device while writing {run_dir}; free some space or choose "
        f"another output folder (nothing was written) (library output: {log})"
    ], result.output
    assert log.is_file()
    assert os.listdir(run_dir.parent) == []


def test_missing_shard_is_refused(tiny_checkpoint: Callable[..., Path], tmp_path: Path):
    src = tiny_checkpoint("llama", tmp_path / "src", max_shard_size="40KB")
    shard = sorted(src.glob("*.safetensors"))[-1]
    shard.unlink()
    (tmp_path / "work").mkdir()
    line = refused(src, tmp_path / "work" / "out")
    assert f"{shard} is missing" in line


def test_layers_the_config_sets_apart_may_differ():
    """A dense first layer among MoE layers (first_k_dense_replace, mlp_only_layers) is not a missing tensor."""
    from shortgpt_deploy.checkpoint import check_layer_tensors
    from shortgpt_deploy.errors import CheckpointError

    def entry(shape: list[int]) -> dict[str, Any]:
        return {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}

    header = {f"model.layers.{i}.self_attn.q_proj.weight": entry([4, 4]) for i in range(4)}
    header["model.layers.0.mlp.down_proj.weight"] = entry([4, 8])
    for i in (1, 2, 3):
        header[f"model.layers.{i}.mlp.experts.0.down_proj.weight"] = entry([4, 8])
    headers = {Path("model.safetensors"): header}
    for special in ({"first_k_dense_replace": 1}, {"mlp_only_layers": [0]}):
        check_layer_tensors(Path("m"), headers, "model.layers.", {"num_hidden_layers": 4, **special}, [0, 1, 2, 3])
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.experts\.0\.down_proj\.weight is missing"):
        check_layer_tensors(Path("m"), headers, "model.layers.", {"num_hidden_layers": 4}, [0, 1, 2, 3])
