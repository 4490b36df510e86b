"""A training run's stage, progress and outcome, kept in a small JSON file for other processes.

The service's training page starts ``maxmin-inspect train --status-file ...`` and reads this file to
show progress; the file is replaced atomically, so a reader never sees half of it.
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

FINAL_STATES = ("done", "failed")


class StatusFile:
    """Merges each update into the current status and rewrites the file (no file: does nothing).

    Epoch updates are written at most every ``min_interval_s``; stage changes always."""

    def __init__(self, path: Path | None, min_interval_s: float = 0.5) -> None:
        self.path = Path(path) if path is not None else None
        self.status: dict[str, Any] = {"started_at": _now()}
        self._min_interval = min_interval_s
        self._last_write = 0.0

    def update(self, **fields: Any) -> None:
        stage_change = "state" in fields and fields["state"] != self.status.get("state")
        self.status.update(fields, updated_at=_now())
        if self.path is None:
            return
        now = time.monotonic()
        if not stage_change and now - self._last_write < self._min_interval:
            return
        self._last_write = now
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.status))
        os.replace(tmp, self.path)


def read_status(path: Path) -> dict[str, Any] | None:
    """The last status written, or None when there is none (yet) or it cannot be read."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
