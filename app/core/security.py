"""API keys with roles, the pages' session login, and CSRF protection.

Roles are ordered: line (predict) < inspector (also label, the inspector page, images) < manager
(also dashboard, reports, stats, metrics) < admin (also keys). Keys are stored as sha256 digests;
a key is 32 random bytes, so a fast hash is enough (nothing to brute-force). Line systems send
``X-API-Key``; people log in once through /login and get a signed, HTTP-only session cookie that
names a server-side session (``WebSession``): logging out ends it for every copy of the cookie.
Every state-changing request made with the cookie must carry the session's CSRF token.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from fastapi import HTTPException, Request
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.tables import ApiKey, WebSession

ROLES = ("line", "inspector", "manager", "admin")
RANK = {role: i for i, role in enumerate(ROLES)}
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class Principal:
    key_id: int
    name: str
    role: str
    via: str  # "header", "cookie" or "open" (access control switched off)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, role: str, name: str) -> tuple[str, ApiKey]:
    """A new key for ``role``; the plain key is returned once and never stored."""
    if role not in RANK:
        raise ValueError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
    if not name.strip():
        raise ValueError("a key needs a name (who or what uses it)")
    key = "mmi_" + secrets.token_urlsafe(32)
    row = ApiKey(name=name.strip()[:200], role=role, prefix=key[:12], key_sha256=hash_key(key))
    session.add(row)
    session.commit()
    return key, row


def find_key(session: Session, key: str) -> ApiKey | None:
    """The live key row for ``key``, or None (unknown or revoked)."""
    if not key or len(key) > 200:
        return None
    row = session.execute(
        select(ApiKey).where(ApiKey.key_sha256 == hash_key(key))
    ).scalar_one_or_none()
    return row if row is not None and row.revoked_at is None else None


def key_by_ident(session: Session, ident: str) -> ApiKey:
    """A key by its id or by its shown prefix; LookupError when there is none."""
    query = select(ApiKey).where(ApiKey.prefix == ident)
    if ident.isdigit():
        query = select(ApiKey).where(ApiKey.id == int(ident))
    row = session.execute(query).scalar_one_or_none()
    if row is None:
        raise LookupError(f"no key with id or prefix {ident!r}")
    return row


def revoke_key(session: Session, ident: str) -> ApiKey:
    """Revoke by id or by the key's shown prefix; its browser sessions end with it."""
    row = key_by_ident(session, ident)
    row.revoked_at = datetime.now(UTC)
    _end_sessions(session, row.id)
    session.commit()
    return row


def start_session(request: Request, session: Session, key: ApiKey) -> None:
    """Log ``key`` in: a server-side session row, named by the signed cookie."""
    sid = secrets.token_urlsafe(32)
    session.add(WebSession(id=sid, key_id=key.id))
    session.commit()
    request.session.clear()
    request.session["sid"] = sid
    csrf_token(request)  # a fresh token for the new session


def end_session(request: Request, session: Session) -> None:
    """Log out: the session row ends, so the cookie is refused even where it was copied."""
    sid = request.session.get("sid")
    if sid is not None:
        row = session.get(WebSession, sid)
        if row is not None and row.ended_at is None:
            row.ended_at = datetime.now(UTC)
            session.commit()
    request.session.clear()


def _end_sessions(session: Session, key_id: int) -> int:
    rows = session.execute(
        select(WebSession).where(WebSession.key_id == key_id, WebSession.ended_at.is_(None))
    ).scalars()
    now, n = datetime.now(UTC), 0
    for row in rows:
        row.ended_at, n = now, n + 1
    return n


def end_all_sessions(session: Session, ident: str) -> tuple[ApiKey, int]:
    """End every browser session of a key (by id or prefix), e.g. a lost tablet's; the key itself
    keeps working for new logins and programs. Returns the key and how many sessions ended."""
    row = key_by_ident(session, ident)
    n = _end_sessions(session, row.id)
    session.commit()
    return row, n


def any_keys(session: Session) -> bool:
    return session.execute(select(ApiKey.id).limit(1)).first() is not None


