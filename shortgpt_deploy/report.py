"""A run folder → report.md with plots (the serving tables themselves: serving_tables.py). Offline: matplotlib's Agg
backend, no web assets.

Each section of the report reads the artifact of one stage (scores.json, plan.json, quantize.json, eval.json,
bench/summary.json, bench/runs.json); a stage that did not run or failed gets one line saying so, from the
manifest's `stages` (or, for older folders, from which files exist). Nothing is measured here, so a report can
be rewritten for any run folder at any time.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import text_config
from .errors import ShortGPTError
from .files import atomic_write_text
from .plan import LayerPlan
from .plots import plot_latency, plot_throughput
from .recipe import QUANTIZED_SUFFIX, VARIANTS  # a quantized variant is compared with its float parent
from .run import ANALYSES, Manifest, RunDir, RunFolderError, StageStatus, read_json
from .serving_tables import (
    bench_context,
    describe_machine,
    fmt,
    markdown_table,
    speed_finding,
    summary_rows,
    ttft_finding,
    verdicts,
)

if TYPE_CHECKING:
    from .budget import BudgetResult
    from .quantize import QuantizedVariant
    from .records import BenchSummary, EvalResult, RunRecord
    from .repair import RepairResult

ReportError = RunFolderError  # the name earlier callers catch


# ---------------------------------------------------------------------------------------------- the run folder
@dataclass(frozen=True)
class RunFolder:
    """What the stages left in a run folder (read through run.RunDir); each artifact None (or empty) when its
    stage did not write it."""

    path: Path
    manifest: Manifest
    plan: LayerPlan | None
    scores: dict[str, Any] | None
    quantize: dict[str, QuantizedVariant]
    evaluation: EvalResult | None
    summary: BenchSummary | None
    runs: list[RunRecord]
    budget: BudgetResult | None = None
    repair: RepairResult | None = None

    @property
    def dir(self) -> RunDir:
        return RunDir(self.path)


def load_run(run_dir: Path) -> RunFolder:
    run = RunDir(run_dir).require()
    return RunFolder(
        path=run.root,
        manifest=run.load_manifest() or Manifest.from_json({}),
        plan=run.load_plan(),
        scores=read_json(run.scores_path),  # as a dict: the report shows old files' fields as they are
        quantize=run.load_quantize(),
        evaluation=run.load_eval(),
        summary=run.load_bench_summary(),
        runs=run.load_bench_runs(),
        budget=run.load_budget(),
        repair=run.load_repair(),
    )


def stage_status(run: RunFolder) -> dict[str, StageStatus]:
    """Each stage's status as the manifest records it, else as the artifacts in the folder show it."""
    dry_run = run.manifest.status == "dry-run"
    done, not_run = StageStatus("complete"), StageStatus("not run")
    explicit = run.plan is not None and run.plan.metric == "explicit"
    inferred = {
        "score": done if run.scores else StageStatus("skipped") if explicit else not_run,
        "plan": done if run.plan is not None else not_run,
        "prune": done if run.dir.checkpoint("pruned").is_dir() else StageStatus("skipped", "dry run") if dry_run
        else not_run,
        "repair": done if run.repair else not_run,
        "quantize": done if run.quantize else not_run,
        "eval": done if run.evaluation is not None else not_run,
        "bench": done if run.summary is not None else not_run,
    }  # fmt: skip
    return {**inferred, **run.manifest.stages}


def _absent(stage: str, status: StageStatus) -> str:
    """The one line that stands in for a section whose stage did not leave its artifact."""
    if status.state == "failed":
        return f"_The {stage} stage failed: {status.note or 'no message recorded'}._"
    if status.ok:
        return f"_The {stage} stage completed, but its output is missing from this folder._"
    return f"_The {stage} stage was {status.text()}._"


def _model_name(run: RunFolder) -> str:
    inputs = run.manifest.inputs
    return (
        ((inputs.get("recipe") or {}).get("model") or {}).get("path")
        or (run.scores or {}).get("model")
        or (inputs.get("checkpoint") or {}).get("path")
        or "an unknown model"
    )


