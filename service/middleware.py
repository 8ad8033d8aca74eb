"""The request body size limit (CDAE_MAX_UPLOAD_MB), enforced while the body is read."""

from __future__ import annotations

from fastapi.responses import JSONResponse

__all__ = ["BodyLimit"]


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
