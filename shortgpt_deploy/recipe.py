"""Recipes: the YAML a user writes, as strict pydantic models.

Every section forbids unknown keys so that a typo fails at load time with the field's path, instead of being
silently ignored and producing a different model than the one the user asked for.

This module is the bottom of the package: it imports no stage, so every stage may import it. The names only a
stage knows (task names, GPTQ schemes, SLOs) are marked here and checked by preflight.py, whose `load_recipe` /
`parse_recipe` are what a build reads a recipe with (see `stage_names`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from .errors import RecipeError

# Keys of importance.METRICS (a test keeps the two in step; importing importance here would pull in torch).
MetricName = Literal["bi", "relative_magnitude", "sequential", "reverse", "angular"]
# Metrics computed from hidden states; only these can be re-scored after each removal.
FORWARD_METRICS = ("bi", "relative_magnitude", "angular")
# Not a one-pass metric but a search (greedy.py): calibration perplexity itself, one removal at a time.
GREEDY_METRIC = "ppl_greedy"
PruneMetricName = Literal[MetricName, "ppl_greedy"]
PRUNE_METRICS: tuple[str, ...] = (*get_args(MetricName), GREEDY_METRIC)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Fields whose values are names only a stage knows: task names (tasks.py), the GPTQ scheme (quantize.py), SLOs
# (bench.py). The schema marks them; the check comes from preflight.check_stage_names through pydantic's validation
# context, so that it runs inside validation (same error format, same order as every other field's) while this
# module imports no stage. A section built in code, without that context, keeps its names as given.
StageNames = Literal["tasks", "scheme", "slos"]
NAMES_CONTEXT = "check_stage_names"


def stage_names(kind: StageNames, value: Any, info: ValidationInfo) -> Any:
    """`value` checked and normalised by the context's checker (raises ValueError), or as it is without one."""
    check = (info.context or {}).get(NAMES_CONTEXT)
    return value if check is None else check(kind, value)