def header_section(run: RunFolder, status: dict[str, StageStatus]) -> str:
    m, p = run.manifest, run.plan
    name = (m.inputs.get("recipe") or {}).get("name") or run.path.name
    what = f"{_model_name(run)}: no plan.json, so no layers were chosen."
    if p is not None:
        what = (
            f"{_model_name(run)} ({p.num_layers_before} layers) pruned by {p.metric}: {len(p.remove)} layers removed "
            f"({', '.join(map(str, sorted(p.remove)))}) → {p.num_layers_after} layers."
        )
    built = (
        f"Built {m.started_at or 'on an unknown date'} on {describe_machine(m.machine)}, "
        f"git revision {m.git_revision or 'unknown'}; run status: {m.status}."
    )
    table = markdown_table(["stage", "status"], [[s, st.text()] for s, st in status.items()])
    timings = ", ".join(f"{k} {v:.1f} s" for k, v in m.timings_s.items())
    return f"# Run report: {name}\n\n{what} {built}\n\n{table}\n\nTimings: {timings or 'none recorded'}."


def scores_section(run: RunFolder, status: dict[str, StageStatus]) -> str:
    out = ["## Layer scores"]
    if run.dir.scores_plot.is_file():
        out.append("![Score per layer: removed layers in red, protected ones hatched](bi.png)")
    if run.scores:
        c = run.scores.get("calibration") or {}
        out.append(f"{run.scores['metric']} of {run.scores['num_layers']} layers, from {c.get('num_tokens', '?')} "
                   f"calibration tokens of {c.get('source', '?')}; the lowest score goes first.")  # fmt: skip
    else:
        out.append(_absent("score", status["score"]))
    if run.plan is None:
        return "\n\n".join([*out, "_No plan.json: no layers were chosen._"])
    values = (run.scores or {}).get("scores") or []
    rows = [
        [str(k + 1), str(i), fmt(values[i] if i < len(values) else None, ".5f"), run.plan.reasons.get(i, "")]
        for k, i in enumerate(run.plan.remove)
    ]
    out += ["Removed layers, in the order they were chosen:", markdown_table(["order", "layer", "score", "why"], rows)]
    return "\n\n".join(out + budget_lines(run.budget))


def budget_lines(budget: BudgetResult | None) -> list[str]:
    """prune.budget's choice: the criterion, how many layers, and every point of the curve it measured."""
    if budget is None:
        return []
    st, n = budget.settings, budget.n_remove
    if budget.criterion == "retention":
        return _retention_budget_lines(budget)
    base, limit = budget.baseline_ppl or math.nan, budget.limit_ppl or math.nan
    points = sorted(budget.ppl_by_n.items())
    rows = [[str(k), f"{v:.3f}", f"{100 * (v / base - 1):+.1f}%", "✓" if v <= limit else "over"]
            for k, v in points]  # fmt: skip
    return [
        f"The amount was chosen by a perplexity budget: {n} layers is the most whose removal (in "
        f"{st.get('metric', '?')} order) keeps perplexity on {st.get('text', '?')} within "
        f"+{st.get('max_increase_pct', '?')}% ({base:.3f} → {budget.ppl_by_n[n]:.3f}, "
        f"limit {limit:.3f}); {len(points)} points measured:",
        markdown_table(["layers removed", "perplexity", "change", "within budget"], rows),
    ]


def _retention_budget_lines(budget: BudgetResult) -> list[str]:
    st, n, floor = budget.settings, budget.n_remove, budget.min_retention_pct or math.nan
    tasks = st.get("tasks") or []
    points = sorted(budget.retention_by_n.items())
    acc = budget.accuracy_by_n

    def task_acc(k: int, t: str) -> str:
        return fmt(acc.get(k, {}).get("tasks", {}).get(t, {}).get("acc"), ".3f")

    rows = [[str(k), *(task_acc(k, t) for t in tasks), fmt(acc.get(k, {}).get("average", {}).get("acc"), ".3f"),
             f"{r:.1f}%", "✓" if r >= floor else "under"] for k, r in points]  # fmt: skip
    items = ", ".join(f"{t} {c}" for t, c in (st.get("items") or {}).items())
    chosen = acc.get(n, {}).get("average", {}).get("acc")
    return [
        f"The amount was chosen by a multiple-choice retention budget: {n} layers is the most whose removal (in "
        f"{st.get('metric', '?')} order) keeps at least {floor:g}% of the dense model's average accuracy on "
        f"{', '.join(tasks) or '?'} ({fmt(budget.baseline_acc, '.3f')} → {fmt(chosen, '.3f')}, retention "
        f"{budget.retention_by_n[n]:.1f}%); {len(points)} points measured, on the first items of each task "
        f"({items or '?'}). Retention is average acc ÷ dense average acc × 100. These items chose the amount: "
        "accuracy on the same items in the eval section is not an independent check.",
        markdown_table(["layers removed", *tasks, "average acc", "retention", "within budget"], rows),
    ]


