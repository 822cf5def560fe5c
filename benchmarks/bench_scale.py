#!/usr/bin/env python
"""Scoring and surgery of a checkpoint larger than this machine's memory (issue 13): `make bench-scale`.

Writes a random-weight checkpoint with Llama-2-13B's shapes in bf16 (~26 GB) layer by layer straight to
safetensors shards (one tensor template per shape, generated once and rolled per layer: random generation would
cost more than the benchmark itself), then measures, each in a fresh child process (peak RSS from wait4):

- `shortgpt-deploy score` with no --stream flag: the automatic choice must pick the layer-streamed path (the
  weights do not fit), and its peak RSS is compared with one layer + the calibration hidden states + 1 GB;
- its wall time against an ideal: the time to read the files once (measured just before) plus the forward
  pass's FLOPs at the rate one decoder layer of these shapes runs at in memory (measured here);
- `shortgpt-deploy prune --layers ...` (surgery): peak RSS and bytes per second.

Random weights make the scores meaningless; the cost is what is measured. The checkpoint is deleted at the end,
also on failure or Ctrl-C. When the disk cannot hold the checkpoint and its pruned copy, fewer layers are
written (and the section says so).

Usage: PYTHONPATH=. .venv/bin/python benchmarks/bench_scale.py [--append BENCHMARKS.md] [--work /var/tmp]
    [--layers 40] [--samples 2] [--seq-len 256] [--batch-size 2] [--dtype bfloat16] [--remove 10]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GB = 1e9
# Llama-2-13B (meta-llama/Llama-2-13b-hf config.json)
SHAPES = {"hidden": 5120, "intermediate": 13824, "heads": 40, "vocab": 32000}
WORDS = "the of and to a in was her it she not he be as his had for with you is but at on all have by my".split()


def log(message: str) -> None:
    print(f"[bench-scale {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def layer_shapes(h: int, inter: int) -> dict[str, tuple[int, ...]]:
    return {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (h, h),
        "self_attn.k_proj.weight": (h, h),
        "self_attn.v_proj.weight": (h, h),
        "self_attn.o_proj.weight": (h, h),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (inter, h),
        "mlp.up_proj.weight": (inter, h),
        "mlp.down_proj.weight": (h, inter),
    }


def layer_bytes(h: int, inter: int) -> int:
    return 2 * sum(_numel(s) for s in layer_shapes(h, inter).values())


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def write_checkpoint(folder: Path, num_layers: int, layers_per_shard: int = 2) -> int:
    """config.json, a word-level tokenizer and bf16 shards written a layer group at a time; returns its bytes."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    h, inter, vocab = SHAPES["hidden"], SHAPES["intermediate"], SHAPES["vocab"]
    folder.mkdir(parents=True)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": inter,
        "num_hidden_layers": num_layers, "num_attention_heads": SHAPES["heads"], "num_key_value_heads": SHAPES["heads"],
        "vocab_size": vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1,
        "eos_token_id": 2, "pad_token_id": 0,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    vocab_map = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab_map, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    ).save_pretrained(folder)

    g = torch.Generator().manual_seed(0)
    templates = {
        shape: (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        for shape in {s for s in layer_shapes(h, inter).values() if len(s) == 2}
    }
    weight_map: dict[str, str] = {}
    total = 0

    def save(tensors: dict[str, Any], name: str) -> None:
        nonlocal total
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())

    n_shards = (num_layers + layers_per_shard - 1) // layers_per_shard + 1
    emb = (torch.randn((vocab, h), generator=g) * 0.02).to(torch.bfloat16)
    save(
        {"model.embed_tokens.weight": emb, "lm_head.weight": emb.roll(1, 0).contiguous(),
         "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)},
        f"model-{1:05d}-of-{n_shards:05d}.safetensors",
    )  # fmt: skip
    del emb
    for s, start in enumerate(range(0, num_layers, layers_per_shard), start=2):
        tensors = {}
        for i in range(start, min(start + layers_per_shard, num_layers)):
            for name, shape in layer_shapes(h, inter).items():
                key = f"model.layers.{i}.{name}"
                if len(shape) == 1:
                    tensors[key] = (1 + 0.01 * torch.randn(shape, generator=g)).to(torch.bfloat16)
                else:  # distinct per layer without the cost of generating 13e9 random numbers
                    tensors[key] = templates[shape].roll(i * 7 + 1, 0).contiguous()
        save(tensors, f"model-{s:05d}-of-{n_shards:05d}.safetensors")
        log(f"wrote layers {start}..{i} ({total / GB:.1f} GB so far)")
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def read_once_s(folder: Path) -> float:
    """Seconds to read every shard once, sequentially (64 MiB reads; the files exceed the page cache)."""
    buf = bytearray(64 << 20)
    start = time.perf_counter()
    for shard in sorted(folder.glob("*.safetensors")):
        with shard.open("rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - start


def layer_rate(dtype: str, batch: int, seq: int, reps: int = 3) -> tuple[float, float]:
    """(FLOPs of one decoder layer over one batch, FLOP/s it runs at) for these shapes, in memory, in `dtype`."""
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaModel

    h, inter = SHAPES["hidden"], SHAPES["intermediate"]
    cfg = LlamaConfig(
        hidden_size=h, intermediate_size=inter, num_hidden_layers=1, num_attention_heads=SHAPES["heads"],
        num_key_value_heads=SHAPES["heads"], vocab_size=64, max_position_embeddings=4096,
    )  # fmt: skip
    model = LlamaModel._from_config(cfg, dtype=getattr(torch, dtype)).eval()
    ids = torch.randint(0, 64, (batch, seq))
    params = sum(p.numel() for p in model.layers.parameters())
    flops = 2 * params * batch * seq + 4 * batch * seq * seq * h  # matmuls + QK^T and AV (full, as sdpa computes)
    times = []
    with torch.inference_mode():
        model(input_ids=ids)  # warm-up
        for _ in range(reps):
            start = time.perf_counter()
            model(input_ids=ids)
            times.append(time.perf_counter() - start)
    return flops, flops / min(times)


# A fresh, small interpreter runs each measured command and reports its rusage: ru_maxrss survives fork and exec
# (Linux folds the old address space's high-water mark in at exec), so a child forked from this process, which
# holds the weight templates and a layer, would report at least this process's peak.
LAUNCHER = (
    "import json, os, sys\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    os.execvp(sys.argv[1], sys.argv[1:])\n"
    "_, status, ru = os.wait4(pid, 0)\n"
    "print(json.dumps({'rc': os.waitstatus_to_exitcode(status), 'maxrss_kb': ru.ru_maxrss,"
    " 'cpu_s': ru.ru_utime + ru.ru_stime}), file=sys.stderr)\n"
)


def run_measured(cmd: list[str], log_path: Path) -> dict[str, Any]:
    """Run `cmd`; wall time, peak RSS (the child's own ru_maxrss, see LAUNCHER) and exit status."""
    start = time.perf_counter()
    with log_path.open("w") as out:
        proc = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], stdout=out, stderr=subprocess.STDOUT)
    output = log_path.read_text()
    usage = json.loads(output.strip().splitlines()[-1])
    return {
        "wall_s": time.perf_counter() - start,
        "peak_rss_gb": usage["maxrss_kb"] * 1024 / GB,
        "cpu_s": usage["cpu_s"],
        "rc": usage["rc"] if proc.returncode == 0 else proc.returncode,
        "output": output,
    }


