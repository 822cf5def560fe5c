"""Low level: what this machine runs on (GPU or CPU, vLLM's CPU kernels), optional libraries imported with their
install hint, and third-party output kept off the console and in a log file.

Every stage asks here, so "is there a GPU" or "can this vLLM serve 4-bit GPTQ" has one answer per machine.

Third-party output:

The libraries we call write in four ways: through their loggers (torchao's "Failed to load ... _C_mxfp8 ... .so"
warnings), as Python warnings, with progress bars and print() on sys.stdout/sys.stderr (transformers' "Loading
weights", GPTQModel's banner and tables), and from C++ straight to file descriptors 1 and 2 (torch's
"W1203 ... _pytree.py" lines, logged by handlers that hold the stderr of import time). Only redirecting the
descriptors catches all four, whichever stream object a library holds. So while `third_party_output(log)` is
active, descriptors 1 and 2 point at the log; our own output takes `CONSOLE`, which writes to the terminal that
stderr was before: the CLI's console (and through it our log records), and our progress bars (`tqdm` here).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import MissingDependencyError, ShortGPTError

logger = logging.getLogger(__name__)

GPTQ_EXTRA = "pip install 'shortgpt-deploy[gptq]'"


# --------------------------------------------------------------------------------------- machine probes
def on_gpu() -> bool:
    """Whether torch sees a CUDA GPU (no torch: no)."""
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def available_memory_bytes(device: Any) -> int:
    """Memory free for new tensors on `device` (a torch.device): the GPU's free memory, or MemAvailable."""
    if device.type == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def cpu_has_native_bf16() -> bool:
    """Whether this CPU does bf16 math natively (AVX-512 bf16 / AMX). Elsewhere torch emulates it: on an AVX2-only
    AMD EPYC (2026-12-04, BENCHMARKS.md) a bf16 matmul took 8.8x a float32 one, and vLLM served SmolLM2 in fp32
    at 1.36x the bf16 output tok/s (prefill 5.9x faster, decode 14% slower). Where it is native (an AVX-512 bf16
    AMD EPYC, 2026-12-06) bf16 served at 1.64x the fp32 output tok/s."""
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported())


def cpu_has_int4_kernel() -> bool:
    """Whether this machine's vLLM CPU build has the 4-bit GPTQ matmul (`torch.ops._C.cpu_gemm_wna16`).

    vLLM loads the library that matches the CPU (AVX-512 or AVX2) when `vllm._custom_ops` is imported; only the
    AVX-512 ones have the op. No vLLM at all answers False: nothing here could serve the checkpoint.
    """
    try:
        import torch
        import vllm._custom_ops  # noqa: F401  (loads the kernel library as a side effect)
    except Exception as err:  # ImportError, or a vLLM that fails to initialise: either way no kernel
        logger.debug("vLLM's CPU kernels are not importable: %s", err)
        return False
    return hasattr(torch.ops._C, "cpu_gemm_wna16")


