"""Imports point one way (CONVENTIONS.md's layout): no import cycle in the package, and the low modules import no
stage. Read from the source with `ast`, so imports inside functions count as much as those at the top; imports
under `if TYPE_CHECKING:` do not (they never run: an annotation may name a type from above).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "shortgpt_deploy"
# The bottom of the package: what every stage may import, and which import nothing but each other.
LOW = {"errors", "files", "checkpoint", "runtime", "recipe"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The package's modules that `source` (the text of `module`) imports when it runs, wherever the import is."""
    here = module.split(".") if is_package else module.split(".")[:-1]
    found: set[str] = set()

    def add(dotted: str) -> None:  # the longest known module that `dotted` names or lies inside
        parts = dotted.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in known:
                found.add(".".join(parts[:n]))
                return

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                visit(ast.Module(body=child.orelse, type_ignores=[]))  # the `else:` branch does run
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("shortgpt_deploy."):
                        add(alias.name.removeprefix("shortgpt_deploy."))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = here[: len(here) - (child.level - 1)] if child.level > 1 else here
                    prefix = ".".join([*base, *(child.module.split(".") if child.module else [])])
                elif child.module and child.module.startswith("shortgpt_deploy"):
                    prefix = child.module.removeprefix("shortgpt_deploy").lstrip(".")
                else:
                    continue
                for alias in child.names:  # `from . import bench` imports a module; `from .bench import x` one too
                    add(f"{prefix}.{alias.name}" if prefix else alias.name)
                if prefix:
                    add(prefix)
            visit(child)

    visit(ast.parse(source))
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(p) for p in paths} - {""}
    graph = {}
    for p in paths:
        name = module_name(p)
        if name:
            graph[name] = imported(p.read_text(), name, p.name == "__init__.py", known)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan), each an import cycle or several."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def test_the_parser_sees_every_kind_of_import():
    known = {"a", "b", "c", "d", "e", "f", "pkg", "pkg.g"}
    source = """
from __future__ import annotations
from typing import TYPE_CHECKING
from .a import x
from . import b
import shortgpt_deploy.pkg.g
if TYPE_CHECKING:
    from .c import T
else:
    from .f import y
def later():
    from .d import z
    from shortgpt_deploy.e import w
"""
    assert imported(source, "m", False, known) == {"a", "b", "pkg.g", "f", "d", "e"}
    assert imported("from ..a import x\nfrom .g import y", "pkg.h", False, known) == {"a", "pkg.g"}


def test_cycles_finds_a_knot_and_ignores_a_chain():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert {"recipe", "quantize", "modeling", "serve", "preflight"} <= set(graph)  # the walk found the package
    knots = [sorted(c) for c in cycles(graph)]
    assert not knots, "import cycles: " + "; ".join(
        ", ".join(f"{m} → {sorted(graph[m] & set(c))}" for m in c) for c in knots
    )


@pytest.mark.parametrize("low", sorted(LOW))
def test_low_modules_import_no_stage(low):
    graph = import_graph()
    assert graph[low] <= LOW, f"{low} imports {sorted(graph[low] - LOW)}: move what it needs down, or the check up"


# ---------------------------------------------------------------- one implementation each, where there were several
def test_is_quantized_reads_config_json_once_for_everyone(tmp_path):
    from shortgpt_deploy.checkpoint import is_quantized

    def folder(name, config):
        (tmp_path / name).mkdir()
        if config is not None:
            (tmp_path / name / "config.json").write_text(config)
        return tmp_path / name

    gptq = folder("gptq", '{"num_hidden_layers": 2, "quantization_config": {"quant_method": "gptq", "bits": 4}}')
    assert is_quantized(gptq) and is_quantized(gptq, "gptq") and not is_quantized(gptq, "awq")
    assert not is_quantized(folder("float", '{"num_hidden_layers": 2}'))
    assert not is_quantized(folder("null", '{"quantization_config": null}'))
    assert not is_quantized(folder("none", None)) and not is_quantized(folder("garbage", "{not json"))


def test_retention_and_provenance_have_one_definition():
    from shortgpt_deploy.evaluate import retention_pct
    from shortgpt_deploy.manifest import provenance
    from shortgpt_deploy.run import Manifest

    assert retention_pct(0.5, 0.8) == pytest.approx(62.5)
    prov = provenance()
    assert set(prov) == {"command", "started_at", "git_revision", "packages", "machine"}
    assert set(prov) <= set(Manifest.__dataclass_fields__)  # the manifest records the same things by the same names


def test_the_schema_alone_leaves_stage_names_to_preflight():
    import yaml

    from shortgpt_deploy.errors import RecipeError
    from shortgpt_deploy.preflight import parse_recipe
    from shortgpt_deploy.recipe import parse_schema

    data = yaml.safe_load((PACKAGE.parent / "recipes" / "default.yaml").read_text())
    data["quantize"] = {**(data.get("quantize") or {}), "scheme": "W4A16"}
    assert parse_schema(data).quantize.scheme == "W4A16"  # no stage consulted
    assert parse_recipe(data).quantize.scheme == "w4a16"
    data["quantize"]["scheme"] = "int3"
    with pytest.raises(RecipeError, match=r"quantize\.scheme: unknown quantization scheme 'int3'"):
        parse_recipe(data)
