"""Database engine and sessions; SQLite gets WAL mode and a busy timeout for concurrent writers."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.exc import NoSuchModuleError
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"


class SchemaError(RuntimeError):
    """The database is not at the schema revision this code expects."""


def make_engine(url: str) -> Engine:
    """An engine for ``url``; for SQLite, create its folder and turn on WAL."""
    if url.startswith("sqlite"):
        path = make_url(url).database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    try:
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
    except ImportError as exc:  # the URL names a driver this installation lacks
        raise NoSuchModuleError(
            f"the database URL names the driver {make_url(url).drivername!r}, which is not "
            f"installed here ({exc}); install it (PostgreSQL: psycopg[binary], a dependency of "
            "this package) or use another URL"
        ) from exc


class SqliteWriteLock:
    """One writer at a time for one SQLite file, across processes, without SQLite's back-off.

    Several web workers share one SQLite file. When one of them holds the write lock, SQLite's busy
    handler makes the others sleep and retry (1, 2, 5, 10, 15, 20, 25 ms ... between tries), so a
    writer that just missed the lock sleeps well past its release. Taking an exclusive ``flock`` on
    a file beside the database first makes waiters block in the kernel and wake the moment the
    holder lets go (``bench/db_bench.py`` measures both ways). Readers are not affected (WAL), and
    writes that do not take this lock still work through the busy timeout. The kernel releases the
    lock when its holder dies, and a holder's own statements are bounded by the busy timeout, so a
    waiter never waits forever.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._thread_lock = threading.Lock()  # flock is per open file, not per thread
        self._fd: int | None = None

    def __enter__(self) -> SqliteWriteLock:
        import fcntl

        self._thread_lock.acquire()
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)  # blocks without holding the GIL
        except BaseException:
            self._thread_lock.release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        import fcntl

        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()

    def close(self) -> None:
        with self._thread_lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def write_lock(url: str) -> AbstractContextManager:
    """The lock a bulk writer takes around its transactions: for a SQLite file, a
    ``SqliteWriteLock`` beside it (where the OS has ``flock``); otherwise none (PostgreSQL takes
    concurrent writers as they come)."""
    if not url.startswith("sqlite") or os.name != "posix":
        return nullcontext()
    path = make_url(url).database
    if not path or path == ":memory:":
        return nullcontext()
    return SqliteWriteLock(Path(path + "-writelock"))


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


def alembic_config(url: str) -> Config:
    """Alembic configuration pointing at this project's migrations and ``url``."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Apply the migrations up to ``revision``."""
    make_engine(url).dispose()  # creates the SQLite folder when needed
    command.upgrade(alembic_config(url), revision)


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def check_schema(engine: Engine) -> None:
    """Refuse a database that is not migrated to this code's head revision, saying what to run."""
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    head = head_revision()
    if current != head:
        raise SchemaError(
            f"database schema is at revision {current or 'none (empty database)'}, this service "
            f"needs {head}: run `maxmin-inspect db upgrade`"
        )


@contextmanager
def command_session(url: str, migrate: bool = True) -> Iterator[Session]:
    """A session for a command run outside the service, after applying the migrations."""
    if migrate:
        upgrade(url)
    engine = make_engine(url)
    try:
        with session_factory(engine)() as session:
            yield session
    finally:
        engine.dispose()
