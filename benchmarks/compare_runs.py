"""Compare two run folders of the same recipe: are their measurements equal up to timing?

    python benchmarks/compare_runs.py RUN_A RUN_B [--json OUT.json]

For each JSON artifact both folders have (scores, plan, budget, repair, quantize, eval, bench summary) it drops
what differs by nature between two runs (durations, timestamps, paths, provenance, schema_version, every bench
latency/throughput number) and reports each remaining value that differs, with the largest absolute difference
of the numbers. It also lists which lines of report.md differ once numbers are masked, so a change of wording or
layout shows without the timings drowning it. Made for issue 12: the reorganised code must measure what the old
code did (`make demo` before and after, from fresh clones on one machine).
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

ARTIFACTS = ("scores.json", "plan.json", "budget.json", "repair.json", "quantize.json", "eval.json")
# keys whose values differ between two runs by nature (timings, where and when it ran)
VOLATILE = re.compile(r"(^|_)(time|duration|seconds|started|timestamp|provenance|models|out_dir|path|schema_version)"
                      r"|_s$|_ms$|^load_1min$|^machine$|^packages$|^git_revision$")  # fmt: skip


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if not VOLATILE.search(str(k))}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def differences(a: Any, b: Any, where: str = "") -> list[dict[str, Any]]:
    """Every leaf where a and b differ: its path, both values, and for numbers the absolute difference."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                out.append({"at": f"{where}.{k}", "a": a.get(k, "<absent>"), "b": b.get(k, "<absent>")})
            else:
                out += differences(a[k], b[k], f"{where}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{where}[{i}]")]
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
    if numbers and (a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))):
        return []
    if numbers:
        return [{"at": where, "a": a, "b": b, "abs_diff": abs(a - b)}]
    return [] if a == b else [{"at": where, "a": a, "b": b}]


def _bench_shape(path: Path) -> Any:
    """The bench summary without its measurements: which variants and levels were measured, and how."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    variants = data.get("variants")
    return {
        "workload": _strip(data.get("workload")),
        "variants": sorted(variants) if isinstance(variants, (dict, list)) else variants,
    }


def _masked_report(path: Path) -> list[str]:
    text = path.read_text() if path.is_file() else ""
    return [re.sub(r"\d+(\.\d+)?", "#", line) for line in text.splitlines()]


def compare(a: Path, b: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"a": str(a), "b": str(b), "artifacts": {}}
    for name in ARTIFACTS:
        pa, pb = a / name, b / name
        if not pa.is_file() and not pb.is_file():
            continue
        if not pa.is_file() or not pb.is_file():
            result["artifacts"][name] = {"only_in": str(a if pa.is_file() else b)}
            continue
        diffs = differences(_strip(json.loads(pa.read_text())), _strip(json.loads(pb.read_text())))
        numeric = [d["abs_diff"] for d in diffs if "abs_diff" in d]
        result["artifacts"][name] = {
            "equal": not diffs,
            "differences": diffs[:50],
            "n_differences": len(diffs),
            "max_abs_diff": max(numeric) if numeric else 0.0,
        }
    shape_a, shape_b = _bench_shape(a / "bench" / "summary.json"), _bench_shape(b / "bench" / "summary.json")
    result["bench_shape_equal"] = shape_a == shape_b
    result["bench_shape"] = {"a": shape_a, "b": shape_b}
    ra, rb = _masked_report(a / "report.md"), _masked_report(b / "report.md")
    result["report_lines_changed"] = [
        line for line in difflib.unified_diff(ra, rb, lineterm="", n=0) if line[:1] in "+-" and line[:3] not in "+++---"
    ]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--json", type=Path, help="write the comparison here too")
    args = parser.parse_args()
    result = compare(args.a, args.b)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    for name, r in result["artifacts"].items():
        if "only_in" in r:
            print(f"{name}: only in {r['only_in']}")
        else:
            state = "equal" if r["equal"] else f"{r['n_differences']} differences, max |diff| {r['max_abs_diff']:.3g}"
            print(f"{name}: {state}")
            for d in r["differences"][:8]:
                print(f"    {d['at']}: {d['a']!r} vs {d['b']!r}")
    print(f"bench: same variants and workload: {result['bench_shape_equal']}")
    print(f"report.md: {len(result['report_lines_changed'])} lines differ with numbers masked")
    for line in result["report_lines_changed"][:60]:
        print("    " + line[:160])
    return 0


if __name__ == "__main__":
    sys.exit(main())
