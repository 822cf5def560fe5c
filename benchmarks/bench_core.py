#!/usr/bin/env python
"""Core benchmarks (`make bench-core`): scoring speed and memory, surgery throughput, as ratios from one run.

Each number is a ratio against a baseline measured side by side in the same run, because absolute times on a
shared 2-core CPU box drift by tens of percent from one minute to the next:

1. score wall time ÷ a plain forward pass over the same calibration batches (and ÷ the decoder body alone,
   since scoring skips the LM head); repetitions interleaved, medians compared.
2. score's peak RSS ÷ model bytes, in a fresh subprocess, with the RSS after importing torch/transformers and
   just before loading the model, so library overhead can be told apart.
3. surgery (prune_checkpoint, fresh subprocess) read throughput ÷ `cp` of the same safetensors file(s),
   interleaved, files warm in the page cache; plus surgery's peak RSS.

The subprocess measurements run first, while this process is still small: on Linux a child's ru_maxrss starts
from its parent's RSS at fork time, so spawning them after loading the model here would inflate them.

Usage: .venv/bin/python benchmarks/bench_core.py [--append BENCHMARKS.md] [--reps 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import importlib.metadata
import json
import os
import platform
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = REPO / "recipes" / "default.yaml"
# 8 of 30 layers (the default recipe's 25%), none of them the protected first and last layer.
DEFAULT_REMOVE = [21, 22, 23, 24, 25, 26, 27, 28]
MB = 1e6

SCORE_TIME_TARGET = 1.15  # score ÷ plain forward, at most
SCORE_RSS_TARGET = 1.3  # score's peak RSS ÷ model bytes, at most
SURGERY_THROUGHPUT_TARGET = 0.5  # surgery ÷ cp read throughput, at least
# A batch's timings count as quiet when other processes used at most this share of the box's CPU meanwhile.
QUIET_SHARE = 0.10

INTRO = """# Benchmarks

