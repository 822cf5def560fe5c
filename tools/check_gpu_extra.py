"""Does the GPU install resolve to the pinned versions, and do they agree? A CI-style check; it needs PyPI.

    python3 tools/check_gpu_extra.py [--extras gpu,gptq,hub,dev] [--keep-report OUT.json] [--plain-pip]
    python3 tools/check_gpu_extra.py --from-report REPORT.json      # check a saved report, no network

It makes a throwaway venv, upgrades pip there and asks pip's resolver what `make install PLATFORM=gpu` would
install (`pip install --dry-run --ignore-installed --report`, nothing is installed), then checks the report:

- vllm and gptqmodel are pinned by pyproject.toml (an `==` in the extra) and the chosen versions are the pinned
  ones (the project's own requirements, read from the report, hold);
- torch, torchvision and torchaudio are not `+cpu` builds;
- every chosen package's requirements, markers evaluated for the report's environment and extras carried down
  the tree, are met by the chosen versions: torch and transformers are what the chosen vllm pins, and GPTQModel
  accepts that torch.

One line per key package, then the problems. Exit 0 when all hold, 1 when a check fails, 2 when the resolver
fails. Not part of `make test` (network, a minute or two); `make check-gpu-extra` runs it. pip reads this
machine's configuration (indexes, find-links, constraint files) as `make install` would; `--plain-pip` drops it
all (PyPI only), which is what a fresh GPU machine sees.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version
except ImportError:  # a bare python3: pip carries its own copy
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name
    from pip._vendor.packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "shortgpt-deploy"
# the packages whose agreement the GPU path depends on; each gets one line
KEY = ("vllm", "torch", "transformers", "gptqmodel", "numpy")
# these must be pinned (an `==` in our own requirements), not left to the resolver
PINNED = ("vllm", "gptqmodel")
# a `+cpu` build of these satisfies vllm's `torch==X.Y.Z` too, and pip prefers it where a find-links folder or
# an extra index offers it (this project's development machine has torch-2.13.0+cpu in /opt/wheels)
CUDA_BUILDS = ("torch", "torchvision", "torchaudio")


def chosen_versions(report: dict[str, Any]) -> dict[str, Version]:
    """Canonical name → version of every package the report would install."""
    return {canonicalize_name(i["metadata"]["name"]): Version(i["metadata"]["version"]) for i in report["install"]}


def _applies(req: Requirement, extras: set[str], env: dict[str, str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**env, "extra": extra}) for extra in {""} | extras)


def active_requirements(report: dict[str, Any]) -> dict[str, list[Requirement]]:
    """Canonical name → the requirements that apply to it in this resolution.

    A requirement applies when its marker holds for the report's environment with no extra or with one of the
    extras asked of the package: by the user (`requested_extras`) or by another package (`foo[bar]`), carried
    down the tree until nothing changes.
    """
    env = {**default_environment(), **report.get("environment", {})}
    items = {canonicalize_name(i["metadata"]["name"]): i for i in report["install"]}
    parsed = {name: [Requirement(r) for r in i["metadata"].get("requires_dist") or []] for name, i in items.items()}
    extras = {name: set(i.get("requested_extras") or []) for name, i in items.items()}
    changed = True
    while changed:
        changed = False
        for name, reqs in parsed.items():
            for req in reqs:
                dep = canonicalize_name(req.name)
                if dep in extras and _applies(req, extras[name], env) and not set(req.extras) <= extras[dep]:
                    extras[dep] |= set(req.extras)
                    changed = True
    return {name: [r for r in reqs if _applies(r, extras[name], env)] for name, reqs in parsed.items()}


def requirement_problems(report: dict[str, Any]) -> list[str]:
    """Every applying requirement that the chosen versions do not meet, as a sentence."""
    versions = chosen_versions(report)
    problems = []
    for name, reqs in sorted(active_requirements(report).items()):
        for req in reqs:
            dep = canonicalize_name(req.name)
            if dep not in versions:
                problems.append(f"{name} {versions[name]} requires {req} but the resolution has no {dep}")
            elif not req.specifier.contains(versions[dep], prereleases=True):
                problems.append(f"{name} {versions[name]} requires {req} but the resolution has {dep} {versions[dep]}")
    return problems


def pin_problems(report: dict[str, Any], project: str = PROJECT, pinned: tuple[str, ...] = PINNED) -> list[str]:
    """Packages of `pinned` that the project's own (applying) requirements do not pin with `==`."""
    reqs = active_requirements(report).get(canonicalize_name(project))
    if reqs is None:
        return [f"the report does not install {project} itself: was it resolved with `-e {ROOT}[...]`?"]
    problems = []
    for name in pinned:
        mine = [r for r in reqs if canonicalize_name(r.name) == name]
        if not any(s.operator in ("==", "===") for r in mine for s in r.specifier):
            found = ", ".join(str(r) for r in mine) or "not required at all"
            problems.append(f"{project} does not pin {name} ({found}): give it an `==X.Y.*` in pyproject.toml")
    return problems