# ---------------------------------------------------------------------------------------------- quality and size
@dataclass(frozen=True)
class VariantInfo:
    name: str
    folder: Path | None
    layers: int | None
    weight_bytes: int | None  # the folder's *.safetensors files
    perplexity: float | None
    quant: QuantizedVariant | None  # its quantize.json entry


def variant_folders(run: RunFolder) -> dict[str, Path]:
    """Variant name → checkpoint folder (run.RunDir.variant_folders)."""
    return run.dir.variant_folders(run.manifest)


def weight_bytes(folder: Path) -> int | None:
    files = list(folder.glob("*.safetensors")) if folder.is_dir() else []
    return sum(f.stat().st_size for f in files) if files else None


def _layers(folder: Path | None, name: str, plan: LayerPlan | None) -> int | None:
    if folder and (config := read_json(folder / "config.json")):
        with contextlib.suppress(ShortGPTError):  # a config without a layer count: fall back to the plan
            return text_config(config)["num_hidden_layers"]
    if plan is None:
        return None
    return plan.num_layers_before if name.startswith("dense") else plan.num_layers_after


def variant_infos(run: RunFolder) -> dict[str, VariantInfo]:
    folders, ppl = variant_folders(run), run.evaluation.perplexity if run.evaluation else {}
    rank = {n: k for k, n in enumerate(VARIANTS)}
    names = sorted({*folders, *ppl, *run.quantize}, key=lambda n: (rank.get(n, len(rank)), n))
    return {
        n: VariantInfo(
            name=n,
            folder=folders.get(n),
            layers=_layers(folders.get(n), n, run.plan),
            weight_bytes=weight_bytes(folders[n]) if n in folders else None,
            perplexity=(ppl.get(n) or {}).get("perplexity"),
            quant=run.quantize.get(n),
        )
        for n in names
    }


def _bytes(n: int | None) -> str:
    if n is None:
        return "–"
    unit, scale = next((u, s) for u, s in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3), ("B", 1)) if n >= s or s == 1)
    return f"{n / scale:.1f} {unit}" if scale > 1 else f"{n} B"


def _ratio(x: float | None, base: float | None) -> str:
    return "–" if x is None or not base else f"{x / base:.3f}"


def _scheme(q: QuantizedVariant | None) -> str:
    if q is None:
        return "–"
    return f"{q.scheme}, {q.bits}-bit, group {q.group_size}, {fmt(q.duration_s, '.0f')} s ({q.producer or '?'})"


def quality_section(run: RunFolder, infos: dict[str, VariantInfo], status: dict[str, StageStatus]) -> str:
    """The ShortGPT paper's Table 2 shape: perplexity and weight bytes per variant, each as a ratio to dense."""
    out = ["## Quality and size"]
    if not infos:
        return "\n\n".join([*out, "_No variants recorded (no checkpoint in the manifest, no pruned/ folder)._"])
    dense = infos.get("dense")
    base_ppl, base_bytes = (dense.perplexity, dense.weight_bytes) if dense else (None, None)
    headers = ["variant", "layers", "weights", "size ÷ dense", "perplexity", "perplexity ÷ dense", "GPTQ"]
    rows = [
        [i.name, fmt(i.layers, "d"), _bytes(i.weight_bytes), _ratio(i.weight_bytes, base_bytes),
         fmt(i.perplexity, ".3f"), _ratio(i.perplexity, base_ppl), _scheme(i.quant)]
        for i in infos.values()
    ]  # fmt: skip
    out += [markdown_table(headers, rows), "Weights: the size of the variant folder's `*.safetensors` files."]
    out += [f"- {i.name}: folder {i.folder} not found" for i in infos.values() if i.folder and not i.folder.is_dir()]
    e = run.evaluation
    if e is None:
        return "\n\n".join([*out, _absent("eval", status["eval"])])
    out.append(f"Perplexity on {e.text}: the first {e.max_tokens} tokens, windows of "
               f"{e.context_len} tokens every {e.stride} (each token predicted once).")  # fmt: skip
    if agreement := e.agreement:
        rows = [[a["variant"], a["reference"], f"{a['prompts']} × {a['new_tokens']}", f"{a['token_match']:.1%}",
                 f"{a['mean_prefix_tokens']:.1f}", f"{a['identical_outputs']} of {a['prompts']}"]
                for a in agreement]  # fmt: skip
        headers = ["variant", "reference", "prompts × new tokens", "greedy tokens identical", "mean common prefix",
                   "identical outputs"]  # fmt: skip
        out += ["Greedy agreement with a reference (same prompts, greedy decoding):", markdown_table(headers, rows)]
    return "\n\n".join(out + generation_lines(e) + accuracy_lines(e))


