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

    def read(self, sha256: str) -> bytes | None:
        """The stored bytes, or None when there is no such image."""
        try:
            return self.path(sha256).read_bytes()
        except FileNotFoundError:
            return None

    def local_path(self, sha256: str) -> Path | None:
        """The file on this machine's disk, to be sent as it is; None for a remote store."""
        path = self.path(sha256)
        return path if path.is_file() else None


class S3ImageStore:
    """The same content-addressed store in an S3-compatible bucket (AWS S3, MinIO), so that
    several replicas of the service share one: ``s3://bucket/prefix/ab/abcdef...``.

    A PUT is atomic and durable once S3 answers, so ``put`` needs no temporary name and no sync;
    as with the folder, the object exists before any row that names it is committed. Credentials
    come from boto3's usual sources (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, a profile,
    an instance role); ``endpoint_url`` points at MinIO or another S3-compatible server."""

    def __init__(self, url: str, endpoint_url: str | None = None) -> None:
        import boto3
        from botocore.config import Config

        if not url.startswith("s3://") or not url[5:].split("/", 1)[0]:
            raise ValueError(f"an S3 image store is s3://bucket[/prefix], not {url!r}")
        bucket, _, prefix = url[5:].partition("/")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.url = url
        self._client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5),
        )

    def key(self, sha256: str) -> str:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError("not a sha256 hex digest")
        return "/".join(filter(None, (self.prefix, sha256[:2], sha256)))

    def exists(self, sha256: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._client.head_object(Bucket=self.bucket, Key=self.key(sha256))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise OSError(f"image store {self.url}: {exc}") from None
        return True

    def put(self, sha256: str, data: bytes) -> bool:
        """Upload unless stored already; True when this call made the object."""
        if self.exists(sha256):
            return False
        try:
            self._client.put_object(Bucket=self.bucket, Key=self.key(sha256), Body=data)
        except Exception as exc:  # botocore's errors: the write path maps OSError to a 503
            raise OSError(f"image store {self.url}: {exc}") from None
        return True

    def put_many(self, images: dict[str, bytes], created: list[str]) -> None:
        for sha256, data in images.items():
            if self.put(sha256, data):
                created.append(sha256)

    def remove(self, sha256: str) -> None:
        self._client.delete_object(Bucket=self.bucket, Key=self.key(sha256))

    def read(self, sha256: str) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            obj = self._client.get_object(Bucket=self.bucket, Key=self.key(sha256))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise OSError(f"image store {self.url}: {exc}") from None
        return obj["Body"].read()

    def local_path(self, sha256: str) -> Path | None:
        return None


def open_store(
    images_dir: Path, sync: str = "group", url: str | None = None, endpoint_url: str | None = None
) -> ImageStore | S3ImageStore:
    """The image store the settings name: an S3 bucket when ``url`` is set (MAXMIN_IMAGE_STORE),
    else the folder."""
    if url:
        return S3ImageStore(url, endpoint_url)
    return ImageStore(images_dir, sync)