def session_secret(data_dir: Path, configured: str | None) -> str:
    """The cookie-signing secret: the setting, else one generated once and kept in the data dir."""
    if configured:
        return configured
    path = Path(data_dir) / "session.key"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # exclusive create: workers starting together agree on one secret
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(48))
    for _ in range(50):  # another worker may be writing it this instant
        secret = path.read_text().strip()
        if secret:
            return secret
        time.sleep(0.02)
    raise RuntimeError(f"session secret file {path} is empty")


class KeyCache:
    """Header keys seen in the last ``ttl`` seconds, so that a line system's every request does
    not cost a database lookup (and a hop to a worker thread). Only valid keys are kept; a key
    revoked meanwhile stops working within ``ttl`` seconds."""

    def __init__(self, ttl: float, max_entries: int = 10_000) -> None:
        self.ttl, self.max_entries = ttl, max_entries
        self._entries: dict[str, tuple[float, Principal]] = {}

    def get(self, digest: str) -> Principal | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if entry[0] < time.monotonic():
            self._entries.pop(digest, None)
            return None
        return entry[1]

    def put(self, digest: str, who: Principal) -> None:
        if self.ttl <= 0:
            return
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[digest] = (time.monotonic() + self.ttl, who)


def authenticate(request: Request) -> Principal | None:
    """Who is calling: an X-API-Key header, else the session cookie's key; None if neither."""
    header = request.headers.get("x-api-key")
    with request.app.state.sessions() as session:
        if header is not None:
            row = find_key(session, header)
            return None if row is None else Principal(row.id, row.name, row.role, "header")
        sid = request.session.get("sid") if "session" in request.scope else None
        if sid is None:
            return None
        web = session.get(WebSession, sid)
        row = session.get(ApiKey, web.key_id) if web is not None else None
        if web is None or web.ended_at is not None or row is None or row.revoked_at is not None:
            request.session.clear()  # logged out, ended by an admin, or its key revoked
            return None
        return Principal(row.id, row.name, row.role, "cookie")


def csrf_token(request: Request) -> str:
    """The session's CSRF token, created on first use."""
    token = request.session.get("csrf")
    if not token:
        token = request.session["csrf"] = secrets.token_urlsafe(32)
    return token


def check_csrf(request: Request, sent: str | None) -> None:
    expected = request.session.get("csrf")
    if not expected or not sent or not hmac.compare_digest(expected, sent):
        raise HTTPException(403, detail="missing or invalid CSRF token; reload the page")


async def identify(request: Request) -> Principal | None:
    """Who is calling (through the key cache), or None; everyone is an admin with access control
    switched off."""
    if not request.app.state.settings.auth_enabled:
        return Principal(0, "anonymous", "admin", "open")
    cache: KeyCache = request.app.state.key_cache
    header = request.headers.get("x-api-key")
    digest = hash_key(header) if header is not None and len(header) <= 200 else None
    who = cache.get(digest) if digest is not None else None
    if who is None:
        who = await run_in_threadpool(authenticate, request)
        if who is not None and digest is not None:
            cache.put(digest, who)
    return who


def may(who: Principal | None, role: str) -> bool:
    """Whether ``who`` holds ``role`` or a role above it."""
    return who is not None and RANK[who.role] >= RANK[role]


def require(role: str):  # noqa: ANN201
    """A dependency admitting ``role`` and the roles above it."""

    async def dependency(request: Request) -> Principal:
        who = await identify(request)
        if who is None:
            raise HTTPException(
                401,
                detail="missing or invalid API key: send the X-API-Key header, or log in at /login",
                headers={"WWW-Authenticate": "API-Key"},
            )
        if RANK[who.role] < RANK[role]:
            raise HTTPException(
                403, detail=f"a '{who.role}' key may not do this; it needs '{role}' or above"
            )
        if who.via == "cookie" and request.method not in SAFE_METHODS:
            check_csrf(request, request.headers.get("x-csrf-token"))
        return who

    return dependency