def generation_lines(e: EvalResult) -> list[str]:
    """The generative probe: the dense model's perplexity of each variant's greedy text, and its repetition."""
    gen = e.generation or {}
    if not gen:
        return []
    rows = [[v, f"{g['reference_perplexity']:.2f}", f"{g['repetition_rate_4gram']:.1%}"] for v, g in gen.items()]
    return [
        "Generative probe (the greedy continuations above, scored by the dense model; the paper warns generation "
        "degrades first):",
        markdown_table(["variant", "dense model's perplexity of its text", "repeated 4-grams"], rows),
    ]


def accuracy_lines(e: EvalResult) -> list[str]:
    """Multiple-choice accuracy per variant and task (acc, and acc_norm where it differs), and retention."""
    acc = e.accuracy
    if not acc:
        return []
    tasks, retention = e.tasks, e.retention_pct
    headers = ["variant", *tasks, "average acc", "retention % (÷ dense)"]

    def cell(r: dict[str, Any] | None) -> str:
        return "–" if r is None else f"{r['acc']:.3f} / {r['acc_norm']:.3f}"

    rows = [
        [v, *(cell(a["tasks"].get(t)) for t in tasks), f"{a['average']['acc']:.3f}", fmt(retention.get(v), ".1f")]
        for v, a in acc.items()
    ]
    n = {t: a["tasks"][t]["n"] for a in acc.values() for t in a["tasks"]}
    limit = f"the first {e.limit} items of each" if e.limit else "every item"
    return [
        f"Multiple-choice accuracy (acc / acc_norm, {limit}: " + ", ".join(f"{t} n={n[t]}" for t in tasks) + "); "
        "retention is the paper's measure: the variant's average acc ÷ dense's × 100.",
        markdown_table(headers, rows),
    ]


def gen_section(run: RunFolder, status: dict[str, StageStatus]) -> str:
    """ShortGPT-gen beside the others: prompted perplexity (the only one a gen model has) and greedy agreement."""
    e = run.evaluation
    prompted = e.prompted_perplexity if e else {}
    if e is None or not prompted:
        return ""
    first = next(iter(prompted.values()))
    base = (prompted.get("dense") or {}).get("perplexity")
    agree = {a["variant"]: a for a in e.agreement if a.get("reference") == "dense"}
    rows = [
        [n, f"{r['perplexity']:.3f}", _ratio(r["perplexity"], base),
         f"{agree[n]['token_match']:.1%}" if n in agree else "–"]
        for n, r in prompted.items()
    ]  # fmt: skip
    gen = ", ".join(e.gen_variants)
    return "\n\n".join([
        "## ShortGPT-gen",
        f"{gen}: every weight kept; the plan's layers skip the prompt (still writing its K/V) and run for every "
        "generated token (gen.py). Its perplexity is measured as generation sees it, and so is everyone's here: "
        f"{first['spans']} spans of {e.text}, each a {first['prompt_len']}-token prompt then "
        f"{first['scored_len']} tokens scored one decoding step at a time.",
        markdown_table(["variant", "prompted perplexity", "÷ dense", "greedy tokens identical to dense"], rows),
        *_gen_serving(run.summary, e.gen_variants),
    ])  # fmt: skip