def cpu_build_problems(report: dict[str, Any], names: tuple[str, ...] = CUDA_BUILDS) -> list[str]:
    """Packages of `names` resolved to a CPU-only build (local version `+cpu`): no use on a GPU."""
    versions = chosen_versions(report)
    return [
        f"{name} {versions[name]} is a CPU-only build: a find-links folder or extra index in pip's configuration "
        "offers it; `--plain-pip` (PyPI alone) shows what a GPU machine gets"
        for name in names
        if name in versions and (versions[name].local or "").startswith("cpu")
    ]


def key_lines(report: dict[str, Any], key: tuple[str, ...] = KEY) -> list[str]:
    """One line per key package: its chosen version and what the other chosen packages ask of it."""
    versions = chosen_versions(report)
    asked: dict[str, list[str]] = {name: [] for name in key}
    for name, reqs in sorted(active_requirements(report).items()):
        for req in reqs:
            dep = canonicalize_name(req.name)
            if dep in asked and str(req.specifier):
                ok = dep in versions and req.specifier.contains(versions[dep], prereleases=True)
                asked[dep].append(f"{name} {req.specifier}{'' if ok else ' NOT MET'}")
    lines = []
    for name in key:
        version = versions.get(name, "not chosen")
        lines.append(f"{name:<13} {version!s:<10} asked by: {'; '.join(asked[name]) or '-'}")
    return lines


def resolve(extras: str, report_path: Path, *, plain_pip: bool = False) -> float:
    """Run pip's resolver for the project with `extras` in a fresh venv; the report goes to `report_path`.

    `plain_pip` ignores pip's configuration files and PIP_* variables (PyPI alone). Returns the resolver's wall
    time in seconds; raises CalledProcessError when pip fails.
    """
    env = None
    if plain_pip:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | {"PIP_CONFIG_FILE": os.devnull}
    with tempfile.TemporaryDirectory(prefix="gpu-extra-") as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip"]
        subprocess.run([*pip, "install", "--quiet", "--upgrade", "pip"], check=True, env=env)
        cmd = [*pip, "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report_path),
               "-e", f"{ROOT}[{extras}]"]  # fmt: skip
        print("$", " ".join(cmd), flush=True)
        start = time.perf_counter()
        subprocess.run(cmd, check=True, env=env)
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extras", default="gpu,gptq,hub,dev", help="the extras `make install PLATFORM=gpu` asks")
    parser.add_argument("--from-report", type=Path, help="check this pip report instead of resolving (no network)")
    parser.add_argument("--keep-report", type=Path, help="also save the resolver's report here")
    parser.add_argument("--plain-pip", action="store_true", help="ignore pip's config files and PIP_* variables")
    args = parser.parse_args(argv)

    if args.from_report:
        report = json.loads(args.from_report.read_text())
    else:
        with tempfile.TemporaryDirectory(prefix="gpu-report-") as tmp:
            path = args.keep_report or Path(tmp) / "report.json"
            try:
                wall_s = resolve(args.extras, path, plain_pip=args.plain_pip)
            except subprocess.CalledProcessError as exc:
                print(f"error: the resolver failed (exit {exc.returncode}) for [{args.extras}]: see pip's output above")
                return 2
            report = json.loads(path.read_text())
        print(f"resolved {len(report['install'])} packages in {wall_s:.0f} s (pip {report.get('pip_version')})")

    for line in key_lines(report):
        print(line)
    problems = pin_problems(report) + cpu_build_problems(report) + requirement_problems(report)
    for problem in problems:
        print(f"error: {problem}")
    if problems:
        print(f"FAILED: {len(problems)} problem(s); the GPU extras do not resolve to agreeing, pinned versions")
        return 1
    print("ok: vllm and gptqmodel pinned; every chosen package's requirements are met by the chosen versions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