def cpu() -> tuple[str, str]:
    text = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
    flags = set(re.search(r"^flags\s*:\s*(.*)$", text, re.M).group(1).split())  # type: ignore[union-attr]
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return (model.group(1) if model else "unknown"), " ".join(shown)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--append", type=Path, help="Markdown file to append the section to (BENCHMARKS.md).")
    ap.add_argument("--work", type=Path, default=Path("/var/tmp"), help="Where the checkpoint is written.")
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--remove", type=int, default=10, help="Layers the surgery removes.")
    ap.add_argument("--stream", action="store_true", help="Pass --stream (default: let the auto choice decide).")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    h, inter = SHAPES["hidden"], SHAPES["intermediate"]
    per_layer = layer_bytes(h, inter)
    fixed = 3 * SHAPES["vocab"] * h * 2
    free = shutil.disk_usage(args.work).free
    layers = args.layers
    # the checkpoint and its pruned copy, with 5 GB to spare
    while layers > args.remove + 2 and fixed * 2 + per_layer * (2 * layers - args.remove) + 5 * GB > free:
        layers -= 1
    load_start, up_start = os.getloadavg()[0], uptime()
    work = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=args.work))
    try:
        result = measure(work, layers, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        log(f"deleted {work}")
    result |= {"load_start": load_start, "load_end": os.getloadavg()[0], "uptime_start": up_start,
               "uptime_end": uptime(), "layers_asked": args.layers, "disk_free_gb": free / GB}  # fmt: skip
    print(json.dumps({k: v for k, v in result.items() if k not in ("score_output", "prune_output")}, indent=1))
    if args.append:
        with args.append.open("a") as f:
            f.write(section(result, args))
    return 0 if result["score_rc"] == 0 and result["prune_rc"] == 0 else 1


def measure(work: Path, layers: int, args: argparse.Namespace) -> dict[str, Any]:
    ckpt = work / "llama-13b-shapes"
    start = time.perf_counter()
    size = write_checkpoint(ckpt, layers)
    gen_s = time.perf_counter() - start
    log(f"checkpoint: {size / GB:.1f} GB, {layers} layers, in {gen_s:.0f} s; reading it once")
    read_s = read_once_s(ckpt)
    log(f"read once: {read_s:.0f} s ({size / GB / read_s:.2f} GB/s); measuring one layer's forward")
    batch = min(args.batch_size, args.samples)
    flops_batch, rate = layer_rate(args.dtype, batch, args.seq_len)
    batches = -(-args.samples // args.batch_size)
    total_flops = flops_batch * batches * layers
    text = work / "calibration.txt"
    rng = random.Random(0)
    text.write_text(" ".join(rng.choice(WORDS) for _ in range(args.samples * args.seq_len * 4)))
    cli = [sys.executable, "-m", "shortgpt_deploy"]
    log("streamed scoring (auto choice)")
    score = run_measured(
        [*cli, "score", str(ckpt), "--calibration", str(text), "--samples", str(args.samples), "--seq-len",
         str(args.seq_len), "--batch-size", str(args.batch_size), "--dtype", args.dtype, "--out",
         str(work / "scores.json"), "--no-progress", *(["--stream"] if args.stream else [])],
        work / "score.log",
    )  # fmt: skip
    log(f"score: rc {score['rc']}, {score['wall_s']:.0f} s, peak RSS {score['peak_rss_gb']:.2f} GB")
    removed = ",".join(str(i) for i in range(1, 1 + args.remove))  # 0 and the last are protected
    prune = run_measured(
        [*cli, "prune", str(ckpt), "--out", str(work / "pruned"), "--layers", removed, "--no-progress"],
        work / "prune.log",
    )
    written = sum(p.stat().st_size for p in (work / "pruned").glob("*.safetensors")) if prune["rc"] == 0 else 0
    log(f"prune: rc {prune['rc']}, {prune['wall_s']:.0f} s, peak RSS {prune['peak_rss_gb']:.2f} GB")
    elt = 2 if args.dtype == "bfloat16" else 4
    hidden_bytes = args.samples * args.seq_len * SHAPES["hidden"] * elt
    return {
        "layers": layers, "checkpoint_gb": size / GB, "generate_s": gen_s, "read_once_s": read_s,
        "layer_gb": layer_bytes(SHAPES["hidden"], SHAPES["intermediate"]) / 2 * elt / GB,
        "hidden_gb": hidden_bytes / GB, "flops": total_flops, "flops_per_s": rate,
        "ideal_s": read_s + total_flops / rate, "score_wall_s": score["wall_s"], "score_rss_gb": score["peak_rss_gb"],
        "score_cpu_s": score["cpu_s"], "score_rc": score["rc"], "score_output": score["output"],
        "streamed": "scoring layer by layer" in score["output"], "prune_wall_s": prune["wall_s"],
        "prune_rss_gb": prune["peak_rss_gb"], "prune_rc": prune["rc"], "prune_output": prune["output"],
        "pruned_gb": written / GB, "removed": removed, "prune_cpu_s": prune["cpu_s"],
        "shards": len(list(ckpt.glob("*.safetensors"))),
    }  # fmt: skip


def section(r: dict[str, Any], args: argparse.Namespace) -> str:
    model, flags = cpu()
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    target = r["layer_gb"] + r["hidden_gb"] + 1.0
    verdict = "**met**" if r["score_rss_gb"] <= target else "**miss**"
    if r["layers"] == r["layers_asked"]:
        size_note = f"all {r['layers']} layers"
    else:
        size_note = (
            f"**{r['layers']} of {r['layers_asked']} layers**: the disk ({r['disk_free_gb']:.0f} GB free) holds no more"
        )
    score_tail = " ".join(r["score_output"].split()[-40:]) if r["score_rc"] else ""
    prune_tail = " ".join(r["prune_output"].split()[-40:]) if r["prune_rc"] else ""
    path = "streaming" if r["streamed"] else "**in memory**"
    chose = "--stream" if args.stream else f"no flag: auto chose {path}"
    written_rate, source_rate = r["pruned_gb"] / r["prune_wall_s"], r["checkpoint_gb"] / r["prune_wall_s"]
    flops_s = r["flops"] / r["flops_per_s"]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        "",
        f"## bench-scale: a Llama-2-13B-shaped checkpoint larger than RAM, {when}",
        "",
        f"- Command: `{' '.join([Path(sys.executable).name, *sys.argv])}` (`make bench-scale`)",
        f"- Machine: {model}, {os.cpu_count()} CPUs ({flags}), {ram_gib:.0f} GiB RAM, no GPU; load average (1 min) "
        f"{r['load_start']:.1f} at the start, {r['load_end']:.1f} at the end (other sessions share the cores)",
        f"- `uptime` at the start: `{r['uptime_start']}`; at the end: `{r['uptime_end']}`",
        "- Checkpoint: random bf16 weights with Llama-2-13B's shapes (hidden 5120, intermediate 13824, 40 heads, "
        f"vocab 32000), {size_note}: {r['checkpoint_gb']:.1f} GB in {r['shards']} shards, written layer by layer in "
        f"{r['generate_s']:.0f} s and deleted afterwards. Calibration: {args.samples} × {args.seq_len} tokens, "
        f"batch {args.batch_size}, scored in {args.dtype}.",
        f"- Read once (every shard, 64 MiB reads, right after writing): {r['read_once_s']:.0f} s = "
        f"{r['checkpoint_gb'] / r['read_once_s']:.2f} GB/s",
        f"- One decoder layer of these shapes in memory ({args.dtype}, batch {min(args.batch_size, args.samples)} × "
        f"{args.seq_len}): {r['flops_per_s'] / 1e9:.0f} GFLOP/s; the whole forward is {r['flops'] / 1e12:.1f} TFLOP",
        "",
        "| step | wall s | peak RSS GB | CPU s | note |",
        "| --- | --- | --- | --- | --- |",
        f"| `score` ({chose}) | {r['score_wall_s']:.0f} | {r['score_rss_gb']:.2f} | {r['score_cpu_s']:.0f} | "
        f"exit {r['score_rc']} {score_tail} |",
        f"| `prune --layers {r['removed']}` (surgery) | {r['prune_wall_s']:.0f} | {r['prune_rss_gb']:.2f} | "
        f"{r['prune_cpu_s']:.0f} | exit {r['prune_rc']}; wrote {r['pruned_gb']:.1f} GB: {written_rate:.2f} GB/s "
        f"written, {source_rate:.2f} GB/s of source {prune_tail} |",
        "",
        f"- Streamed scoring's peak RSS {r['score_rss_gb']:.2f} GB vs target one layer ({r['layer_gb']:.2f} GB in "
        f"{args.dtype}) + hidden states ({r['hidden_gb'] * 1000:.0f} MB) + 1 GB = {target:.2f} GB: {verdict}",
        f"- Streamed scoring's wall time {r['score_wall_s']:.0f} s vs ideal {r['ideal_s']:.0f} s (read once "
        f"{r['read_once_s']:.0f} s + the FLOPs at the measured layer rate {flops_s:.0f} s) = "
        f"{r['score_wall_s'] / r['ideal_s']:.2f}× the ideal (the wall time includes interpreter start, imports, "
        "tokenization and the embedding table)",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
