"""A stand-in for `vllm serve` and `vllm bench serve` in the lifecycle tests: it behaves like vLLM where our stop
logic is concerned and costs nothing to start.

As `serve MODEL --host H --port P ...`: forks an "engine" child that ignores SIGTERM (so only a group-wide SIGKILL
ends it, as with a wedged EngineCore), answers /health after FAKE_VLLM_READY_AFTER_S seconds, and records both PIDs
in the file FAKE_VLLM_PIDS, one per line. As `bench ...`: records its PID and sleeps (a benchmark in progress).
"""

from __future__ import annotations

import http.server
import os
import signal
import sys
import time


def record(pid: int) -> None:
    with open(os.environ["FAKE_VLLM_PIDS"], "a") as f:
        f.write(f"{pid}\n")


def serve(argv: list[str]) -> None:
    host, port = argv[argv.index("--host") + 1], int(argv[argv.index("--port") + 1])
    engine = os.fork()
    if engine == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            time.sleep(1)
    record(os.getpid())
    record(engine)
    time.sleep(float(os.environ.get("FAKE_VLLM_READY_AFTER_S", "0")))

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    http.server.HTTPServer((host, port), Health).serve_forever()


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2:])
    else:
        record(os.getpid())
        time.sleep(600)