class ModelSpec(_Section):
    path: str = Field(
        description="A Hugging Face hub id, a local folder, a .gguf file, or offline:NAME (see `shortgpt-deploy "
        "models`)."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    add_bos: bool | None = Field(
        default=None, description="Prepend BOS to calibration text; default: what the tokenizer does itself."
    )
    revision: str | None = None
    trust_remote_code: bool = Field(default=False, description="Run the model's own modelling code (Baichuan).")


class HFDatasetSpec(_Section):
    name: str = Field(description="Dataset id on the Hugging Face hub, e.g. pg19 (the paper's choice).")
    split: str = "test"
    field: str = "text"
    config: str | None = None
    max_documents: int | None = Field(default=None, ge=1)


class CalibrationSpec(_Section):
    files: list[Path] | None = Field(default=None, description="Text files or folders of .txt files.")
    dataset: HFDatasetSpec | None = None
    offline: str | None = Field(default=None, description="A packaged corpus, e.g. austen:emma.")
    samples: int = Field(default=64, ge=1)
    seq_len: int = Field(default=256, ge=8)
    batch_size: int = Field(default=8, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _one_source(self) -> CalibrationSpec:
        given = [k for k in ("files", "dataset", "offline") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of files, dataset or offline (got {given or 'none'})")
        return self

    @property
    def source(self) -> str:
        """A one-line description, used in scores.json and the manifest."""
        if self.files is not None:
            return "files:" + ",".join(str(p) for p in self.files)
        if self.dataset is not None:
            d = self.dataset
            return f"hf:{d.name}" + (f"/{d.config}" if d.config else "") + f"[{d.split}].{d.field}"
        return f"offline:{self.offline}"

    @classmethod
    def from_cli(cls, spec: str, **kwargs: Any) -> CalibrationSpec:
        """`austen:emma` or `offline:austen:emma` → packaged; `hf:pg19` → dataset; anything else → a path."""
        if spec.startswith("hf:"):
            return cls(dataset=HFDatasetSpec(name=spec[3:]), **kwargs)
        if spec.startswith("offline:"):
            return cls(offline=spec[len("offline:") :], **kwargs)
        if spec.startswith("austen:"):
            return cls(offline=spec, **kwargs)
        return cls(files=[Path(spec)], **kwargs)


# prune.budget: its default tasks, and the settings that belong to each of its two criteria.
RETENTION_TASKS = ("piqa", "arc_easy")  # short prompts, 2 and 4 choices: a few hundred forward passes per point
PERPLEXITY_FIELDS = ("text", "max_tokens", "context_len", "stride")
RETENTION_FIELDS = ("tasks", "limit", "batch_size")


class BudgetSpec(_Section):
    """Remove as many layers (in the metric's order) as keep quality within a bound; exactly one criterion:
    held-out perplexity (max_ppl_increase_pct) or multiple-choice retention (min_retention_pct)."""

    max_ppl_increase_pct: float | None = Field(
        default=None, gt=0, description="Allowed rise of held-out perplexity, in percent."
    )
    min_retention_pct: float | None = Field(
        default=None,
        gt=0,
        le=100,
        description="Least multiple-choice retention (pruned average acc ÷ dense average acc × 100) to keep.",
    )
    # perplexity criterion
    text: str = Field(
        default="austen:sensesensibility",
        description="Selection text: held out from calibration, and best not the text the report evaluates on.",
    )
    max_tokens: int = Field(default=4096, ge=16)
    context_len: int = Field(default=512, ge=8)
    stride: int = Field(default=256, ge=1)
    # retention criterion
    tasks: list[str] = Field(
        default_factory=lambda: list(RETENTION_TASKS),
        description="Multiple-choice tasks whose average accuracy is retained (cheap ones by default).",
    )
    limit: int = Field(default=100, ge=1, description="First N items of each task (reproducible).")
    batch_size: int = Field(default=8, ge=1)
    max_ratio: float = Field(default=0.5, gt=0, lt=1, description="Never remove more than this share of layers.")

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, value: list[str], info: ValidationInfo) -> list[str]:
        if not value:
            raise ValueError("list at least one task, e.g. [piqa, arc_easy]")
        return stage_names("tasks", value, info)

    @model_validator(mode="after")
    def _one_criterion(self) -> BudgetSpec:
        given = [k for k in ("max_ppl_increase_pct", "min_retention_pct") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of max_ppl_increase_pct or min_retention_pct (got {given or 'none'})")
        # A setting of the other criterion would be silently unused: say so instead.
        other, name = (
            (RETENTION_FIELDS, "min_retention_pct")
            if self.max_ppl_increase_pct is not None
            else (PERPLEXITY_FIELDS, "max_ppl_increase_pct")
        )
        stray = [k for k in other if k in self.model_fields_set]
        if stray:
            raise ValueError(f"{', '.join(stray)}: only used with {name}, not with {given[0]}")
        return self

    @property
    def criterion(self) -> Literal["perplexity", "retention"]:
        return "perplexity" if self.max_ppl_increase_pct is not None else "retention"


PruneMode = Literal["delete", "gen"]  # delete: pruned/ (layers removed); gen: gen/ (ShortGPT-gen, gen.py)


class PruneSpec(_Section):
    metric: PruneMetricName = "bi"
    n_remove: int | None = Field(default=None, ge=1)
    ratio: float | None = Field(default=None, gt=0, lt=1)
    layers: list[int] | None = Field(default=None, description="Explicit layer indices to remove.")
    budget: BudgetSpec | None = Field(
        default=None, description="Choose the amount by a perplexity or multiple-choice retention budget."
    )
    protect: list[int] = Field(
        default_factory=lambda: [0, -1], description="Layers never removed; negative counts from the end."
    )
    iterative: bool = Field(default=False, description="Re-score the remaining layers after each removal.")
    plot: bool = Field(
        default=False,
        description="With explicit layers: score the model anyway, for scores.json and the plot bi.png (the other "
        "amounts always score and plot).",
    )
    mode: tuple[PruneMode, ...] = Field(
        default=("delete",),
        description="delete: remove the layers (pruned/); gen: ShortGPT-gen, keep every layer, the chosen ones skip "
        "the prompt but cache its K/V and run for generated tokens (gen/, see gen.py); [delete, gen]: both, from "
        "the same plan.",
    )
    stream: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Score one decoder layer at a time, read from the safetensors files (streaming.py): on, off, or "
        "auto (when the weights do not fit in the scoring device's memory). One-pass metrics only.",
    )
    rotate_skipped_keys: bool = Field(
        default=True,
        description="gen: cache the skipped layers' prompt keys with rotary applied (false: unrotated, as the "
        "authors' code does).",
    )

    @field_validator("mode", mode="before")
    @classmethod
    def _mode_list(cls, value: Any) -> Any:
        modes = (value,) if isinstance(value, str) else tuple(value)
        if not modes or len(set(modes)) != len(modes):
            raise ValueError("mode: give delete, gen, or [delete, gen] (each once)")
        return modes

    @model_validator(mode="after")
    def _one_amount(self) -> PruneSpec:
        given = [k for k in ("n_remove", "ratio", "layers", "budget") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of n_remove, ratio, layers or budget (got {given or 'none'})")
        if "plot" in self.model_fields_set and self.layers is None:
            raise ValueError(f"plot only applies to an explicit layer list: {given[0]} always scores and plots")
        if self.budget is not None and self.metric == "angular":
            raise ValueError("a budget grows the removal one layer at a time; angular removes one contiguous block")
        if self.iterative and self.metric == GREEDY_METRIC:
            raise ValueError(
                "ppl_greedy already re-evaluates every remaining layer after each removal; drop iterative: true"
            )
        if self.iterative and self.metric not in FORWARD_METRICS:
            raise ValueError(
                f"iterative re-scoring needs a metric computed from hidden states ({', '.join(FORWARD_METRICS)}); "
                f"'{self.metric}' is a fixed order"
            )
        if self.iterative and self.metric == "angular":
            raise ValueError("angular already removes one contiguous block; use iterative with bi instead")
        if "rotate_skipped_keys" in self.model_fields_set and "gen" not in self.mode:
            raise ValueError("rotate_skipped_keys only applies to mode: gen")
        return self


class OutputSpec(_Section):
    dir: Path = Field(description="Run folder; relative paths are relative to the current directory.")


# The checkpoints a build can produce, by the names used in run folders, eval.json and the benchmark.
SOURCE_VARIANTS = ("dense", "pruned", "repaired")  # the float checkpoints: the model, it pruned, that repaired
QUANTIZED_SUFFIX = "-gptq"
GEN_VARIANT = "gen"  # ShortGPT-gen: the dense weights, the plan's layers skipping the prompt (gen.py)
VARIANTS = (*SOURCE_VARIANTS, *(v + QUANTIZED_SUFFIX for v in SOURCE_VARIANTS), GEN_VARIANT)
VariantName = Literal["dense", "pruned", "repaired", "dense-gptq", "pruned-gptq", "repaired-gptq", "gen"]
RepairMethod = Literal["linear", "scale", "distill"]


class DistillSpec(_Section):
    """Knowledge distillation from the dense model into the repaired one, on the calibration batches."""

    trainable: Literal["layers", "lora"] = Field(
        default="layers", description="layers: the kept layers beside each gap; lora: adapters on every decoder "
        "linear layer, merged back before saving."
    )  # fmt: skip
    lora_rank: int = Field(default=8, ge=1)
    lora_alpha: float = Field(default=16.0, gt=0)
    lr: float = Field(default=1e-4, gt=0)
    temperature: float = Field(default=1.0, gt=0)
    hidden_weight: float = Field(default=0.0, ge=0, description="Weight of an MSE term on the gaps' hidden states.")
    max_steps: int = Field(default=200, ge=1)
    max_tokens: int | None = Field(default=None, ge=1, description="Training tokens; none: no token budget.")
    max_time_s: float | None = Field(default=600.0, gt=0, description="Wall-time budget; none: no time budget.")
    eval_every: int = Field(default=10, ge=1, description="Steps between held-out losses (early stopping).")
    patience: int = Field(default=3, ge=1, description="Held-out evaluations without improvement before stopping.")
    holdout: float = Field(default=0.125, gt=0, lt=1, description="Share of the calibration batches held out.")
    seed: int = 0


class RepairSpec(_Section):
    """Repair of the pruned model, folded into its weights (a stock checkpoint, same shapes): repaired/."""

    method: list[RepairMethod] = Field(
        min_length=1,
        description="Applied in this order to the same model: linear (ReplaceMe: a fitted map per gap folded into "
        "down_proj), scale (per-gap magnitude compensation).",
    )
    objective: Literal["lstsq", "cosine"] = Field(default="lstsq", description="linear: least squares or cosine.")
    ridge: float = Field(default=1e-4, ge=0, description="linear: pull T towards the identity (relative to MᵀM).")
    samples: int = Field(default=64, ge=1, description="Blocks of the recipe's calibration text to fit on.")
    seq_len: int = Field(default=256, ge=8)
    batch_size: int = Field(default=8, ge=1)
    distill: DistillSpec | None = Field(default=None, description="Settings of the distill method.")

    @field_validator("method", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("method")
    @classmethod
    def _each_once(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"each method once: {value}")
        return value

    @model_validator(mode="after")
    def _distill_settings_need_distill(self) -> RepairSpec:
        if self.distill is not None and "distill" not in self.method:
            raise ValueError("distill: settings given but method does not include distill; add it or drop them")
        return self


class QuantizeSpec(_Section):
    """GPTQ after pruning; calibrated on the recipe's calibration text (longer and more blocks than scoring)."""

    scheme: str = Field(default="auto", description="auto (what the serving target can run), w4a16 or w8a16.")
    target: Literal["auto", "cpu", "gpu"] = Field(default="auto", description="Where it will be served.")
    variants: list[Literal["dense", "pruned", "repaired"]] = Field(
        default_factory=lambda: ["dense", "pruned"],
        description="Checkpoints to quantize; dense and pruned give the paper's Table 2 shape (the savings add up).",
    )
    samples: int = Field(default=128, ge=1)
    seq_len: int = Field(default=512, ge=8)
    batch_size: int = Field(default=8, ge=1)

    @field_validator("scheme")
    @classmethod
    def _known_scheme(cls, value: str, info: ValidationInfo) -> str:
        return stage_names("scheme", value, info)


class EvalSpec(_Section):
    """Quality of every variant: perplexity on held-out text, and greedy agreement with the unquantized model."""

    text: str = Field(default="austen:persuasion", description="Held-out text: austen:NOVEL or a file.")
    context_len: int = Field(default=512, ge=8)
    stride: int = Field(default=256, ge=1)
    max_tokens: int = Field(default=16384, ge=16)
    greedy_prompts: int = Field(default=8, ge=0, description="Prompts (spans of the held-out text) for agreement.")
    greedy_tokens: int = Field(default=32, ge=1, description="Greedy tokens generated per prompt.")
    tasks: list[str] = Field(
        default_factory=list, description="Multiple-choice tasks (mmlu, hellaswag, piqa, boolq, arc_easy, ...)."
    )
    limit: int | None = Field(default=None, ge=1, description="First N items of each task (reproducible).")
    shots: int | None = Field(default=None, ge=0, description="Few-shot examples per prompt (default: MMLU 5, else 0).")
    batch_size: int = Field(default=8, ge=1)
    generation_probe: bool = Field(
        default=False, description="Score the greedy continuations by the dense model's perplexity and repetition."
    )
    prompt_len: int = Field(
        default=224, ge=1, description="With a gen variant: prompted perplexity's prompt tokens per span."
    )
    scored_len: int = Field(
        default=32, ge=1, description="With a gen variant: tokens scored after each prompt, one decoding step each."
    )

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, value: list[str], info: ValidationInfo) -> list[str]:
        return stage_names("tasks", value, info) if value else []

    @model_validator(mode="after")
    def _stride_fits(self) -> EvalSpec:
        if self.stride > self.context_len:
            raise ValueError(f"stride ({self.stride}) must not exceed context_len ({self.context_len})")
        return self


class ServeSpec(_Section):
    """vLLM settings for serving the variants (the benchmark starts each one with them)."""

    preset: str | None = Field(default=None, description="A file in serving/ (cpu, gpu, ...) or a YAML path.")
    dtype: str | None = Field(default=None, description="auto: float32 on CPUs without bf16 math, else bfloat16.")
    max_model_len: int | None = Field(default=None, ge=16)
    kv_cache_gib: int | None = Field(default=None, ge=1, description="CPU: GiB of RAM for the KV cache.")
    cpu_cores: str | None = Field(default=None, description="CPU: cores for vLLM's threads, e.g. 0-1.")
    tensor_parallel_size: int | None = Field(default=None, ge=1, description="GPU: shard each layer over N GPUs.")
    pipeline_parallel_size: int | None = Field(default=None, ge=1, description="GPU: split the layers over N GPUs.")
    distributed_executor_backend: Literal["mp", "ray"] | None = Field(
        default=None, description="GPU: mp (one machine) or ray (a Ray cluster of several); default: vLLM's choice."
    )
    extra_args: list[str] = Field(default_factory=list, description="More `vllm serve` flags, verbatim.")


class BenchSpec(_Section):
    """`vllm bench serve` against each variant, one receiving load at a time, repeats interleaved."""

    variants: list[VariantName] = Field(
        default_factory=lambda: ["dense", "pruned", "pruned-gptq"], description="The first is the baseline."
    )
    input_len: int = Field(default=128, ge=1)
    output_len: int = Field(default=64, ge=1)
    num_prompts: int = Field(default=16, ge=1)
    dataset: Path | None = Field(default=None, description="JSONL prompts ({'prompt': ...}) instead of random.")
    concurrency: list[int] | None = Field(default=None, description="Max-concurrency levels (default [1, 4]).")
    request_rates_per_s: list[float] | None = Field(default=None, description="Poisson request rates instead.")
    repeats: int = Field(default=2, ge=1)
    warmups: int = Field(default=2, ge=0)
    seed: int = 0
    slos: list[str] = Field(default_factory=list, description="Goodput SLOs, e.g. ttft:500 (ms).")
    timeout_s: float = Field(default=900.0, gt=0, description="Limit per vLLM client run.")
    restart: Literal["per_repeat", "once"] = Field(
        default="once",
        description="once: each variant's server starts once and stays up, the repeats alternating between the "
        "servers (per_repeat where they would not all fit: a GPU, too little RAM); per_repeat: a fresh server "
        "for every repeat, one up at a time (`shortgpt-deploy bench`'s default, `make bench-serve`).",
    )

    @field_validator("slos")
    @classmethod
    def _slos_parse(cls, value: list[str], info: ValidationInfo) -> list[str]:
        return stage_names("slos", value, info)

    @model_validator(mode="after")
    def _levels(self) -> BenchSpec:
        if self.concurrency is not None and self.request_rates_per_s is not None:
            raise ValueError("give load levels as concurrency or as request_rates_per_s, not both")
        if not self.variants or len(set(self.variants)) != len(self.variants):
            raise ValueError("list at least one variant, each once")
        return self


class Recipe(_Section):
    name: str | None = None
    description: str | None = None
    model: ModelSpec
    calibration: CalibrationSpec
    prune: PruneSpec
    repair: RepairSpec | None = None
    quantize: QuantizeSpec | None = None
    eval: EvalSpec | None = None
    serve: ServeSpec | None = None
    bench: BenchSpec | None = None
    output: OutputSpec

    @model_validator(mode="after")
    def _stages_fit(self) -> Recipe:
        quantized = {v + QUANTIZED_SUFFIX for v in (self.quantize.variants if self.quantize else [])}
        missing = [v for v in (self.bench.variants if self.bench else []) if v.endswith(QUANTIZED_SUFFIX)]
        missing = [v for v in missing if v not in quantized]
        if missing:
            raise ValueError(
                f"bench variant(s) {', '.join(missing)} need a quantize section that quantizes "
                f"{', '.join(v.removesuffix(QUANTIZED_SUFFIX) for v in missing)}"
            )
        self._modes_fit()
        if self.repair is None:
            wanted = [*(self.quantize.variants if self.quantize else []), *(self.bench.variants if self.bench else [])]
            if any(v.startswith("repaired") for v in wanted):
                raise ValueError("quantize or bench names the repaired variant but there is no repair section")
        if self.eval is not None and self.calibration.offline is not None:
            if self.eval.text.removeprefix("offline:") == self.calibration.offline.removeprefix("offline:"):
                raise ValueError(
                    f"eval.text {self.eval.text} is the calibration text; evaluate on held-out text, e.g. "
                    "austen:persuasion"
                )
        return self

    def _modes_fit(self) -> None:
        """Each stage needs the checkpoint it works on: pruned/ exists only with mode delete, gen/ only with gen."""
        q = list(self.quantize.variants) if self.quantize else []
        b = list(self.bench.variants) if self.bench else []
        if "delete" not in self.prune.mode:
            wanted = [
                *(["repair"] if self.repair else []),
                *(f"quantize.variants: {v}" for v in q if v != "dense"),
                *(f"bench.variants: {v}" for v in b if v.startswith(("pruned", "repaired"))),
            ]
            if wanted:
                raise ValueError(
                    f"prune.mode {list(self.prune.mode)} deletes no layer, so there is no pruned checkpoint for "
                    f"{', '.join(wanted)}: add delete to prune.mode ([delete, gen]) or drop them"
                )
        if GEN_VARIANT in b and "gen" not in self.prune.mode:
            raise ValueError("bench.variants names gen but prune.mode has no gen: use mode: [delete, gen]")


def _format_errors(err: ValidationError, model: type[BaseModel]) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed_fields(model, e["loc"][:-1]))
            lines.append(f"  {where}: unknown field (allowed here: {allowed})")
        else:
            lines.append(f"  {where}: {e['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


# pydantic's error types for a number outside a Field's bounds, and how we say each bound
_BOUND_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")
_BOUND_WORDS = {"gt": "greater than", "ge": "at least", "lt": "less than", "le": "at most"}


def option_errors(err: ValidationError, options: dict[str, str] | None = None) -> str:
    """A recipe section built from command-line options that does not validate, as one line per error naming
    the option (`--seq-len`, or `options[field]`) and its allowed range, e.g. `--samples must be at least 1, got 0`.

    Recipe files name the field's path instead (parse_recipe); pydantic's own text has a URL and no option name.
    """
    section = next((c for c in _Section.__subclasses__() if c.__name__ == err.title), None)
    lines = []
    for e in err.errors():
        if not e["loc"]:  # a rule across fields (model_validator): its message says what to do
            lines.append(e["msg"].removeprefix("Value error, "))
            continue
        name = str(next(p for p in reversed(e["loc"]) if isinstance(p, str)))  # a list item's error: the list's
        option = (options or {}).get(name, "--" + name.replace("_", "-"))
        field = section.model_fields.get(name) if section else None
        if e["type"] in _BOUND_ERRORS and field is not None:
            bounds = [f"{w} {getattr(m, k)}" for m in field.metadata for k, w in _BOUND_WORDS.items() if hasattr(m, k)]
            lines.append(f"{option} must be {' and '.join(bounds)}, got {e['input']}")
        else:
            lines.append(f"{option}: {e['msg'].removeprefix('Value error, ')}, got {e['input']!r}")
    return "\n".join(lines)


def _allowed_fields(model: type[BaseModel], loc: tuple) -> list[str]:
    """Walk the model classes along an error path to list the keys allowed at that level."""
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            break
        ann = field.annotation
        candidates = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type)]
        sub = next((a for a in candidates if issubclass(a, BaseModel)), None)
        if sub is None:
            break
        model = sub
    return list(model.model_fields)


def parse_schema(data: Any, *, origin: str = "recipe", check_stage_names: Any = None) -> Recipe:
    """A recipe from its YAML data; `check_stage_names(kind, value)` checks the stages' names (see stage_names):
    preflight.parse_recipe passes its own, which is how a build reads a recipe."""
    if not isinstance(data, dict):
        raise RecipeError(f"{origin}: expected a mapping with model, calibration, prune and output sections")
    try:
        return Recipe.model_validate(data, context={NAMES_CONTEXT: check_stage_names})
    except ValidationError as err:
        raise RecipeError(f"{origin} is not a valid recipe:\n{_format_errors(err, Recipe)}") from None


def read_recipe_file(path: str | Path) -> Any:
    """The YAML data of a recipe file (preflight.load_recipe checks it)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path} (the shipped recipes are in recipes/)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{path} is not valid YAML: {err}") from None
    return data
