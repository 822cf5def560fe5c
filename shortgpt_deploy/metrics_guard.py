"""An ASGI middleware for the vLLM server process: /metrics needs the same bearer token as the API.

vLLM's own AuthenticationMiddleware guards only the /v1 (and a few other) prefixes, so with an API key set the
Prometheus endpoint still answers anyone who can reach the port. `serve` adds this class with vLLM's
`--middleware` option when a key is set (not with --public-metrics). It reads the key from VLLM_API_KEY, where
`serve` put it. Loaded inside the server process: keep its imports light.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from typing import Any

GUARDED = ("/metrics",)


class MetricsGuard:
    def __init__(self, app: Any) -> None:
        self.app = app
        key = os.environ.get("VLLM_API_KEY", "")
        self.digest = hashlib.sha256(key.encode()).digest() if key else None

    def allowed(self, scope: dict[str, Any]) -> bool:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(hashlib.sha256(token.encode()).digest(),
                                                                     self.digest or b"")  # fmt: skip

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "").removeprefix(scope.get("root_path", ""))
        if scope.get("type") == "http" and self.digest is not None and path.startswith(GUARDED):
            if not self.allowed(scope):
                body = b'{"error": "Unauthorized"}'
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})  # fmt: skip
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
