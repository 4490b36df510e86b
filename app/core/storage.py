"""Content-addressed image store: each image is written once, under its sha256."""

from __future__ import annotations

import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


class ImageStore:
    """Files at ``root/ab/abcdef...``; names come from content hashes, never from uploads.

    ``writers`` threads write and sync the files of one ``put_many`` at once (1: one after the
    other). Each file is synced before the rows that name it are committed, and syncs issued
    together can share the filesystem's journal commit instead of waiting for one each."""

    def __init__(self, root: Path, writers: int = 1) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.writers = max(1, writers)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError("not a sha256 hex digest")
        return self.root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put(self, sha256: str, data: bytes) -> bool:
        """Write the bytes atomically unless stored already; True when this call made the file."""
        target = self.path(sha256)
        if target.is_file():
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return True

    def put_many(self, images: dict[str, bytes], created: list[str]) -> None:
        """``put`` each (sha256 -> bytes); the names this call made go into ``created``, those
        written before a failure included, so that the caller can remove them again."""
        if self.writers == 1 or len(images) < 2:
            for sha256, data in images.items():
                if self.put(sha256, data):
                    created.append(sha256)
            return
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.writers, thread_name_prefix="image-writer")
            pool = self._pool
        futures = {sha256: pool.submit(self.put, sha256, data) for sha256, data in images.items()}
        error: BaseException | None = None
        for sha256, future in futures.items():
            try:
                if future.result():
                    created.append(sha256)
            except BaseException as exc:  # noqa: BLE001 - the others' files are still counted
                error = error or exc
        if error is not None:
            raise error

    def close(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def remove(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)
