"""ASGI middleware around the app: every answer counted, the API key, the request-body limit.

Plain ASGI (not BaseHTTPMiddleware), so that streamed answers pass through untouched and a client's disconnect
still reaches the streaming route, which cancels its row.
"""

from __future__ import annotations

import hmac
import time

from fastapi.responses import JSONResponse

from nanopali.serve import api
from nanopali.serve.metrics import Metrics

OPEN_PATHS = ("/health", "/")  # no API key: the page is a static file that calls the API with the key you type


class Counting:
    """Every answered request by endpoint and status, and its latency to the last byte (streams included)."""

    def __init__(self, app, metrics: Metrics, paths: set[str]):
        self.app, self.metrics, self.paths = app, metrics, paths  # other paths are counted as "other"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, endpoint, status = time.perf_counter(), scope["path"] if scope["path"] in self.paths else "other", 0

        async def counted_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.metrics.requests.labels(endpoint, str(status)).inc()
                self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
        await self.app(scope, receive, counted_send)


class BodyLimit:
    """413 for a request body over `limit` bytes, by Content-Length or while it is read (chunked bodies)."""

    def __init__(self, app, limit: int, metrics: Metrics):
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(scope, receive, send)
        seen, started = 0, False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge()
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)
        try:
            await self.app(scope, limited_receive, tracked_send)
        except _TooLarge:
            if not started:
                await self._refuse(scope, receive, send)

    async def _refuse(self, scope, receive, send):
        self.metrics.rejected.labels("too_large").inc()
        response = JSONResponse(api.error_body(f"the request body is over the server's limit of {self.limit} bytes "
                                               "(--max-body-bytes)", code="request_too_large"), 413)
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


class Authentication:
    """With an API key, every path but /health and the page needs `Authorization: Bearer KEY` (401 otherwise);
    the key is compared in constant time."""

    def __init__(self, app, key: str | None, metrics: Metrics):
        self.app, self.metrics = app, metrics
        self.key = None if key is None else f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if self.key is None or scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(given, self.key):
            self.metrics.rejected.labels("unauthorized").inc()
            response = JSONResponse(api.error_body("a valid API key is needed: send 'Authorization: Bearer KEY'",
                                                   "authentication_error", code="invalid_api_key"), 401,
                                    headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)
