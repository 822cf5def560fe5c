"""Every process we start is stopped: on normal exit, on error, and on SIGINT, SIGTERM and SIGHUP at any moment
(while the server starts, once it is ready, in the middle of a benchmark).

The CLI runs in a subprocess, as a user runs it, with vLLM replaced by tests/fake_vllm.py (same process layout: a
server leading its own session, an engine child that ignores SIGTERM). Whether our processes are gone is checked by
PID, never by name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shortgpt_deploy.processes import process_alive, signals_deferred, spawn, stop_group

FAKE = Path(__file__).with_name("fake_vllm.py")

# Runs the real CLI with vLLM's two command lines pointed at the fake.
DRIVER = textwrap.dedent(
    f"""
    import sys
    from shortgpt_deploy import bench, serve
    fake = [sys.executable, {str(FAKE)!r}]
    serve.vllm_argv = lambda opts: fake + ["serve", "m", "--host", opts.host, "--port", str(opts.port)]
    bench.bench_argv = lambda plan, target, level, name, seed: fake + ["bench"]
    from shortgpt_deploy.cli import app
    app(sys.argv[1:])
    """
)


def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "pruned"
    folder.mkdir()
    (folder / "config.json").write_text('{"num_hidden_layers": 2, "max_position_embeddings": 64}')
    return folder


@pytest.fixture(autouse=True)
def _ctrl_c_raises() -> Iterator[None]:
    """A shell that starts a job in the background (`make test &`, some CI runners) starts it with SIGINT ignored,
    and Python then never turns Ctrl-C into KeyboardInterrupt, in this process or the CLIs it starts (an ignored
    signal stays ignored across exec). These tests are about what happens when Ctrl-C does arrive."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a handler: children exec with SIG_DFL
    yield
    signal.signal(signal.SIGINT, previous)


def pids(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.is_file() else []


def wait_for(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.1)


def run_cli(tmp_path: Path, args: list[str], *, ready_after_s: float) -> tuple[subprocess.Popen, Path]:
    pid_file = tmp_path / "pids"
    env = dict(os.environ, FAKE_VLLM_PIDS=str(pid_file), FAKE_VLLM_READY_AFTER_S=str(ready_after_s))
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    return proc, pid_file


def assert_all_gone(pid_list: list[int]) -> None:
    deadline = time.monotonic() + 5
    while any(process_alive(p) for p in pid_list) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = [p for p in pid_list if process_alive(p)]
    for p in alive:  # never leave them for the next test, whatever happened
        os.kill(p, signal.SIGKILL)
    assert not alive, f"processes still running after the CLI exited: {alive}"


SIGNALS = [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)]


@pytest.mark.parametrize(("sig", "code"), SIGNALS, ids=lambda x: getattr(x, "name", str(x)))
@pytest.mark.parametrize("moment", ["starting", "ready", "mid-benchmark"])
def test_a_signal_stops_every_process_we_started(tmp_path, sig, code, moment):
    folder = model_dir(tmp_path)
    port = str(free_port())
    if moment == "mid-benchmark":
        args = ["bench", "--variant", f"pruned={folder}", "--out", str(tmp_path / "b"), "--tokenizer", str(folder)]
        expected = 3  # server, its engine, the benchmark client
    else:
        args = ["serve", str(folder), "--port", port, "--log", str(tmp_path / "serve.log")]
        expected = 2
    proc, pid_file = run_cli(tmp_path, args, ready_after_s=600 if moment == "starting" else 0)
    try:
        wait_for(lambda: len(pids(pid_file)) >= expected or proc.poll() is not None)
        if moment == "ready":
            wait_for(lambda: (tmp_path / "serve.log").exists())
            time.sleep(2.5)  # the CLI polls /health once a second
        assert proc.poll() is None, proc.stdout.read()
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, output
    assert "nothing was left half-written" in output
    if moment == "ready":
        assert "serving" in output
    assert_all_gone(pids(pid_file))


def test_a_server_that_dies_while_starting_takes_its_engine_along(tmp_path):
    """Error path: the API server exits; the engine it forked (which ignores SIGTERM) must not outlive it."""
    folder = model_dir(tmp_path)
    pid_file = tmp_path / "pids"
    code = f"import os, sys, time; exec(open({str(FAKE)!r}).read().split('def serve')[0]); pid_file = {str(pid_file)!r}"
    child = f"{code}\nif os.fork() == 0:\n    time.sleep(600)\nopen(pid_file, 'w').write(str(os.getpid()))\nsys.exit(3)"
    driver = DRIVER.replace('fake + ["serve", "m"', '[sys.executable, "-c", ' + repr(child) + ', "serve", "m"')
    env = dict(os.environ, FAKE_VLLM_PIDS=str(pid_file))
    result = subprocess.run(
        [sys.executable, "-c", driver, "serve", str(folder), "--port", str(free_port()), "--log", str(tmp_path / "l")],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and "exited with code 3 while starting" in result.stderr
    group = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.killpg(group, 0)


def test_a_signal_while_spawning_is_held_until_the_handle_is_kept(tmp_path):
    """The window between fork and `Popen` returning: a signal there must not lose the child's PID."""
    with open(tmp_path / "log", "wb") as log:
        proc = None
        with pytest.raises(KeyboardInterrupt):
            with signals_deferred():
                os.kill(os.getpid(), signal.SIGINT)  # arrives "during" the spawn below
                proc = spawn([sys.executable, "-c", "import time; time.sleep(600)"], log=log)
        assert proc is not None and process_alive(proc.pid)
        stop_group(proc, grace_s=5)
        assert not process_alive(proc.pid)


def test_a_second_signal_while_stopping_skips_the_grace_period(tmp_path):
    """Ctrl-C twice: the stop still completes (nothing left), without waiting out the grace period."""
    with open(tmp_path / "log", "wb") as log:
        proc = spawn([sys.executable, "-c", "import signal, time; signal.signal(15, signal.SIG_IGN); time.sleep(600)"],
                     log=log)  # fmt: skip
    time.sleep(0.5)
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    previous = signal.signal(signal.SIGALRM, lambda *a: os.kill(os.getpid(), signal.SIGINT))
    start = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            stop_group(proc, grace_s=30)
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - start < 10
    assert not process_alive(proc.pid)


def test_the_server_dies_with_its_parent_even_on_sigkill(tmp_path):
    """What no clean-up can handle: the CLI killed with SIGKILL. The server asked for SIGTERM on its parent's death."""
    pid_file = tmp_path / "pid"
    server = (
        "import os, sys, time\n"
        "from shortgpt_deploy.processes import die_with_parent\n"
        "die_with_parent()\n"
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "time.sleep(600)\n"
    )
    parent = (
        "import sys, time\n"
        "from shortgpt_deploy.processes import spawn\n"
        f"spawn([sys.executable, '-c', {server!r}], log=open({str(tmp_path / 'log')!r}, 'wb'))\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", parent])
    try:
        wait_for(lambda: pid_file.is_file() and pid_file.read_text() != "")
        proc.kill()
        proc.wait()
        assert_all_gone([int(pid_file.read_text())])
    finally:
        if proc.poll() is None:
            proc.kill()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