Measurements of shortgpt-deploy's core stages, appended one section per run by the `make bench-*` targets
(`make bench-core`: `benchmarks/bench_core.py`). Each section records the date, the exact command, the
machine and package versions. Numbers are ratios against a baseline measured side by side in the same run, so
they can be compared across runs on the same kind of machine; absolute times are given for context only.
"""


# ------------------------------------------------------------------------------------------------ results
@dataclass
class ScoreMemory:
    """From a fresh subprocess that loads the model and scores the calibration set once."""

    checkpoint: str
    model_bytes: int
    rss_at_start_mb: float
    rss_after_imports_mb: float  # after `import torch, transformers` alone
    rss_before_load_mb: float  # just before load_model
    peak_rss_after_load_mb: float  # ru_maxrss once the model is loaded, before calibration and scoring
    peak_rss_mb: float  # ru_maxrss at the end (whole process)
    rss_anon_after_score_mb: float  # RssAnon: heap, activations, anything copied
    rss_file_after_score_mb: float  # RssFile: mapped files (libraries, memory-mapped safetensors)

    @property
    def weights_mapped_lazily(self) -> bool:
        """load_model maps the safetensors file instead of copying it: weights enter RSS when first used."""
        loaded_mb = self.peak_rss_after_load_mb - self.rss_before_load_mb
        return loaded_mb < 0.5 * self.model_mb and self.rss_file_after_score_mb > 0.8 * self.model_mb

    @property
    def model_mb(self) -> float:
        return self.model_bytes / MB

    @property
    def peak_ratio(self) -> float:
        return self.peak_rss_mb / self.model_mb

    @property
    def above_load_ratio(self) -> float:
        return (self.peak_rss_mb - self.rss_before_load_mb) / self.model_mb


@dataclass
class SurgeryRun:
    """From a fresh subprocess that runs prune_checkpoint once."""

    duration_s: float
    rss_at_start_mb: float  # the interpreter alone
    rss_before_call_mb: float  # after importing shortgpt_deploy.plan and .surgery
    torch_imported_before_call: bool
    peak_rss_mb: float
    bytes_written: int
    transformers_imported_by_call: bool


@dataclass
class CopyStats:
    source_bytes: int
    surgery: list[SurgeryRun]  # a fresh process, as `shortgpt-deploy prune` runs it
    surgery_warm: list[SurgeryRun]  # transformers' AutoConfig already used once, as inside `build`
    cp_duration_s: list[float]

    @property
    def surgery_s(self) -> float:
        return statistics.median(r.duration_s for r in self.surgery)

    @property
    def surgery_warm_s(self) -> float:
        return statistics.median(r.duration_s for r in self.surgery_warm)

    @property
    def cp_s(self) -> float:
        return statistics.median(self.cp_duration_s)

    def read_mb_per_s(self, duration_s: float) -> float:
        return self.source_bytes / MB / duration_s

    @property
    def ratio(self) -> float:
        return self.cp_s / self.surgery_s  # (bytes / surgery_s) ÷ (bytes / cp_s)

    @property
    def ratio_warm(self) -> float:
        return self.cp_s / self.surgery_warm_s


@dataclass
class ScoreSpeed:
    """Wall times per repetition and batch, `[rep][batch]`, of the three ways to run the same batch."""

    num_tokens: int
    vocab_size: int
    plain_s: list[list[float]]  # model(...) with the LM head
    body_s: list[list[float]]  # model.get_decoder()(...), what scoring runs
    score_s: list[list[float]]  # importance.score_layers(metric="bi") on a one-batch calibration set
    others_share: list[list[float]]  # share of the box's CPU other processes used while a batch was timed

    @property
    def num_batches(self) -> int:
        return len(self.plain_s[0])

    @staticmethod
    def totals(times: list[list[float]]) -> list[float]:
        """One full pass over the calibration set per repetition."""
        return [sum(rep) for rep in times]

    def ratio_of_medians(self, baseline: list[list[float]]) -> float:
        return statistics.median(self.totals(self.score_s)) / statistics.median(self.totals(baseline))

    def batch_ratios(self, baseline: list[list[float]], quiet_only: bool = False) -> list[float]:
        """score ÷ baseline for each batch, both timed seconds apart: robust to the box's load changing."""
        rows = zip(sum(self.score_s, []), sum(baseline, []), sum(self.others_share, []), strict=True)
        return [s / b for s, b, share in rows if not quiet_only or share <= QUIET_SHARE]

    @property
    def busy(self) -> bool:
        """Other processes used more than QUIET_SHARE of the CPU during most of the timings."""
        return statistics.median(sum(self.others_share, [])) > QUIET_SHARE


@dataclass
class Machine:
    cpu_model: str
    logical_cpus: int
    physical_cores: str
    memory_gb: float
    kernel: str


