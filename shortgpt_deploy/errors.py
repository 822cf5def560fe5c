"""Project errors. Library code raises these with a message that names the fix; only the CLI prints them."""

from __future__ import annotations

from pathlib import Path


class ShortGPTError(Exception):
    """Base class: the message is shown to the user as it is, so it must say what to do."""

    # Set by runtime.third_party_output when the error leaves it: where the libraries' output of that step went.
    log_path: Path | None = None


class RecipeError(ShortGPTError):
    """A recipe file that does not parse or validate."""


class ModelLoadError(ShortGPTError):
    """A model that cannot be found, downloaded or understood."""


class UnsupportedArchitectureError(ModelLoadError):
    """An architecture whose decoder layers we do not know how to find or slice."""


class CalibrationError(ShortGPTError):
    """Calibration text that is missing, empty or too short."""


class PlanError(ShortGPTError):
    """A removal request that cannot be honoured (out of range, protected, all layers, ...)."""


class EvalError(ShortGPTError):
    """Evaluation settings or data that cannot work (evaluate.py, multiple_choice.py)."""


class OutputExistsError(ShortGPTError):
    """An output folder that already exists without --force."""


class CheckpointError(ModelLoadError):
    """A checkpoint whose files are damaged: invalid JSON, a safetensors file that does not match its header,
    a decoder layer that lacks tensors its siblings have."""


class OutputWriteError(ShortGPTError):
    """An output that could not be written (a full disk); nothing of it is left behind."""


class MissingDependencyError(ShortGPTError):
    """An optional library a step needs is not installed; the message gives the install command."""
