"""Recipes: the YAML a user writes, as strict pydantic models.

Every section forbids unknown keys so that a typo fails at load time with the field's path, instead of being
silently ignored and producing a different model than the one the user asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import RecipeError

# Keys of importance.METRICS (a test keeps the two in step; importing importance here would pull in torch).
MetricName = Literal["bi", "relative_magnitude", "sequential", "reverse", "angular"]
# Metrics computed from hidden states; only these can be re-scored after each removal.
FORWARD_METRICS = ("bi", "relative_magnitude", "angular")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


class PruneSpec(_Section):
    metric: MetricName = "bi"
    n_remove: int | None = Field(default=None, ge=1)
    ratio: float | None = Field(default=None, gt=0, lt=1)
    layers: list[int] | None = Field(default=None, description="Explicit layer indices to remove.")
    protect: list[int] = Field(
        default_factory=lambda: [0, -1], description="Layers never removed; negative counts from the end."
    )
    iterative: bool = Field(default=False, description="Re-score the remaining layers after each removal.")

    @model_validator(mode="after")
    def _one_amount(self) -> PruneSpec:
        given = [k for k in ("n_remove", "ratio", "layers") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of n_remove, ratio or layers (got {given or 'none'})")
        if self.iterative and self.metric not in FORWARD_METRICS:
            raise ValueError(
                f"iterative re-scoring needs a metric computed from hidden states ({', '.join(FORWARD_METRICS)}); "
                f"'{self.metric}' is a fixed order"
            )
        if self.iterative and self.metric == "angular":
            raise ValueError("angular already removes one contiguous block; use iterative with bi instead")
        return self


class OutputSpec(_Section):
    dir: Path = Field(description="Run folder; relative paths are relative to the current directory.")


class Recipe(_Section):
    name: str | None = None
    description: str | None = None
    model: ModelSpec
    calibration: CalibrationSpec
    prune: PruneSpec
    output: OutputSpec


def _format_errors(err: ValidationError, model: type[BaseModel]) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed_fields(model, e["loc"][:-1]))
            lines.append(f"  {where}: unknown field (allowed here: {allowed})")
        else:
            lines.append(f"  {where}: {e['msg']}")
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


def parse_recipe(data: Any, *, origin: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{origin}: expected a mapping with model, calibration, prune and output sections")
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(f"{origin} is not a valid recipe:\n{_format_errors(err, Recipe)}") from None


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path} (the shipped recipes are in recipes/)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{path} is not valid YAML: {err}") from None
    return parse_recipe(data, origin=str(path))
