"""The tests' own layout: fixtures are shared through conftest.py and helpers through plain modules, never by one
test module importing another (that collects the imported module's fixtures twice and hides where they live)."""

import ast
from pathlib import Path

TESTS = Path(__file__).parent


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_test_module_imports_another_or_conftest():
    test_modules = {p.stem for p in TESTS.glob("test_*.py")} | {"conftest"}
    offenders = {p.name: sorted(imported_modules(p) & test_modules) for p in sorted(TESTS.glob("*.py"))}
    assert {name: found for name, found in offenders.items() if found} == {}