def _gen_serving(summary: BenchSummary | None, gen_variants: list[str]) -> list[str]:
    """What a served gen variant buys and costs at the lightest load level: TTFT against the prefill FLOP ideal,
    TPOT against the dense model's (the same layers run for every generated token)."""
    if summary is None:
        return []
    lv, base, out = summary.levels[0], summary.baseline, []
    for v in gen_variants:
        if v not in summary.variants:
            continue
        ttft = ttft_finding(summary.to_dict(), v) or f"{v}: no TTFT ratio (runs missing, or no prompt length)"
        tpot = [(summary.variants[n][lv].get("median") or {}).get("p50_tpot_ms") for n in (base, v)]
        line = f"Served: {ttft}."
        if all(tpot):
            line += (f" TPOT p50 {tpot[0]:.1f} → {tpot[1]:.1f} ms ({tpot[1] / tpot[0]:.2f}× {base}'s; every decoding "
                     "step runs all layers, so the ideal is 1.00×).")  # fmt: skip
        out.append(line)
    return out


# ---------------------------------------------------------------------------------------------- serving
def repair_section(run: RunFolder, infos: dict[str, VariantInfo], status: dict[str, StageStatus]) -> str:
    """How the pruned model was repaired (repair.json), and what it bought: pruned → repaired, beside dense."""
    if run.repair is None and status.get("repair", StageStatus("not run")).state in ("not run", "skipped"):
        return ""
    out = ["## Repair"]
    if run.repair is None:
        return "\n\n".join([*out, _absent("repair", status["repair"])])
    from .repair import step_table

    r = run.repair
    out.append(
        f"{' then '.join(r.methods)}, fitted on {r.tokens} tokens of {r.data.get('source', '?')} in "
        f"{r.time_s:.1f} s and folded into the weights: `repaired/` has the pruned checkpoint's tensor names and "
        "shapes (so the same speed), and loads in transformers and vLLM as it is."
    )
    ppl = {n: i.perplexity for n, i in infos.items()}
    if all(ppl.get(n) for n in ("dense", "pruned", "repaired")):
        gap = math.log(ppl["pruned"] / ppl["dense"])
        back = math.log(ppl["pruned"] / ppl["repaired"]) / gap if gap > 0 else None
        if back is None:
            verdict = "pruning did not raise perplexity"
        elif back > 1:
            verdict = "below the dense model's"
        else:
            verdict = f"{back:.1%} of the pruned model's log-perplexity gap recovered"
        out.append(
            f"Perplexity: dense {ppl['dense']:.2f}, pruned {ppl['pruned']:.2f}, repaired {ppl['repaired']:.2f} "
            f"({verdict})."
        )
    for step in r.steps:
        out += [f"**{step.method}** ({step.time_s:.1f} s):", step_table(step), *(f"- {n}" for n in step.notes)]
    return "\n\n".join(out)


def serving_section(run: RunFolder, status: dict[str, StageStatus], plots: bool) -> str:
    """The bench table, plots and verdicts; quantized ÷ float speed, paired by repeat, is in quantization_section."""
    out = ["## Serving (vLLM `bench serve`)"]
    if run.summary is None:
        return "\n\n".join([*out, _absent("bench", status["bench"]), *_failed_runs(run.runs)])
    s = run.summary.to_dict()  # the serving tables read summary.json's layout
    if status["bench"].state == "failed":
        out.append(_absent("bench", status["bench"]) + " What did run is below.")
    out += ["\n".join(bench_context(s)), markdown_table(*summary_rows(s))]
    if plots:
        out += ["![Output tokens/s per load level and variant](plots/throughput.png)",
                "![Latency percentiles per metric, load level and variant](plots/latency.png)"]  # fmt: skip
    if lines := verdicts(s):
        out.append("Against the FLOP ideal (the output tokens/s ratio if time per token followed FLOPs per token):")
        out.append("\n".join(f"- {line}" for line in lines))
    return "\n\n".join([*out, *_failed_runs(run.runs)])


def _failed_runs(runs: list[RunRecord]) -> list[str]:
    bad = [r for r in runs if r.status != "ok"]
    if not runs or not bad:
        return [f"All {len(runs)} benchmark runs succeeded."] if runs else []
    lines = [
        f"- r{r.repeat} {r.variant} {r.level}: **{r.status}**"
        + (f" — {' '.join(str(r.message).split())}" if r.message else "")
        for r in bad
    ]
    return [f"### Benchmark runs that did not succeed ({len(bad)} of {len(runs)})", "\n".join(lines)]


