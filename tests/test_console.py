"""Console noise: what libraries write (torchao's "Failed to load ... _C_mxfp8" warnings, transformers' "Loading
weights" bar, torch's C++ warnings, GPTQModel's banner and bars) goes to a log file; the console keeps our lines.

The commands run in a subprocess, as a user runs them, so that writes to file descriptors 1 and 2 are real.
"""

import json
import logging
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from tiny import WORDS, tiny_llama

from shortgpt_deploy.errors import ShortGPTError
from shortgpt_deploy.runtime import CONSOLE, third_party_output

ROOT = Path(__file__).parents[1]
# Lines or words only libraries write; none may reach the console.
MARKERS = ("Loading weights", "_C_mxfp8", "torchao", "GPT-QModel", "GPTQModel", "Quantizing", "_pytree.py")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture
def words(tmp_path) -> Path:
    rng = random.Random(0)
    path = tmp_path / "words.txt"
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(4000)))
    return path


def cli(*args, cwd: Path, raw: bool = False) -> tuple[int, str]:
    """Exit code and the console (stdout and stderr together) of `shortgpt-deploy ARGS`; `raw` keeps a bar's "\r"
    as it is (text mode reads it as a new line)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "COLUMNS": "250"}  # this checkout's package; no wrapped lines
    proc = subprocess.run(
        [sys.executable, "-m", "shortgpt_deploy", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=not raw,
        env=env,
        cwd=cwd,
        timeout=300,
    )
    return proc.returncode, proc.stdout.decode() if raw else proc.stdout


def noise(console: str) -> list[str]:
    return [m for m in MARKERS if m in console]


def test_score_keeps_library_output_in_its_log(tmp_path, ckpt, words):
    out = tmp_path / "s" / "scores.json"
    code, console = cli("score", ckpt, "--calibration", words, "--samples", 4, "--seq-len", 32, "--out", out,
                        "--no-progress", cwd=tmp_path)  # fmt: skip
    assert code == 0, console
    assert noise(console) == [], console
    assert "calibration: 4 blocks" in console  # our own INFO records still reach the console
    assert "batch/s" not in console  # --no-progress: no bar at all, ours or transformers'
    # The 6-layer table (12 lines), our calibration line and "wrote ...".
    assert len(console.splitlines()) <= 15, console
    log = (tmp_path / "s" / "scores.log").read_text()
    assert "Loading weights" in log  # transformers' bar was written, to the log
    assert "calibration: 4 blocks" in log  # ours too, so the log reads in order


def test_our_progress_bars_stay_on_the_console(tmp_path, ckpt, words):
    code, console = cli("score", ckpt, "--calibration", words, "--samples", 4, "--seq-len", 32, "--out",
                        tmp_path / "scores.json", cwd=tmp_path)  # fmt: skip
    assert code == 0, console
    assert "calibration: 100%" in console and "batch/s" in console  # our bar
    assert noise(console) == [], console
    assert "Loading weights" in (tmp_path / "scores.log").read_text()


def test_prune_keeps_a_log_beside_its_output(tmp_path, ckpt):
    code, console = cli("prune", ckpt, "--out", tmp_path / "p" / "pruned", "--layers", "1,2", "--no-progress",
                        cwd=tmp_path)  # fmt: skip
    assert code == 0, console
    assert noise(console) == [], console
    assert len(console.splitlines()) <= 8, console  # plan (logged, printed), 2 reasons, surgery, config, wrote
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["pruned", "pruned.log"]
    assert "plan: remove 2 of 6 layers" in (tmp_path / "p" / "pruned.log").read_text()
    code, console = cli("prune", ckpt, "--out", tmp_path / "d" / "pruned", "--layers", "1,2", "--dry-run",
                        cwd=tmp_path)  # fmt: skip
    assert code == 0 and "dry run: nothing written" in console, console
    assert not (tmp_path / "d").exists()  # not even a log: a dry run's goes to the cache


def test_a_failing_command_names_its_log(tmp_path, ckpt):
    (tmp_path / "short.txt").write_text("she was not the one")  # far fewer tokens than 4 blocks of 32 need
    code, console = cli("score", ckpt, "--calibration", tmp_path / "short.txt", "--samples", 4, "--seq-len", 32,
                        "--out", tmp_path / "scores.json", "--no-progress", cwd=tmp_path)  # fmt: skip
    assert code == 2, console
    assert "Traceback" not in console and noise(console) == [], console
    error = [line for line in console.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and error[0].endswith(f"(library output: {tmp_path / 'scores.log'})"), console
    assert "Loading weights" in (tmp_path / "scores.log").read_text()
    assert not (tmp_path / "scores.json").exists()


def test_build_writes_a_log_per_stage(tmp_path, ckpt, words):
    (tmp_path / "heldout.txt").write_text(" ".join(random.Random(1).choice(WORDS) for _ in range(2000)))
    recipe = {
        "model": {"path": str(ckpt)},
        "calibration": {"files": [str(words)], "samples": 4, "seq_len": 32, "batch_size": 2},
        "prune": {"n_remove": 2},
        "output": {"dir": str(tmp_path / "run")},
        "eval": {"text": str(tmp_path / "heldout.txt"), "max_tokens": 256, "context_len": 64, "stride": 64,
                 "greedy_prompts": 2, "greedy_tokens": 4},
    }  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    code, console = cli("build", tmp_path / "recipe.yaml", "--no-progress", cwd=tmp_path)
    assert code == 0, console
    assert noise(console) == [], console
    assert "stage eval" in console
    logs = tmp_path / "run" / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["eval.log", "score.log"]
    for name in ("score.log", "eval.log"):
        assert "Loading weights" in (logs / name).read_text(), name
    assert not list(Path(os.environ["SHORTGPT_CACHE"], "logs").glob("run-score.log"))  # moved into the run
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["eval"]["state"] == "complete"


def test_a_build_prints_one_line_per_stage_then_the_headline(tmp_path, ckpt, words):
    """Without --verbose: a line per stage (our INFO records only in the logs), the headline table, the report's
    path; progress bars vanish when done (leave=False), so a terminal keeps one line per stage."""
    (tmp_path / "heldout.txt").write_text(" ".join(random.Random(1).choice(WORDS) for _ in range(2000)))
    recipe = {
        "model": {"path": str(ckpt)},
        "calibration": {"files": [str(words)], "samples": 4, "seq_len": 32, "batch_size": 2},
        "prune": {"n_remove": 2, "mode": ["delete", "gen"]},
        "output": {"dir": str(tmp_path / "run")},
        "eval": {"text": str(tmp_path / "heldout.txt"), "max_tokens": 256, "context_len": 64, "stride": 64,
                 "greedy_prompts": 2, "greedy_tokens": 4},
    }  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    code, console = cli("build", tmp_path / "recipe.yaml", cwd=tmp_path, raw=True)
    assert code == 0, console
    assert noise(console) == [], console
    lines = [line.split("\r")[-1] for line in console.split("\n")]  # what a terminal keeps of a bar's line
    stages = [line.split()[1:3] for line in lines if line.startswith("stage ")]
    assert stages == [["score", "complete"], ["plan", "complete"], ["prune", "complete"], ["repair", "skipped"],
                      ["quantize", "skipped"], ["eval", "complete"], ["bench", "skipped"]], console  # fmt: skip
    assert "calibration: 4 blocks" not in console and "INFO" not in console, console
    assert "calibration: 4 blocks" in (tmp_path / "run" / "logs" / "score.log").read_text()  # ours, in the log
    assert "eval: pruned" in (tmp_path / "run" / "logs" / "eval.log").read_text()
    assert any("perplexity: " in line for line in console.split("\r"))  # the bars ran...
    assert not any("%|" in line for line in lines), console  # ...and were cleared: no line keeps one
    rows = {line.split()[1]: line.split()[2:] for line in lines if line.startswith("│")}
    assert rows["dense"][:2] == ["│", "6"] and rows["pruned"][:2] == ["│", "4"] and rows["gen"][:2] == ["│", "6"]
    ppl = json.loads((tmp_path / "run" / "eval.json").read_text())["perplexity"]["pruned"]["perplexity"]
    assert f"{ppl:.2f}" in rows["pruned"], console
    assert f"report: {tmp_path / 'run' / 'report.md'}" in lines and (tmp_path / "run" / "report.md").is_file()
    assert len(lines) <= 25, console
    code, verbose = cli("build", tmp_path / "recipe.yaml", "--force", "--verbose", "--no-progress", cwd=tmp_path)
    assert code == 0 and "calibration: 4 blocks" in verbose and noise(verbose) == [], verbose


def test_gptq_output_goes_to_the_log(tmp_path, ckpt, words):
    pytest.importorskip("gptqmodel")
    # target gpu: the tiny model's widths (16, 32) are below what vLLM's CPU kernel takes; GPTQ itself runs here.
    code, console = cli("quantize", ckpt, "--out", tmp_path / "q", "--calibration", words, "--samples", 16,
                        "--seq-len", 64, "--target", "gpu", cwd=tmp_path)  # fmt: skip
    assert code == 0, console
    assert noise(console) == [], console
    assert len(console.splitlines()) <= 6, console  # scheme, group size, calibration, done, the summary
    log = (tmp_path / "q.log").read_text()
    assert "GPT-QModel" in log and "Quantizing" in log
    assert not (tmp_path / "logs").exists()  # GPTQModel's own log folder went into the checkpoint, then away


def test_capture_routes_every_channel(tmp_path, capfd):
    """In-process: raw descriptor writes, library loggers and warnings go to the log, CONSOLE does not; a project
    error leaving the block names the log. (print() lands in the log through descriptor 1 when sys.stdout is
    descriptor 1, as in a CLI process; under pytest it is not, so the subprocess tests cover that.)"""
    log = tmp_path / "x.log"
    capfd.readouterr()
    with pytest.raises(ShortGPTError) as info, third_party_output(log):
        os.write(1, b"raw stdout from C\n")
        os.write(2, b"raw stderr from C\n")
        logging.getLogger("torchao").warning("Failed to load _C_mxfp8.so")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("a library warning", UserWarning, stacklevel=1)
        CONSOLE.write("ours\n")
        raise ShortGPTError("boom")
    assert info.value.log_path == log
    text = log.read_text()
    for line in ("raw stdout from C", "raw stderr from C", "_C_mxfp8", "a library warning"):
        assert line in text, line
    out, err = capfd.readouterr()
    assert "ours" in err and "from C" not in out + err and "_C_mxfp8" not in out + err


def test_an_empty_log_is_removed(tmp_path):
    with third_party_output(tmp_path / "quiet.log"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_a_log_that_cannot_be_written_is_one_clear_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ShortGPTError, match=r"cannot write the log file .*file/x.log: .*choose an output path"):
        with third_party_output(tmp_path / "file" / "x.log"):
            pytest.fail("ran without a log")


def test_a_failed_stage_names_its_log(tmp_path, ckpt, words):
    recipe = {
        "model": {"path": str(ckpt)},
        "calibration": {"files": [str(words)], "samples": 4, "seq_len": 32, "batch_size": 2},
        "prune": {"n_remove": 2},
        "output": {"dir": str(tmp_path / "run")},
        "eval": {"text": str(tmp_path / "missing.txt"), "max_tokens": 256, "context_len": 64, "stride": 64},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    code, console = cli("build", tmp_path / "recipe.yaml", "--no-progress", cwd=tmp_path)
    assert code == 2, console
    logs = tmp_path / "run" / "logs"
    assert "stage eval failed: " in console and f"(library output: {logs / 'eval.log'})" in console, console
    assert console.rstrip().endswith(f"and {logs}/."), console  # the build's error line names the folder
    assert "Loading weights" in (logs / "eval.log").read_text()
