"""The blob store: result images and uploads in an object store (obstore), with a local spool.

Keys are fixed per task (``tasks/<task_id>/original.webp``), so a retried job overwrites its own
blobs instead of leaving orphans. A write is tried ``retries`` times with exponential backoff; when the
store still refuses, the bytes go to ``spool_dir/<key>`` (fsynced) and the write counts as done: every
read looks in the spool first, and ``sync_spool`` later moves spooled blobs into the store (the
ImageGenX seed: "storage write timeout: write to a local temp folder, sync to object storage
asynchronously"). Only if spooling fails too does ``put`` raise ``BlobWriteError``.

A successful store write removes any spooled copy of the key, so the spool never shadows newer data.
Writes, spooling and syncing of one key are serialized by a striped lock within this process; two
processes must not share one spool folder.

Backends: a folder path (or ``file://`` URL) is an obstore ``LocalStore``; ``s3://bucket/prefix`` is an
``S3Store`` (AWS or any S3-compatible server: ``S3Config`` gives endpoint, region and keys; an ``http://``
endpoint, such as a local SeaweedFS or MinIO, is allowed). obstore's own retries are off (they would
wait up to 3 minutes): ``put`` retries as it does for a folder, with 2 s to connect, so a dead server
costs a write seconds, not minutes, before the spool takes the bytes. S3 objects get a
``Content-Type`` from the key's extension, so a presigned GET (``presigned_url``: a URL valid one hour,
the seed's "temporary image URL") serves the image as such. Other schemes are refused.
"""

from __future__ import annotations

import contextlib
import logging
import mimetypes
import os
import re
import secrets
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import obstore
from obstore.exceptions import BaseError as ObstoreError
from obstore.exceptions import NotFoundError
from obstore.store import LocalStore, S3Store

if TYPE_CHECKING:
    from imagegenx.config import StorageSettings

__all__ = ["BlobStore", "BlobStoreError", "BlobWriteError", "S3Config", "validate_key"]

log = logging.getLogger(__name__)

_KEY_CHARS = re.compile(r"[A-Za-z0-9._/-]+")
_MAX_KEY_LEN = 1024
_STORE_ERRORS = (ObstoreError, OSError)  # obstore raises FileNotFoundError etc. for local failures
_NOT_FOUND = (NotFoundError, FileNotFoundError)
_STRIPES = 64
PRESIGN_TTL = timedelta(hours=1)  # seed 003: temporary image URLs expire after one hour


class BlobStoreError(RuntimeError):
    """The store failed (not "no such blob": that is ``KeyError`` from ``get``, False from ``exists``)."""


class BlobWriteError(BlobStoreError):
    """Neither the store nor the local spool accepted a blob."""


@contextlib.contextmanager
def _store_errors(what: str) -> Iterator[None]:
    try:
        yield
    except _NOT_FOUND:
        raise
    except _STORE_ERRORS as error:
        raise BlobStoreError(f"{what}: {error}") from error