# ---------------------------------------------------------------------------------------------- what GPTQ buys
def _gains(q: VariantInfo, p: VariantInfo, agreement: dict[str, Any] | None) -> str:
    parts = []
    if (qb := q.weight_bytes) and (pb := p.weight_bytes):
        parts.append(f"weights {_bytes(pb)} → {_bytes(qb)} ({_bytes(pb - qb)} saved, {qb / pb:.3f}× the bytes)")
    if q.perplexity and p.perplexity:
        change = 100 * (q.perplexity / p.perplexity - 1)
        parts.append(f"perplexity {p.perplexity:.3f} → {q.perplexity:.3f} ({change:+.1f}%)")
    if agreement:
        parts.append(f"{agreement['token_match']:.1%} of greedy tokens identical to {p.name}")
    return f"**{q.name} vs {p.name}**: " + ("; ".join(parts) or "no size or quality measured") + "."


def quantization_section(run: RunFolder, infos: dict[str, VariantInfo], status: dict[str, StageStatus]) -> str:
    """In words, per quantized variant against its float parent: bytes saved, quality lost, speed gained or not."""
    out = ["## What quantization buys"]
    if not status["quantize"].ok:
        out.append(_absent("quantize", status["quantize"]))
    elif status["quantize"].servable is False:  # quantized for a GPU because this machine's vLLM cannot serve it
        out.append(f"Quantize stage: {status['quantize'].note}.")
    pairs = [
        (q, infos[p]) for q in infos.values() if (p := q.name.removesuffix(QUANTIZED_SUFFIX)) != q.name and p in infos
    ]
    if not pairs and len(out) == 1:
        out.append("_No quantized variant with its float parent to compare._")
    agreement = {(a["variant"], a["reference"]): a for a in (run.evaluation.agreement if run.evaluation else [])}
    for q, p in pairs:
        out.append(_gains(q, p, agreement.get((q.name, p.name))))
        if run.summary is not None and {q.name, p.name} <= set(run.summary.variants):
            out.append(speed_finding(run.summary.to_dict(), q.name, p.name))
        else:
            out.append(f"Speed: {q.name} and {p.name} were not both benchmarked.")
    return "\n\n".join(out)


# ---------------------------------------------------------------------------------------------- entry point
def _measured(summary: BenchSummary | None) -> bool:
    """Whether any run of the benchmark succeeded (else there is nothing to plot)."""
    if summary is None:
        return False
    return any(c.get("median") for levels in summary.variants.values() for c in levels.values())


def analyses_section(run_dir: Path) -> str:
    """The paper's analyses that `analyze RUN_DIR --what ...` wrote into the run folder, each with its plot."""
    from .analyze_plots import markdown_section

    run, parts = RunDir(run_dir), []
    for what in ANALYSES:
        data = run.load_analysis(what)
        if data is not None:
            parts.append(markdown_section(data, run.analysis_paths(what)[1].name))
    if not parts:
        return "## Analyses\n\nNone yet: `shortgpt-deploy analyze RUN_DIR --what WHAT` adds them here."
    return "## Analyses\n\n" + "\n\n".join(parts)


def write_report(run_dir: Path) -> Path:
    """Write RUN_DIR/report.md (and plots/throughput.png, plots/latency.png when there are bench results)."""
    run = load_run(Path(run_dir))
    status, infos, plots = stage_status(run), variant_infos(run), _measured(run.summary)
    if plots:
        run.dir.plots.mkdir(exist_ok=True)
        summary = run.summary.to_dict()  # type: ignore[union-attr]  (_measured: not None)
        plot_throughput(summary, run.dir.plots / "throughput.png")
        plot_latency(summary, run.dir.plots / "latency.png")
    sections = [
        header_section(run, status),
        scores_section(run, status),
        quality_section(run, infos, status),
        repair_section(run, infos, status),
        gen_section(run, status),
        serving_section(run, status, plots),
        quantization_section(run, infos, status),
        analyses_section(run.path),
    ]
    path = run.dir.report
    atomic_write_text(path, "\n\n".join(x for x in sections if x) + "\n")
    return path
