"""Security headers on every response, and a fresh script nonce for every page.

The Content-Security-Policy lets a page run only the service's own script files and the inline
scripts that carry this response's nonce, load nothing from elsewhere, and never be framed. Inline
styles stay allowed: the charts are inline SVG that matplotlib styles with attributes. Pages read
the nonce from ``request.state.csp_nonce``.
"""

from __future__ import annotations

import secrets

from starlette.types import Message, Receive, Scope, Send

from app.core.asgi import HTTPMiddleware

POLICY = (
    "default-src 'self'; script-src 'self' 'nonce-{nonce}'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
FIXED = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
]


class SecurityHeadersMiddleware(HTTPMiddleware):
    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        nonce = secrets.token_urlsafe(16)
        scope.setdefault("state", {})["csp_nonce"] = nonce
        policy = POLICY.format(nonce=nonce).encode()

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v)
                    for k, v in message.get("headers", [])
                    if k.lower() not in {b"content-security-policy"} | {n for n, _ in FIXED}
                ]
                headers += [(b"content-security-policy", policy), *FIXED]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