def validate_key(key: str, *, what: str = "blob key") -> str:
    """A key is ``[A-Za-z0-9._/-]``, relative, without empty, ``.``-leading or ``..`` segments."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"{what} must be a non-empty string")
    if len(key) > _MAX_KEY_LEN:
        raise ValueError(f"{what} longer than {_MAX_KEY_LEN} characters")
    if "\\" in key or ".." in key or key.startswith("/") or not _KEY_CHARS.fullmatch(key):
        raise ValueError(f"invalid {what} {key!r}: use relative [A-Za-z0-9._/-] paths without '..'")
    if any(not part or part.startswith(".") for part in key.split("/")):
        raise ValueError(f"invalid {what} {key!r}: empty or '.'-leading path segment")
    return key


@dataclass(frozen=True)
class S3Config:
    """How to reach an S3-compatible server. Empty fields: obstore's defaults (AWS, and credentials from
    the ``AWS_*`` environment variables or the instance's role).
    """

    endpoint: str = ""  # http://127.0.0.1:8333 for a local SeaweedFS; empty: AWS
    region: str = "us-east-1"
    access_key_id: str = ""
    secret_access_key: str = field(default="", repr=False)  # never in a log line


def _open_store(blob_url: str, s3: S3Config) -> LocalStore | S3Store:
    scheme = urlsplit(blob_url).scheme
    if scheme == "file":
        return LocalStore.from_url(blob_url, mkdir=True, automatic_cleanup=True)
    if scheme == "" or len(scheme) == 1:  # a plain path (one letter: a Windows drive)
        return LocalStore(Path(blob_url).expanduser(), mkdir=True, automatic_cleanup=True)
    if scheme == "s3":
        if not urlsplit(blob_url).netloc:
            raise ValueError(f"blob store {blob_url!r}: name the bucket, as in s3://bucket/prefix")
        config = {
            "endpoint": s3.endpoint,
            "region": s3.region,
            "access_key_id": s3.access_key_id,
            "secret_access_key": s3.secret_access_key,
        }
        return S3Store.from_url(
            blob_url,
            config={name: value for name, value in config.items() if value},
            client_options={
                "allow_http": s3.endpoint.startswith("http://"),
                "connect_timeout": timedelta(seconds=2),
                "timeout": timedelta(seconds=60),
            },
            retry_config={"max_retries": 0},  # BlobStore retries itself
        )
    raise NotImplementedError(f"blob store {scheme}:// is not supported; give a folder path or s3://bucket")


class BlobStore:
    """Bytes by key in a local folder or S3, with retries and a local spool for failed writes.

    ``presign=True`` (S3 only) makes ``presigned_url`` hand out signed GET URLs instead of None.
    """

    def __init__(
        self,
        blob_url: str,
        spool_dir: Path,
        *,
        s3: S3Config | None = None,
        presign: bool = False,
        retries: int = 3,
        backoff_s: float = 0.05,
    ) -> None:
        if retries < 1:
            raise ValueError("retries must be >= 1")
        self.blob_url = blob_url
        self.spool_dir = Path(spool_dir).expanduser()
        self.retries = retries
        self.backoff_s = backoff_s
        self._store = _open_store(blob_url, s3 or S3Config())
        self._is_s3 = isinstance(self._store, S3Store)
        self.presign = presign and self._is_s3
        self._locks = [threading.Lock() for _ in range(_STRIPES)]

    @classmethod
    def from_settings(cls, settings: StorageSettings) -> BlobStore:
        s3 = S3Config(
            endpoint=settings.s3_endpoint,
            region=settings.s3_region,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=settings.s3_secret_access_key,
        )
        return cls(settings.blob_url, settings.spool_dir, s3=s3, presign=settings.s3_presign)

    # --- public API ----------------------------------------------------------------------------------

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``; a spooled write also counts (see the module docs)."""
        validate_key(key)
        with self._lock(key):
            error = self._put_with_retries(key, data)
            if error is None:
                self._unlink_spooled(key)
                return
            try:
                self._spool(key, data)
            except OSError as spool_error:
                raise BlobWriteError(
                    f"blob {key!r}: store failed ({error}); spooling failed ({spool_error})"
                ) from spool_error
            log.warning("blob %r spooled after %d failed writes: %s", key, self.retries, _first_line(error))

    def get(self, key: str) -> bytes:
        """The blob's bytes (spool first, then store); ``KeyError`` if it is in neither,
        ``BlobStoreError`` if the store fails.
        """
        validate_key(key)
        try:
            return self._spool_path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            pass
        try:
            with _store_errors(f"reading blob {key!r}"):
                return bytes(obstore.get(self._store, key).bytes())
        except _NOT_FOUND as error:
            raise KeyError(key) from error

    def exists(self, key: str) -> bool:
        validate_key(key)
        if self._spool_path(key).is_file():
            return True
        try:
            with _store_errors(f"checking blob {key!r}"):
                obstore.head(self._store, key)
        except _NOT_FOUND:
            return False
        return True

    def presigned_url(self, key: str, expires_in: timedelta = PRESIGN_TTL) -> str | None:
        """A signed GET URL for the blob, or None: presigning off, not S3, or the blob still spooled
        (the caller then serves the bytes itself). Signing is local: no request reaches the server.
        """
        validate_key(key)
        if not self.presign or self._spool_path(key).is_file():
            return None
        with _store_errors(f"signing blob {key!r}"):
            return obstore.sign(self._store, "GET", key, expires_in)

    def delete(self, key: str) -> None:
        """Remove the blob from spool and store; a missing blob is not an error."""
        validate_key(key)
        with self._lock(key):
            self._unlink_spooled(key)
            with contextlib.suppress(*_NOT_FOUND), _store_errors(f"deleting blob {key!r}"):
                obstore.delete(self._store, key)

    def delete_prefix(self, prefix: str) -> int:
        """Remove every blob under the folder ``prefix`` (``tasks/abc`` covers ``tasks/abc/*``, not
        ``tasks/abcd``); returns how many store objects were deleted.
        """
        prefix = validate_key(prefix.rstrip("/"), what="prefix")
        spooled = self.spool_dir / prefix
        if spooled.is_dir():
            for path in sorted(spooled.rglob("*"), reverse=True):  # children before their folders
                if path.is_dir():
                    _remove_empty_dirs(path, self.spool_dir)
                else:
                    with self._lock(path.relative_to(self.spool_dir).as_posix()):
                        path.unlink(missing_ok=True)
            _remove_empty_dirs(spooled, self.spool_dir)
        with _store_errors(f"listing {prefix!r}"):
            paths = [meta["path"] for batch in obstore.list(self._store, prefix + "/") for meta in batch]
        for start in range(0, len(paths), 1000):
            chunk = paths[start : start + 1000]
            with _store_errors(f"deleting under {prefix!r}"):
                try:
                    obstore.delete(self._store, chunk)
                except _NOT_FOUND:  # some went concurrently: delete the rest one by one
                    for path in chunk:
                        with contextlib.suppress(*_NOT_FOUND):
                            obstore.delete(self._store, path)
        return len(paths)

    def spooled_keys(self) -> list[str]:
        """Keys waiting in the spool, sorted."""
        if not self.spool_dir.is_dir():
            return []
        keys = []
        for path in self.spool_dir.rglob("*"):
            rel = path.relative_to(self.spool_dir)
            if path.is_file() and not any(part.startswith(".") for part in rel.parts):
                keys.append(rel.as_posix())
        return sorted(keys)

    def sync_spool(self) -> int:
        """Move spooled blobs into the store; returns how many moved. The first failure ends the pass
        (the store is most likely still down: one failed write per pass, not one per spooled blob, so
        the worker loop that calls this every second is not held up); what is left stays spooled.
        """
        moved = 0
        for key in self.spooled_keys():
            path = self._spool_path(key)
            with self._lock(key):
                try:
                    data = path.read_bytes()
                except FileNotFoundError:
                    continue  # a store write or delete got there first
                error = self._put_with_retries(key, data)
                if error is not None:
                    log.warning("spooled blobs wait for the store (%s): %s", key, _first_line(error))
                    break
                path.unlink(missing_ok=True)
                _remove_empty_dirs(path.parent, self.spool_dir)
                moved += 1
        if moved:
            log.info("moved %d spooled blobs into %s", moved, self.blob_url)
        return moved

    # --- internals -----------------------------------------------------------------------------------

    def _lock(self, key: str) -> threading.Lock:
        return self._locks[zlib.crc32(key.encode()) % _STRIPES]

    def _spool_path(self, key: str) -> Path:
        return self.spool_dir.joinpath(*key.split("/"))

    def _put_with_retries(self, key: str, data: bytes) -> BaseException | None:
        """None on success, else the last error."""
        delay = self.backoff_s
        attributes = None
        if self._is_s3:  # LocalStore refuses attributes
            attributes = {"Content-Type": mimetypes.guess_type(key)[0] or "application/octet-stream"}
        for attempt in range(1, self.retries + 1):
            try:
                obstore.put(self._store, key, data, attributes=attributes)
                return None
            except _STORE_ERRORS as error:
                if attempt == self.retries:
                    return error
                log.debug("blob %r write %d/%d failed: %s", key, attempt, self.retries, error)
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def _spool(self, key: str, data: bytes) -> None:
        """Write ``data`` to ``spool_dir/key`` atomically and durably (temp file, fsync, rename)."""
        path = self._spool_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")  # '.'-names are never keys
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)

    def _unlink_spooled(self, key: str) -> None:
        path = self._spool_path(key)
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError):
            return
        _remove_empty_dirs(path.parent, self.spool_dir)


def _first_line(error: BaseException) -> str:
    """obstore's messages append a many-line debug dump; a log line needs only the first line."""
    return str(error).partition("\n")[0]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)


def _remove_empty_dirs(path: Path, root: Path) -> None:
    """Remove empty folders from ``path`` up to (not including) ``root``."""
    for d in [path, *path.parents]:
        if d == root or root not in d.parents:
            return
        try:
            d.rmdir()
        except OSError:
            return
