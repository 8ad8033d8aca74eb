"""The API's ASGI middleware: the request body size limit (CDAE_MAX_UPLOAD_MB), enforced while
the body is read; the API key gate, which answers before the body is read and rate-limits wrong
keys per client address (CDAE_AUTH_FAILURES_PER_MIN); the security headers of every response;
and a filter that keeps key-like query parameters out of uvicorn's access log."""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict, deque
from typing import Callable
from urllib.parse import parse_qsl

from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders

__all__ = ["BodyLimit", "KeyGate", "FailedKeys", "SecurityHeaders", "RedactKeysInAccessLog", "redact_access_log",
           "SECURITY_HEADERS", "MISSING_KEY", "INVALID_KEY"]

MISSING_KEY = "missing X-API-Key header"
INVALID_KEY = "invalid or revoked API key"
_CHALLENGE = {"WWW-Authenticate": "X-API-Key"}
# Query parameters refused as keys (compared lower-case, '-' as '_').
KEY_PARAMETERS = frozenset({"api_key", "apikey", "key", "x_api_key", "token", "access_token"})
# The page and /docs load scripts, styles and images from this origin only (no inline script,
# no CDN); images may also be the blob: URLs the page makes of the slices it fetched with the
# key, and the data: URLs Swagger UI's stylesheet uses for its icons.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; "
                               "form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413. With a Content-Length
    the answer comes before reading; otherwise reading stops at the limit (the app sees the client
    disconnect) and whatever the app answers is replaced by the 413."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_large = JSONResponse({"detail": f"request body larger than the limit of {self.limit:,} bytes "
                                            "(CDAE_MAX_UPLOAD_MB)"}, status_code=413)
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await too_large(scope, receive, send)
        seen, over, answered = 0, False, False

        async def limited_receive():
            nonlocal seen, over
            if over:
                return {"type": "http.disconnect"}
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:  # the app sees the client go: it never runs on a cut-off body
                    over = True
                    return {"type": "http.disconnect"}
            return msg

        async def guarded_send(msg):
            nonlocal answered
            if over:
                if not answered:
                    answered = True
                    await too_large(scope, receive, send)
                return
            await send(msg)

        await self.app(scope, limited_receive, guarded_send)
        if over and not answered:
            await too_large(scope, receive, send)


def _answer(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _query_key(scope) -> str | None:
    """The name of a query parameter that looks like an API key, if the URL has one."""
    query = scope.get("query_string", b"").decode("latin-1")
    return next((name for name, _ in parse_qsl(query, keep_blank_values=True)
                 if name.lower().replace("-", "_") in KEY_PARAMETERS), None)


class FailedKeys:
    """Wrong API keys per client address over the last ``window_s`` seconds: past ``limit`` the
    address waits until its oldest failure leaves the window. Holds at most ``max_clients``
    addresses (the least recently failing go first); one event loop, so no lock."""

    def __init__(self, limit: int, window_s: float = 60.0, max_clients: int = 10_000):
        self.limit, self.window_s, self.max_clients = limit, window_s, max_clients
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, client: str) -> int:
        """Seconds ``client`` must wait before its next try (0: it may try now)."""
        times = self._failures.get(client)
        if not self.limit or not times:
            return 0
        now = time.monotonic()
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if len(times) < self.limit:
            return 0
        return max(1, math.ceil(times[0] + self.window_s - now))

    def failed(self, client: str) -> None:
        if not self.limit:
            return
        times = self._failures.setdefault(client, deque(maxlen=self.limit))
        times.append(time.monotonic())
        self._failures.move_to_end(client)
        while len(self._failures) > self.max_clients:
            self._failures.popitem(last=False)


class KeyGate:
    """ASGI middleware: a /v1 request's ``X-API-Key`` is checked on its headers, before the app
    runs and so before a byte of its body is read (401 without a valid key, the body unread);
    a client address that sent too many wrong keys is a 429 with Retry-After; a key in the query
    string of any request is a 400 (URLs land in access logs). ``authenticate(key)`` is the
    store's: None for an unknown or revoked key. The routes' own key dependency still runs."""

    def __init__(self, app, authenticate: Callable[[str], object | None], failures: FailedKeys,
                 prefix: str = "/v1"):
        self.app, self.authenticate, self.failures, self.prefix = app, authenticate, failures, prefix

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if (name := _query_key(scope)) is not None:
            return await _answer(400, f"an API key in the URL ({name!r}) is refused: URLs are logged; "
                                      "send it in the X-API-Key header")(scope, receive, send)
        path = scope["path"]
        if not (path == self.prefix or path.startswith(self.prefix + "/")):
            return await self.app(scope, receive, send)
        client = (scope.get("client") or ("unknown",))[0]
        if wait := self.failures.retry_after(client):
            return await _answer(429, f"too many wrong API keys from this address; try again in {wait} s",
                                 {"Retry-After": str(wait)})(scope, receive, send)
        key = Headers(scope=scope).get("x-api-key")
        if not key:
            return await _answer(401, MISSING_KEY, _CHALLENGE)(scope, receive, send)
        if await run_in_threadpool(self.authenticate, key) is None:
            self.failures.failed(client)
            return await _answer(401, INVALID_KEY, _CHALLENGE)(scope, receive, send)
        await self.app(scope, receive, send)


class SecurityHeaders:
    """ASGI middleware: every response gets :data:`SECURITY_HEADERS` (a same-origin content
    security policy, no MIME sniffing, no framing, no referrer); a /v1 response (a key's jobs,
    files and models) also gets ``Cache-Control: no-store``, replacing what the route set."""

    def __init__(self, app, prefix: str = "/v1"):
        self.app, self.prefix = app, prefix

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        private = scope["path"] == self.prefix or scope["path"].startswith(self.prefix + "/")

        async def with_headers(msg):
            if msg["type"] == "http.response.start":
                headers = MutableHeaders(scope=msg)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
                if private:
                    headers["Cache-Control"] = "no-store"
            await send(msg)

        await self.app(scope, receive, with_headers)


class RedactKeysInAccessLog(logging.Filter):
    """Drops the values of key-like query parameters from uvicorn's access log lines, so a key a
    client sent in a URL (refused, see :class:`KeyGate`) is not written to the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            path, _, query = args[2].partition("?")
            redacted = "&".join(f"{n}=REDACTED" if n.lower().replace("-", "_") in KEY_PARAMETERS else
                                (f"{n}={v}" if v else n) for n, v in parse_qsl(query, keep_blank_values=True))
            record.args = (*args[:2], f"{path}?{redacted}", *args[3:])
        return True


def redact_access_log(logger: str = "uvicorn.access") -> None:
    """Install :class:`RedactKeysInAccessLog` on uvicorn's access logger (once)."""
    log = logging.getLogger(logger)
    if not any(isinstance(f, RedactKeysInAccessLog) for f in log.filters):
        log.addFilter(RedactKeysInAccessLog())
