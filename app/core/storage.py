"""Content-addressed image store: each image is written once, under its sha256."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import sys
import tempfile
from pathlib import Path


def _load_syncfs():  # noqa: ANN202
    """Linux's syncfs(2): one call makes every file written on a filesystem durable (and reports
    a failed write-back since Linux 5.8)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).syncfs
    except (OSError, AttributeError):
        return None


_SYNCFS = _load_syncfs()
log = logging.getLogger("maxmin_inspect")


class ImageStore:
    """Files at ``root/ab/abcdef...``; names come from content hashes, never from uploads.

    Every file is durable before it gets its name, and so before any row that names it is
    committed. ``put`` syncs its file; ``put_many`` with ``sync="group"`` (on Linux) writes all of
    a group commit's new files and makes them durable with one sync of the filesystem, where a
    sync per file waits for a journal commit each (``bench/db_bench.py`` compares the two)."""

    def __init__(self, root: Path, sync: str = "group") -> None:
        if sync not in ("group", "file"):
            raise ValueError(f"sync must be 'group' or 'file', not {sync!r}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.sync = sync if _SYNCFS is not None else "file"

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
        made before a failure included, so that the caller can remove them again."""
        if self.sync == "group" and len(images) > 1:
            self._put_group(images, created)
            return
        for sha256, data in images.items():
            if self.put(sha256, data):
                created.append(sha256)

    def _put_group(self, images: dict[str, bytes], created: list[str]) -> None:
        """Every new file written, then one sync of the filesystem for all of them, then each
        renamed into place: as durable as a sync per file, before any row names them."""
        temps: list[tuple[str, Path, str]] = []
        try:
            for sha256, data in images.items():
                target = self.path(sha256)
                if target.is_file():
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
                temps.append((tmp, target, sha256))
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
            if not temps:
                return
            self._sync_all([tmp for tmp, _, _ in temps])
            for tmp, target, sha256 in temps:
                os.replace(tmp, target)
                created.append(sha256)
        except BaseException:
            for tmp, _, _ in temps:
                Path(tmp).unlink(missing_ok=True)
            raise

    def _sync_all(self, paths: list[str]) -> None:
        """One sync of the store's filesystem; where the system refuses that call (a sandbox's
        system-call filter, say), a sync per file from now on."""
        fd = os.open(self.root, os.O_RDONLY)
        try:
            failed = _SYNCFS(fd) != 0
            err = ctypes.get_errno() if failed else 0
        finally:
            os.close(fd)
        if not failed:
            return
        if err not in (errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP, errno.EINVAL):
            raise OSError(err, f"syncing the image store: {os.strerror(err)}")
        log.warning("syncfs refused (%s): the image store syncs each file", os.strerror(err))
        self.sync = "file"
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def remove(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)