# ------------------------------------------------------------------------------------------------- helpers
def current_rss_mb() -> float:
    """Resident set size now (VmRSS), in MB."""
    match = re.search(r"^VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) * 1024 / MB if match else float("nan")


def peak_rss_mb() -> float:
    """ru_maxrss of this process (kilobytes on Linux), in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB


def box_busy_s() -> float:
    """CPU seconds every process on the box has used so far (non-idle time of all CPUs in /proc/stat)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds this process (all its threads) has used so far."""
    t = os.times()
    return t.user + t.system


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def median_and_range(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def quartiles(values: list[float]) -> str:
    """Median with the middle half of the values, and how many there are."""
    if len(values) < 2:
        return f"{values[0]:.3f} (n=1)"
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return f"{q2:.3f} (middle half {q1:.3f}–{q3:.3f}, n={len(values)})"


def quiet_ratios(speed: ScoreSpeed) -> str:
    plain = speed.batch_ratios(speed.plain_s, quiet_only=True)
    body = speed.batch_ratios(speed.body_s, quiet_only=True)
    if not plain:
        return "no quiet batch"
    return f"{statistics.median(plain):.3f} / {statistics.median(body):.3f} (n={len(plain)})"


def run_child(args: list[str]) -> dict[str, Any]:
    """Run this script as `--child ...` in a fresh interpreter; it prints one JSON line last."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"benchmark child {args[:2]} failed with exit status {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def log(message: str) -> None:
    print(f"[bench-core {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def make_calibration(recipe: Any, tokenizer: Any, checkpoint: Any) -> Any:
    """The calibration set `shortgpt-deploy build` would score (same add_bos rule as pipeline.py)."""
    from shortgpt_deploy.calibration import build_calibration, load_documents
    from shortgpt_deploy.modeling import decide_add_bos

    add_bos = decide_add_bos(tokenizer, requested=recipe.model.add_bos, source=checkpoint.add_bos)
    calib = recipe.calibration
    return build_calibration(load_documents(calib), tokenizer, calib, add_bos=add_bos, source=calib.source)


# ------------------------------------------------------------------------------ children (fresh processes)
def child_score_memory(recipe_path: Path) -> dict[str, Any]:
    rss_at_start = current_rss_mb()
    import torch  # noqa: F401
    import transformers  # noqa: F401

    rss_after_imports = current_rss_mb()
    from shortgpt_deploy.importance import score_layers
    from shortgpt_deploy.modeling import load_model, resolve_checkpoint
    from shortgpt_deploy.preflight import load_recipe

    recipe = load_recipe(recipe_path)
    checkpoint = resolve_checkpoint(recipe.model.path, revision=recipe.model.revision)
    rss_before_load = current_rss_mb()
    model, tokenizer = load_model(checkpoint.path, dtype=recipe.model.dtype)
    peak_after_load = peak_rss_mb()
    calibration = make_calibration(recipe, tokenizer, checkpoint)
    score_layers(model, calibration, metric="bi", progress=False)
    status = Path("/proc/self/status").read_text()
    rss_anon, rss_file = (
        int(re.search(rf"^{key}:\s+(\d+) kB", status, re.MULTILINE).group(1)) * 1024 / MB
        for key in ("RssAnon", "RssFile")
    )
    return dataclasses.asdict(
        ScoreMemory(
            checkpoint=str(checkpoint.path),
            model_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
            rss_at_start_mb=rss_at_start,
            rss_after_imports_mb=rss_after_imports,
            rss_before_load_mb=rss_before_load,
            peak_rss_after_load_mb=peak_after_load,
            peak_rss_mb=peak_rss_mb(),
            rss_anon_after_score_mb=rss_anon,
            rss_file_after_score_mb=rss_file,
        )
    )


def child_surgery(checkpoint: Path, out_dir: Path, layers: list[int], warm: bool) -> dict[str, Any]:
    rss_at_start = current_rss_mb()
    from shortgpt_deploy.plan import make_plan
    from shortgpt_deploy.surgery import prune_checkpoint, read_config_layers

    if warm:  # what `build` has done before surgery: transformers imported, this model's config class loaded
        from transformers import AutoConfig

        AutoConfig.from_pretrained(checkpoint)

    plan = make_plan(num_layers=read_config_layers(checkpoint), layers=layers, protect=[0, -1])
    had_transformers = "transformers" in sys.modules
    rss_before = current_rss_mb()
    start = time.perf_counter()
    prune_checkpoint(checkpoint, plan, out_dir=out_dir, progress=False)
    duration = time.perf_counter() - start
    return dataclasses.asdict(
        SurgeryRun(
            duration_s=duration,
            rss_at_start_mb=rss_at_start,
            rss_before_call_mb=rss_before,
            torch_imported_before_call="torch" in sys.modules and not warm,
            peak_rss_mb=peak_rss_mb(),
            bytes_written=folder_bytes(out_dir),
            transformers_imported_by_call=not had_transformers and "transformers" in sys.modules,
        )
    )


# ------------------------------------------------------------------------------------------- measurements
def measure_score_memory(recipe_path: Path) -> ScoreMemory:
    log("score memory: fresh subprocess loads the model and scores once")
    return ScoreMemory(**run_child(["--child", "score-memory", "--recipe", str(recipe_path)]))


def measure_copy(checkpoint: Path, layers: list[int], reps: int) -> CopyStats:
    """Interleave surgery (fresh), surgery (transformers warm) and cp; one untimed warm-up of each.

    Each output is deleted and `sync` run before the next run starts, so no run pays for writing back the
    previous one's dirty pages.
    """
    sources = sorted(checkpoint.glob("*.safetensors"))
    layer_arg = ",".join(map(str, layers))

    def surgery(out: Path, warm: bool) -> SurgeryRun:
        args = ["--child", "surgery", "--checkpoint", str(checkpoint), "--out", str(out), "--layers", layer_arg]
        return SurgeryRun(**run_child(args + ["--warm"] * warm))

    def cp(out: Path) -> float:
        out.mkdir()
        start = time.perf_counter()
        subprocess.run(["cp", *map(str, sources), str(out)], check=True)
        return time.perf_counter() - start

    stats = CopyStats(sum(p.stat().st_size for p in sources), [], [], [])
    with tempfile.TemporaryDirectory(prefix="bench-core-") as tmp:
        out = Path(tmp) / "out"
        for rep in range(reps + 1):
            log(f"surgery vs cp: {'warm-up' if rep == 0 else f'rep {rep}/{reps}'}")
            runs: list[Any] = []
            for run in (lambda: surgery(out, warm=False), lambda: surgery(out, warm=True), lambda: cp(out)):
                os.sync()
                runs.append(run())
                shutil.rmtree(out)
            if rep:
                stats.surgery.append(runs[0])
                stats.surgery_warm.append(runs[1])
                stats.cp_duration_s.append(runs[2])
    return stats


def measure_score_speed(recipe_path: Path, reps: int) -> ScoreSpeed:
    """plain, body and score on each batch in turn (order rotated), `reps` passes, after a one-batch warm-up.

    Interleaving per batch rather than per full pass keeps the three timings of a batch seconds apart, so load
    from other processes on this shared box hits them alike; a full pass is the sum over its batches.
    """
    import torch

    from shortgpt_deploy.importance import score_layers
    from shortgpt_deploy.modeling import load_model, resolve_checkpoint
    from shortgpt_deploy.preflight import load_recipe

    recipe = load_recipe(recipe_path)
    checkpoint = resolve_checkpoint(recipe.model.path, revision=recipe.model.revision)
    model, tokenizer = load_model(checkpoint.path, dtype=recipe.model.dtype)
    calibration = make_calibration(recipe, tokenizer, checkpoint)
    batches = [dataclasses.replace(calibration, batches=[b]) for b in calibration.batches]
    body = model.get_decoder()

    def forward(module: torch.nn.Module, calib: Any) -> None:
        with torch.inference_mode():
            for batch in calib.batches:
                module(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)

    variants: dict[str, Callable[[Any], object]] = {
        "plain": lambda calib: forward(model, calib),
        "body": lambda calib: forward(body, calib),
        "score": lambda calib: score_layers(model, calib, metric="bi", progress=False),
    }
    log("score speed: warm-up (one batch each)")
    for run in variants.values():
        run(batches[0])
    times: dict[str, list[list[float]]] = {name: [] for name in variants}
    others_share: list[list[float]] = []
    names = list(variants)
    for rep in range(reps):
        log(f"score speed: pass {rep + 1}/{reps}")
        for name in names:
            times[name].append([])
        others_share.append([])
        for i, batch in enumerate(batches):
            k = (rep * len(batches) + i) % len(names)
            gc.collect()
            wall0, box0, own0 = time.perf_counter(), box_busy_s(), own_cpu_s()
            for name in names[k:] + names[:k]:
                start = time.perf_counter()
                variants[name](batch)
                times[name][rep].append(time.perf_counter() - start)
            others_s = (box_busy_s() - box0) - (own_cpu_s() - own0)
            others_share[rep].append(others_s / ((time.perf_counter() - wall0) * (os.cpu_count() or 1)))
    return ScoreSpeed(
        num_tokens=calibration.num_tokens,
        vocab_size=model.config.get_text_config().vocab_size,
        plain_s=times["plain"],
        body_s=times["body"],
        score_s=times["score"],
        others_share=others_share,
    )


# ---------------------------------------------------------------------------------------------- reporting
def machine() -> Machine:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    models = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    cores = sorted(set(re.findall(r"^cpu cores\s*:\s*(\d+)$", cpuinfo, re.MULTILINE)))
    mem = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    return Machine(
        cpu_model=models[0].strip() if models else platform.processor() or "unknown",
        logical_cpus=len(re.findall(r"^processor\s*:", cpuinfo, re.MULTILINE)),
        physical_cores="/".join(cores) or "?",
        memory_gb=int(mem.group(1)) * 1024 / 1e9 if mem else float("nan"),
        kernel=platform.release(),
    )


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "safetensors", "shortgpt-deploy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + (" with uncommitted changes" if dirty else "")


def verdict(ok: bool) -> str:
    return "pass" if ok else "**miss**"


def interpretation(speed: ScoreSpeed, memory: ScoreMemory, copy: CopyStats) -> str:
    """Three sentences, one per measurement, worded from the numbers."""
    quiet = speed.batch_ratios(speed.body_s, quiet_only=True)
    which, body_ratios = ("quiet batch", quiet) if len(quiet) >= 6 else ("batch", speed.batch_ratios(speed.body_s))
    q1, med, q3 = statistics.quantiles(body_ratios, n=4) if len(body_ratios) > 1 else [body_ratios[0]] * 3
    if q1 <= 1 <= q3:
        hooks = (
            f"per {which}, score ÷ body spans {q1:.2f}–{q3:.2f} (middle half), so the hooks' own cost is not resolved"
        )
    else:
        hooks = (
            f"per {which}, score ÷ body has median {med:.2f} (middle half {q1:.2f}–{q3:.2f}): the hooks and "
            f"per-layer statistics cost {(med - 1) * 100:+.0f}%"
        )
    busy = ""
    if speed.busy:
        share = statistics.median(sum(speed.others_share, []))
        busy = (
            f", but other processes used a median {share:.0%} of the box's CPU while they were timed, so these "
            "wall-time ratios are unreliable"
        )
    on_speed = (
        f"Scoring takes {speed.ratio_of_medians(speed.plain_s):.2f}× a full forward pass and "
        f"{speed.ratio_of_medians(speed.body_s):.2f}× the decoder body it actually runs (the full forward also "
        f"computes the LM head, {speed.vocab_size}-way logits per token, which scoring skips){busy}; {hooks}."
    )
    loading_set_peak = memory.peak_rss_after_load_mb >= 0.98 * memory.peak_rss_mb
    where = "while loading the model" if loading_set_peak else "while scoring"
    if memory.weights_mapped_lazily:
        where += (
            " (load_model memory-maps the safetensors file, so the weights enter RSS as file-backed "
            f"pages during the first forward; {memory.rss_file_after_score_mb:.0f} MB of RSS after "
            "scoring is file-backed, libraries included)"
        )
    on_memory = (
        f"Score's peak RSS is {memory.peak_ratio:.2f}× the {memory.model_mb:.0f} MB of weights, reached "
        f"{where}; {memory.rss_after_imports_mb:.0f} MB of it is there after `import torch, transformers`, and "
        f"the growth from just before loading is {memory.above_load_ratio:.2f}× the weights."
    )
    why = ""
    if all(r.transformers_imported_by_call for r in copy.surgery):
        why = (
            f": the {copy.surgery_s - copy.surgery_warm_s:.1f} s difference is prune_checkpoint importing "
            "transformers and its config classes (AutoConfig, for layer_types), not copying"
        )
    peak_mb = statistics.median(r.peak_rss_mb for r in copy.surgery)
    start_mb = statistics.median(r.rss_at_start_mb for r in copy.surgery)
    before_mb = statistics.median(r.rss_before_call_mb for r in copy.surgery)
    warm_growth_mb = statistics.median(r.peak_rss_mb - r.rss_before_call_mb for r in copy.surgery_warm)
    via_torch = " (which pull in torch)" if all(r.torch_imported_before_call for r in copy.surgery) else ""
    on_surgery = (
        f"Surgery in a fresh process reads the {copy.source_bytes / MB:.0f} MB checkpoint at "
        f"{copy.ratio:.2f}× cp's rate and at {copy.ratio_warm:.2f}× once transformers is warm (as inside "
        f"`build`){why}; its peak RSS is {peak_mb:.0f} MB, of which {before_mb - start_mb:.0f} MB is there "
        f"before the call from importing shortgpt_deploy's plan and surgery modules{via_torch}, and the call "
        f"itself adds {peak_mb - before_mb:.0f} MB ({warm_growth_mb:.0f} MB with transformers warm)."
    )
    return " ".join([on_speed, on_memory, on_surgery])


def table_rows(speed: ScoreSpeed, memory: ScoreMemory, copy: CopyStats) -> list[tuple[str, str, str, str]]:
    """(measurement, value, target, result); rows without a target are context for the ones with."""
    info = ("—", "info")

    def median_of(values: Any) -> float:
        return statistics.median(list(values))

    source_mb = copy.source_bytes / MB
    written_mb = median_of(r.bytes_written for r in copy.surgery) / MB
    rates = [copy.read_mb_per_s(t) for t in (copy.surgery_s, copy.surgery_warm_s, copy.cp_s)]
    shares = sum(speed.others_share, [])
    busy = " (busy box)" if speed.busy else ""
    return [
        (
            "score ÷ plain forward incl. LM head (ratio of median full-pass wall times)",
            f"{speed.ratio_of_medians(speed.plain_s):.3f}",
            f"≤ {SCORE_TIME_TARGET}",
            verdict(speed.ratio_of_medians(speed.plain_s) <= SCORE_TIME_TARGET) + busy,
        ),
        ("score ÷ plain forward, median of per-batch ratios", quartiles(speed.batch_ratios(speed.plain_s)), *info),
        (
            "score ÷ decoder body, no LM head (what scoring runs; ratio of medians)",
            f"{speed.ratio_of_medians(speed.body_s):.3f}",
            *info,
        ),
        ("score ÷ decoder body, median of per-batch ratios", quartiles(speed.batch_ratios(speed.body_s)), *info),
        (
            f"score ÷ plain / ÷ body, quiet batches only (other processes ≤ {QUIET_SHARE:.0%} of the CPU)",
            quiet_ratios(speed),
            *info,
        ),
        (
            "CPU used by other processes while timing, share of the box (median / max)",
            f"{statistics.median(shares):.0%} / {max(shares):.0%}",
            *info,
        ),
        ("plain forward pass, s (median, min–max)", median_and_range(speed.totals(speed.plain_s)), *info),
        ("decoder body pass, s", median_and_range(speed.totals(speed.body_s)), *info),
        ("score_layers(metric=bi) pass, s", median_and_range(speed.totals(speed.score_s)), *info),
        (
            "score peak RSS ÷ model bytes (ru_maxrss, fresh process)",
            f"{memory.peak_ratio:.2f}",
            f"≤ {SCORE_RSS_TARGET}",
            verdict(memory.peak_ratio <= SCORE_RSS_TARGET),
        ),
        ("(score peak RSS − RSS just before loading) ÷ model bytes", f"{memory.above_load_ratio:.2f}", *info),
        ("model bytes (parameters, numel × element size), MB", f"{memory.model_mb:.1f}", *info),
        (
            "score peak RSS / peak once loaded (before scoring), MB",
            f"{memory.peak_rss_mb:.0f} / {memory.peak_rss_after_load_mb:.0f}",
            *info,
        ),
        (
            "RSS at start / after `import torch, transformers` / before load, MB",
            f"{memory.rss_at_start_mb:.0f} / {memory.rss_after_imports_mb:.0f} / {memory.rss_before_load_mb:.0f}",
            *info,
        ),
        (
            "RSS after scoring: anonymous / file-backed (libraries, mapped files), MB",
            f"{memory.rss_anon_after_score_mb:.0f} / {memory.rss_file_after_score_mb:.0f}",
            *info,
        ),
        (
            "surgery ÷ cp read throughput, fresh process (ratio of median times)",
            f"{copy.ratio:.2f}",
            f"≥ {SURGERY_THROUGHPUT_TARGET}",
            verdict(copy.ratio >= SURGERY_THROUGHPUT_TARGET),
        ),
        ("surgery ÷ cp, transformers warm (AutoConfig used before the timer)", f"{copy.ratio_warm:.2f}", *info),
        ("read throughput surgery fresh / warm / cp, MB/s", " / ".join(f"{r:.0f}" for r in rates), *info),
        (
            "bytes read (source) / written by surgery (whole folder) / by cp, MB",
            f"{source_mb:.1f} / {written_mb:.1f} / {source_mb:.1f}",
            *info,
        ),
        (
            "surgery peak RSS (ru_maxrss) / RSS before the call / at interpreter start, fresh process, MB",
            f"{median_of(r.peak_rss_mb for r in copy.surgery):.0f} / "
            f"{median_of(r.rss_before_call_mb for r in copy.surgery):.0f} / "
            f"{median_of(r.rss_at_start_mb for r in copy.surgery):.0f}",
            *info,
        ),
    ]


def raw_times(speed: ScoreSpeed, copy: CopyStats) -> str:
    series = {
        "plain pass": speed.totals(speed.plain_s),
        "body pass": speed.totals(speed.body_s),
        "score pass": speed.totals(speed.score_s),
        "surgery fresh": [r.duration_s for r in copy.surgery],
        "surgery warm": [r.duration_s for r in copy.surgery_warm],
        "cp": copy.cp_duration_s,
    }
    return "; ".join(f"{name} {', '.join(f'{t:.2f}' for t in times)}" for name, times in series.items())


def render(
    speed: ScoreSpeed,
    memory: ScoreMemory,
    copy: CopyStats,
    *,
    recipe_path: Path,
    layers: list[int],
    reps: int,
    command: str,
    load_at_start: float,
) -> str:
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    m, v = machine(), versions()
    table = "\n".join(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in table_rows(speed, memory, copy))
    method = (
        f"speed in this process: {reps} passes over the calibration set after a one-batch warm-up of each "
        "variant, with the plain forward, the decoder body and `score_layers` run on each batch in turn "
        "(order rotated; score on a one-batch calibration set), forwards under `torch.inference_mode`; "
        "memory in a fresh subprocess (its ru_maxrss covers loading and scoring); surgery "
        f"(`prune_checkpoint` removing layers {layers}) in a fresh subprocess per run (once as is, once with "
        "transformers' AutoConfig used before the timer), timed around the call, interleaved "
        f"{reps}× with `cp` of the same safetensors file(s) after one warm-up of each; files warm in the page "
        "cache (dropping it is not possible here); outputs in a temporary folder, deleted and `sync`ed between "
        "runs, no fsync inside the timed region"
    )
    return f"""
## bench-core, {when}

- Command: `{command}`
- Machine: {m.cpu_model}, {m.logical_cpus} logical CPUs ({m.physical_cores} cores per socket), \
{m.memory_gb:.0f} GB RAM, Linux {m.kernel}; no GPU used; load average (1 min) {load_at_start:.1f} at the \
start, {os.getloadavg()[0]:.1f} at the end
- Versions: python {v["python"]}, torch {v["torch"]}, transformers {v["transformers"]}, \
safetensors {v["safetensors"]}, shortgpt-deploy {v["shortgpt-deploy"]} (git {git_revision()})
- Model and data: `{memory.checkpoint}`, {Path(recipe_path).name} ({speed.num_batches} batches, \
{speed.num_tokens} calibration tokens)
- Method: {method}.

| measurement | value | target | result |
|---|---|---|---|
{table}

Raw times, s: {raw_times(speed, copy)}.

{interpretation(speed, memory, copy)}
"""


def append(path: Path, section: str) -> None:
    if not path.exists():
        path.write_text(INTRO)
    with path.open("a") as f:
        f.write(section)


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE, help="model and calibration (default: %(default)s)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions of each (default: %(default)s)")
    p.add_argument(
        "--layers",
        default=",".join(map(str, DEFAULT_REMOVE)),
        help="layers surgery removes, comma-separated (default: %(default)s)",
    )
    p.add_argument("--append", type=Path, metavar="MARKDOWN", help="also append the section to this file")
    # Internal: the fresh-process measurements re-run this script with --child.
    p.add_argument("--child", choices=["score-memory", "surgery"], help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    layers = [int(x) for x in args.layers.split(",")]
    if args.child == "score-memory":
        print(json.dumps(child_score_memory(args.recipe)))
        return
    if args.child == "surgery":
        print(json.dumps(child_surgery(args.checkpoint, args.out, layers, args.warm)))
        return

    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    # Subprocess measurements first, while this process is small (see the module docstring).
    memory = measure_score_memory(args.recipe)
    copy = measure_copy(Path(memory.checkpoint), layers, args.reps)
    speed = measure_score_speed(args.recipe, args.reps)
    section = render(
        speed,
        memory,
        copy,
        recipe_path=args.recipe,
        layers=layers,
        reps=args.reps,
        command=command,
        load_at_start=load_at_start,
    )
    print(section)
    if args.append:
        append(args.append, section)
        log(f"appended to {args.append}")
    log(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