def vllm_installed() -> bool:
    """Found, not imported: importing vLLM takes seconds."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


# ----------------------------------------------------------------------------------- optional libraries
def import_gptqmodel() -> Any:
    """GPTQModel (the `gptq` extra), or MissingDependencyError with the install command."""
    # GPTQModel sizes its CPU thread pool from this at first use. Its default, half of os.cpu_count(), is 1 on a
    # 2-core machine, and 7.6.0 then fails at the first quantize() ("Virtual pool 'model_loader:cpu' requests 2
    # workers but parent 'cpu' only has 1"): so at least 2, and every core we may use.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, len(os.sched_getaffinity(0)))))
    try:
        with stdout_to_stderr():
            import gptqmodel
    except ImportError as err:
        raise MissingDependencyError(
            f"GPTQ quantization needs GPTQModel, which is not installed ({err}): {GPTQ_EXTRA}"
        ) from None
    return gptqmodel


# ----------------------------------------------------------------------------------- third-party output
def stdout_to_stderr() -> contextlib.AbstractContextManager[Any]:
    """For libraries that print to stdout (GPTQModel's banner, tables and progress bars): stdout belongs to our
    caller (`--json`)."""
    return contextlib.redirect_stdout(sys.stderr)


# The terminal of each active capture, innermost last (a capture inside another writes to the same terminal).
_terminals: list[Any] = []


class _Console:
    """stderr as the user sees it: the terminal during a capture, else whatever sys.stderr is now (a test's
    buffer, say). Looked up at every write, so streams made during a capture stay correct after it."""

    def _target(self) -> Any:
        return _terminals[-1] if _terminals else sys.stderr

    def write(self, text: str) -> int:
        return self._target().write(text)

    def __getattr__(self, name: str) -> Any:  # flush, isatty, fileno, encoding, ...
        return getattr(self._target(), name)


CONSOLE: Any = _Console()
# The logger of the console's summary lines (one per build stage): shown also where the console shows only
# warnings (stage_lines_only); like every record of ours it also goes to the log of a capture.
PROGRESS_LOGGER = "shortgpt_deploy.progress"
_bars = {"leave": True}


def tqdm(*args: Any, **kwargs: Any) -> Any:
    """Our progress bars, on the console also while third-party output goes to a log; they vanish when done
    where the console shows one line per stage (stage_lines_only)."""
    from tqdm.auto import tqdm as bar

    kwargs.setdefault("file", CONSOLE)
    kwargs.setdefault("leave", _bars["leave"])
    return bar(*args, **kwargs)


def stage_lines_only(handler: logging.Handler) -> list[logging.Handler]:
    """The console of a build: `handler` (the CLI's) keeps warnings and errors, a plain handler beside it the
    PROGRESS_LOGGER's lines, and progress bars vanish when done, so a stage leaves one line behind. Every INFO
    record of ours still reaches the log file of the capture it happens in (third_party_output)."""
    handler.setLevel(logging.WARNING)
    lines = logging.StreamHandler(CONSOLE)
    lines.setFormatter(logging.Formatter("%(message)s"))
    lines.addFilter(lambda r: r.name == PROGRESS_LOGGER and r.levelno < logging.WARNING)
    transient_bars(True)
    return [handler, lines]


def transient_bars(on: bool) -> None:
    """Whether our progress bars vanish when done (each command's logging setup says)."""
    _bars["leave"] = not on


class _OursOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == "shortgpt_deploy" or record.name.startswith("shortgpt_deploy.")


def _terminal() -> tuple[Any, bool]:
    """Where our output goes during a capture, and whether we opened it (and so must close it)."""
    if _terminals:
        return _terminals[-1], False
    try:
        on_fd2 = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # a buffer (pytest, typer's CliRunner): it stays ours
        on_fd2 = False
    if not on_fd2:
        return sys.stderr, False
    encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
    return open(os.dup(2), "w", buffering=1, encoding=encoding, errors="backslashreplace"), True  # noqa: SIM115


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


@contextlib.contextmanager
def third_party_output(log_path: Path) -> Iterator[Path]:
    """Send what libraries write (loggers, warnings, progress bars, raw writes to fds 1 and 2) to `log_path`
    (replaced), keeping the console for `CONSOLE` and the `shortgpt_deploy` loggers.

    A project error that passes through names the log (`ShortGPTError.log_path`, shown by the CLI) unless the
    log stayed empty; an empty log is removed.
    """
    log_path = Path(log_path)
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_bytes(b"")
        # Appending: the descriptors and this file object share one file, and each write must land at its end.
        log = log_path.open("a", buffering=1, encoding="utf-8", errors="backslashreplace")
    except OSError as err:
        raise ShortGPTError(
            f"cannot write the log file {log_path}: {err.strerror or err}; choose an output path in a folder you "
            "can write to"
        ) from None
    terminal, opened = _terminal()
    _flush_std()  # what was written before belongs where it was going
    saved = (os.dup(1), os.dup(2))
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    _terminals.append(terminal)
    root = logging.getLogger()
    to_log = logging.StreamHandler(log)
    to_log.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    ours = _OursOnly()
    console_handlers = list(root.handlers)
    for handler in console_handlers:
        handler.addFilter(ours)
    root.addHandler(to_log)
    showwarning = warnings.showwarning
    warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: log.write(
        warnings.formatwarning(message, category, filename, lineno, line)
    )
    error: ShortGPTError | None = None
    try:
        yield log_path
    except ShortGPTError as err:
        error = err
        raise
    finally:
        _flush_std()  # third-party text still buffered in sys.stdout/sys.stderr belongs in the log
        warnings.showwarning = showwarning
        root.removeHandler(to_log)
        for handler in console_handlers:
            handler.removeFilter(ours)
        _terminals.pop()
        for fd, old in zip((1, 2), saved, strict=True):
            os.dup2(old, fd)
            os.close(old)
        if opened:
            terminal.close()
        log.close()
        if log_path.stat().st_size == 0:
            log_path.unlink()
        elif error is not None and error.log_path is None:  # the innermost capture saw it first
            error.log_path = log_path
