"""What a request can get wrong about stored data, and the checks that say so."""

from __future__ import annotations

from datetime import UTC, datetime


class NotFound(LookupError):
    """The named row does not exist."""


class InvalidLabel(ValueError):
    """A label that is not one of the prediction's classes."""


class InvalidFilter(ValueError):
    """A filter value the database cannot hold (a date out of range, a NUL character)."""


def as_utc(value: datetime | None) -> datetime | None:
    """Aware UTC datetimes everywhere (SQLite hands back naive ones)."""
    if value is None:
        return None
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:
        raise InvalidFilter(f"date {value.isoformat()} is out of range in UTC") from None


def check_text(value: str | None, name: str) -> str | None:
    """Text that PostgreSQL can store: no NUL characters."""
    if value is not None and "\x00" in value:
        raise InvalidFilter(f"'{name}' contains a NUL character")
    return value
