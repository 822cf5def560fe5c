"""Child processes we start (vLLM servers, vLLM's benchmark client): spawned in a session of their own, stopped as
a whole process group, and never left behind by a signal.

Three ways a child outlived us before:
- a signal landing between `Popen` returning and the caller keeping the handle (or inside `Popen`, after the fork):
  nobody knew the child's PID any more. `spawn` defers SIGINT/SIGTERM/SIGHUP across that window.
- SIGTERM and SIGHUP ended Python at once, without running a single `finally`. `raise_on_termination` turns them
  into `Terminated`, a KeyboardInterrupt, so every clean-up that already handles Ctrl-C handles them too.
- a second Ctrl-C while a server was being stopped aborted the stop. `stop_group` runs with signals deferred, and
  a signal during it only makes it skip the grace period (SIGKILL at once).
A child cannot be stopped by us if we are killed with SIGKILL; `vllm_cli` asks the kernel to send the server
SIGTERM when its parent dies (PR_SET_PDEATHSIG) for that case.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import IO

logger = logging.getLogger(__name__)

TERMINATING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PARENT_PID_ENV = "SHORTGPT_DEPLOY_PARENT_PID"  # read by vllm_cli: the PID whose death must stop the server


class Terminated(KeyboardInterrupt):  # noqa: N818 (a KeyboardInterrupt: stops the program, not an error)
    """SIGTERM or SIGHUP, raised like Ctrl-C so that the same clean-up runs; `signum` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def exit_code_of(err: KeyboardInterrupt) -> int:
    """The shell's convention: 128 + the signal number (130 for Ctrl-C)."""
    return err.exit_code if isinstance(err, Terminated) else 128 + signal.SIGINT


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signum)


def raise_on_termination() -> None:
    """SIGTERM and SIGHUP raise `Terminated` in the main thread (the CLI calls this once per command)."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_terminated)


def _deliver(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


@contextlib.contextmanager
def signals_deferred() -> Iterator[list[int]]:
    """Hold SIGINT/SIGTERM/SIGHUP until the block ends, then raise the first one that came.

    Yields the list of signals received so far, so a long block (stopping a server) can react to one. Outside
    the main thread signals cannot be handled here, and the block runs as it is.
    """
    import threading

    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def hold(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    previous = {sig: signal.signal(sig, hold) for sig in TERMINATING}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        handler = previous[received[0]]
        if callable(handler):  # ours (raises Terminated), Python's (KeyboardInterrupt), or someone else's
            handler(received[0], None)
        elif handler != signal.SIG_IGN:
            _deliver(received[0])


def spawn(
    argv: Sequence[str], *, log: IO[bytes], env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start `argv` in a new session (its own process group, out of reach of the terminal's Ctrl-C, so that we
    decide when it stops), with output to `log`. Signals wait until the caller holds the handle."""
    env = dict(os.environ if env is None else env)
    env[PARENT_PID_ENV] = str(os.getpid())
    with signals_deferred():
        return subprocess.Popen(
            list(argv), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )


def stop_group(proc: subprocess.Popen[bytes], *, grace_s: float = 30.0) -> None:
    """SIGTERM the child's whole process group, SIGKILL after `grace_s` (at once if a signal arrives meanwhile);
    also when the child itself already exited, since processes it forked may not have. Returns when the group is
    empty."""
    pgid = proc.pid  # start_new_session: the child leads its own process group
    with signals_deferred() as received:
        if proc.poll() is None:
            _signal_group(pgid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while proc.poll() is None and time.monotonic() < deadline and not received:
                time.sleep(0.1)
            if proc.poll() is None:
                _signal_group(pgid, signal.SIGKILL)
                proc.wait()  # reap it, or the group never looks empty
        _kill_group(pgid)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _kill_group(pgid: int, timeout_s: float = 10.0) -> None:
    """SIGKILL what is left of a process group and wait until the kernel reports it gone."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    logger.warning("processes of group %d still present after SIGKILL", pgid)


def die_with_parent() -> None:
    """In a child we started: ask the kernel for SIGTERM when the parent dies, even by SIGKILL (Linux only).

    Called first thing by `vllm_cli`; the processes vLLM forks share the server's group, and vLLM stops them when
    the API server gets SIGTERM.
    """
    parent = os.environ.get(PARENT_PID_ENV)
    if not parent or not os.path.exists("/proc/self"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != int(parent):  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def process_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, finished but not yet reaped, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
