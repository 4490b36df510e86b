"""Limits on what a request may cost: the body size, enforced while it streams in, and the
decoded pixels a worker holds at once."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.asgi import HTTPMiddleware


class BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware(HTTPMiddleware):
    """Answer 413 when Content-Length or the streamed body exceeds ``max_bytes``."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        super().__init__(app)
        self.max_bytes = max_bytes

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        detail = f"request body larger than the limit of {self.max_bytes} bytes"
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    await _send_json(send, 400, "invalid Content-Length header")
                    return
                if too_big:
                    await _send_json(send, 413, detail)
                    return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _send_json(send, 413, detail)


async def _send_json(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class PixelBudget:
    """How many decoded pixels one worker holds at once: a decode waits until its image fits.

    Decoding costs memory in proportion to the pixels, whatever the file's size on the wire, so
    concurrent uploads of large images are decoded one after another once together they would
    exceed the budget. An image larger than the whole budget (still within the per-image limit)
    is decoded alone."""

    def __init__(self, pixels: int) -> None:
        self.pixels = pixels
        self.held = 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, width: int, height: int) -> Iterator[None]:
        need = min(width * height, self.pixels)
        with self._cond:
            self._cond.wait_for(lambda: self.held + need <= self.pixels)
            self.held += need
        try:
            yield
        finally:
            with self._cond:
                self.held -= need
                self._cond.notify_all()
