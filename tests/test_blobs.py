"""BlobStore over a real local folder (obstore LocalStore) and a real S3 server (SeaweedFS): round trips,
key rules, the spool, presigned URLs.

Store failures are real: the local blob folder is replaced by a plain file, so every write fails inside
obstore ("Not a directory") until the folder is put back; S3 is reached through a TCP relay that is
taken down (connection refused) and brought back, stopped and started itself, or reached with a wrong
secret (403).
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import httpx
import obstore
import pytest

from imagegenx.config import StorageSettings
from imagegenx.storage.blobs import BlobStore, BlobStoreError, BlobWriteError, validate_key
from support.tcp_proxy import TcpProxy


@dataclass
class Backend:
    name: str
    blobs: BlobStore
    stored: Callable[[str], bytes]  # the bytes the store itself holds (not the spool); KeyError if none
    break_store: Callable[[], None]  # every write fails from now on ...
    repair_store: Callable[[], None]  # ... until this


def break_folder(folder: Path) -> None:
    shutil.rmtree(folder)
    folder.write_bytes(b"a file where the blob folder should be")


def repair_folder(folder: Path) -> None:
    folder.unlink()
    folder.mkdir()


def _local(tmp_path: Path) -> Backend:
    folder = tmp_path / "blobs"
    blobs = BlobStore(str(folder), tmp_path / "spool", backoff_s=0.001)

    def stored(key: str) -> bytes:
        path = folder / key
        if not path.is_file():
            raise KeyError(key)
        return path.read_bytes()

    return Backend("local", blobs, stored, lambda: break_folder(folder), lambda: repair_folder(folder))


def _s3(tmp_path: Path, server, proxy: TcpProxy) -> Backend:
    prefix = f"t-{uuid.uuid4().hex[:12]}"  # one bucket for the session, a fresh prefix per test
    s3 = replace(server.config(), endpoint=proxy.url)
    blobs = BlobStore(server.url(prefix), tmp_path / "spool", s3=s3, presign=True, backoff_s=0.001)
    raw = server.raw_store(prefix)  # around the relay

    def stored(key: str) -> bytes:
        try:
            return bytes(obstore.get(raw, key).bytes())
        except FileNotFoundError:
            raise KeyError(key) from None

    return Backend("s3", blobs, stored, proxy.stop, proxy.start)


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path) -> Iterator[Backend]:
    if request.param == "local":
        yield _local(tmp_path)
        return
    server = request.getfixturevalue("s3_server")
    proxy = TcpProxy(server.ports["s3.port"])
    yield _s3(tmp_path, server, proxy)
    proxy.stop()


@pytest.fixture
def blobs(backend) -> BlobStore:
    return backend.blobs


def test_round_trip(backend):
    blobs = backend.blobs
    key = "tasks/abc/original.webp"
    assert not blobs.exists(key)
    blobs.put(key, b"\x00image bytes\xff")
    assert blobs.exists(key)
    assert blobs.get(key) == b"\x00image bytes\xff"
    assert backend.stored(key) == b"\x00image bytes\xff"
    blobs.put(key, b"retry overwrites")  # fixed keys: a retried job overwrites its blobs
    assert blobs.get(key) == b"retry overwrites"
    blobs.put("empty.bin", b"")
    assert blobs.get("empty.bin") == b""
    blobs.delete(key)
    assert not blobs.exists(key)
    with pytest.raises(KeyError):
        blobs.get(key)
    blobs.delete(key)  # deleting what is gone is fine
    assert blobs.spooled_keys() == []


def test_file_url_and_unsupported_schemes(tmp_path):
    store = BlobStore((tmp_path / "viaurl").as_uri(), tmp_path / "spool")
    store.put("a/b.txt", b"x")
    assert (tmp_path / "viaurl" / "a" / "b.txt").read_bytes() == b"x"
    with pytest.raises(NotImplementedError):
        BlobStore("gs://bucket/prefix", tmp_path / "spool")
    with pytest.raises(ValueError, match="name the bucket"):
        BlobStore("s3:///prefix", tmp_path / "spool")


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/abs/path",
        "../escape",
        "a/../../b",
        "a..b",
        "a\\b",
        "a b",
        "a//b",
        "trailing/",
        ".hidden",
        "a/.tmp",
        "ümlaut",
        "a?b",
        "x" * 1025,
    ],
)
def test_bad_keys_are_refused(blobs, key):
    with pytest.raises(ValueError):
        blobs.put(key, b"x")
    with pytest.raises(ValueError):
        blobs.get(key)
    with pytest.raises(ValueError):
        blobs.delete(key)


@pytest.mark.parametrize("key", ["a", "tasks/0f3a-9b/original.webp", "loras/user_1/style.v2.safetensors"])
def test_good_keys(key):
    assert validate_key(key) == key


def test_retries_then_succeeds(blobs, monkeypatch):
    real_put = obstore.put
    calls = []

    def flaky_put(store, path, data, **kwargs):
        calls.append(path)
        if len(calls) < 3:
            raise OSError("transient")
        return real_put(store, path, data, **kwargs)

    monkeypatch.setattr(obstore, "put", flaky_put)
    blobs.put("k.bin", b"third time")
    assert len(calls) == 3
    assert blobs.spooled_keys() == []
    assert blobs.get("k.bin") == b"third time"


def test_failed_store_spools_and_syncs_later(backend, tmp_path):
    blobs = backend.blobs
    backend.break_store()
    blobs.put("tasks/t1/original.webp", b"one")  # reported as done: the bytes are spooled
    blobs.put("tasks/t1/512.webp", b"two")
    assert (tmp_path / "spool" / "tasks" / "t1" / "original.webp").read_bytes() == b"one"
    assert blobs.spooled_keys() == ["tasks/t1/512.webp", "tasks/t1/original.webp"]
    assert blobs.exists("tasks/t1/original.webp")
    assert blobs.get("tasks/t1/original.webp") == b"one"  # served from the spool
    assert blobs.presigned_url("tasks/t1/original.webp") is None  # spooled: the caller serves the bytes

    assert blobs.sync_spool() == 0  # the store still refuses: everything stays spooled
    assert len(blobs.spooled_keys()) == 2

    backend.repair_store()
    assert blobs.sync_spool() == 2
    assert blobs.spooled_keys() == []
    assert not (tmp_path / "spool" / "tasks").exists()  # emptied folders are removed
    assert backend.stored("tasks/t1/original.webp") == b"one"
    assert blobs.get("tasks/t1/512.webp") == b"two"
    assert blobs.sync_spool() == 0
    if backend.name == "s3":  # stored now: a presigned URL serves it
        assert httpx.get(blobs.presigned_url("tasks/t1/original.webp")).content == b"one"


def test_a_sync_pass_stops_at_the_first_failure(backend, monkeypatch):
    """While the store is down, one sweep costs one key's retries, not every spooled key's."""
    blobs = backend.blobs
    backend.break_store()
    for i in range(5):
        blobs.put(f"tasks/t{i}/original.webp", b"x")
    real_put, calls = obstore.put, []

    def counting_put(*args, **kwargs):
        calls.append(args[1])
        return real_put(*args, **kwargs)

    monkeypatch.setattr(obstore, "put", counting_put)
    started = time.monotonic()
    assert blobs.sync_spool() == 0
    assert calls == ["tasks/t0/original.webp"] * blobs.retries
    assert time.monotonic() - started < 2
    backend.repair_store()
    assert blobs.sync_spool() == 5
    assert backend.stored("tasks/t4/original.webp") == b"x"


def test_a_store_write_replaces_a_stale_spooled_copy(backend):
    blobs = backend.blobs
    backend.break_store()
    blobs.put("k.png", b"old, spooled")
    backend.repair_store()
    blobs.put("k.png", b"new, stored")
    assert blobs.spooled_keys() == []  # the spool never shadows newer data
    assert blobs.get("k.png") == b"new, stored"
    assert blobs.sync_spool() == 0
    assert blobs.get("k.png") == b"new, stored"


def test_write_error_when_spooling_fails_too(backend, tmp_path):
    (tmp_path / "not_a_dir").write_bytes(b"")
    blobs = backend.blobs
    blobs.spool_dir = tmp_path / "not_a_dir" / "spool"
    backend.break_store()
    with pytest.raises(BlobWriteError):
        blobs.put("k.png", b"lost")
    with pytest.raises(BlobStoreError):  # a failing store is not a missing blob
        blobs.get("k.png")
    with pytest.raises(BlobStoreError):
        blobs.exists("k.png")
    backend.repair_store()


def test_delete_and_delete_prefix_cover_spool_and_store(backend):
    blobs = backend.blobs
    blobs.put("tasks/a/original.webp", b"1")
    blobs.put("tasks/a/256.webp", b"2")
    blobs.put("tasks/ab/original.webp", b"3")  # a sibling with a longer name: not under tasks/a
    backend.break_store()
    blobs.put("tasks/a/512.webp", b"spooled")
    blobs.put("tasks/ab/512.webp", b"spooled too")
    backend.repair_store()
    blobs.put("tasks/a/original.webp", b"1")  # the local store lost its folder when it broke
    blobs.put("tasks/a/256.webp", b"2")
    blobs.put("tasks/ab/original.webp", b"3")

    assert blobs.delete_prefix("tasks/a/") == 2
    for key in ("tasks/a/original.webp", "tasks/a/256.webp", "tasks/a/512.webp"):
        assert not blobs.exists(key)
        with pytest.raises(KeyError):
            backend.stored(key)
    assert blobs.get("tasks/ab/original.webp") == b"3"
    assert blobs.get("tasks/ab/512.webp") == b"spooled too"
    assert blobs.delete_prefix("tasks/a") == 0
    with pytest.raises(ValueError):
        blobs.delete_prefix("")
    with pytest.raises(ValueError):
        blobs.delete_prefix("../")

    blobs.delete("tasks/ab/512.webp")  # delete removes the spooled copy as well
    assert not blobs.exists("tasks/ab/512.webp")
    assert blobs.spooled_keys() == []


def test_delete_prefix_pages_through_many_objects(backend):
    """More objects than one list page (obstore lists 50 at a time here) and a bulk delete of them all."""
    blobs = backend.blobs
    keys = [f"results/big/{i:03d}.webp" for i in range(120)]
    for key in keys:
        blobs.put(key, b"x")
    blobs.put("results/other/original.webp", b"kept")
    assert blobs.delete_prefix("results/big") == 120
    assert not any(blobs.exists(key) for key in keys[::17])
    assert blobs.get("results/other/original.webp") == b"kept"


# --- S3 only -------------------------------------------------------------------------------------


def test_s3_server_stopped_then_back_syncs_the_spool(s3_server, tmp_path):
    blobs = BlobStore(s3_server.url("restart"), tmp_path / "spool", s3=s3_server.config(), backoff_s=0.001)
    blobs.put("results/t1/original.webp", b"before")
    s3_server.stop()
    try:
        blobs.put("results/t1/512.webp", b"while down")
        assert blobs.spooled_keys() == ["results/t1/512.webp"]
        assert blobs.get("results/t1/512.webp") == b"while down"  # from the spool
        with pytest.raises(BlobStoreError):
            blobs.get("results/t1/original.webp")
        assert blobs.sync_spool() == 0
    finally:
        s3_server.start()
    assert blobs.sync_spool() == 1
    assert blobs.spooled_keys() == []
    raw = s3_server.raw_store("restart")
    assert bytes(obstore.get(raw, "results/t1/512.webp").bytes()) == b"while down"
    assert blobs.get("results/t1/original.webp") == b"before"  # kept across the restart


def test_presigned_url_serves_the_bytes_with_the_content_type(s3_server, tmp_path):
    blobs = BlobStore(s3_server.url("signed"), tmp_path / "spool", s3=s3_server.config(), presign=True)
    blobs.put("results/t9/original.webp", b"RIFF....WEBPVP8 image")
    url = blobs.presigned_url("results/t9/original.webp")
    assert url is not None and url.startswith(s3_server.endpoint + "/")
    assert "X-Amz-Signature=" in url and "X-Amz-Expires=3600" in url  # one hour, as the seed says
    reply = httpx.get(url)  # no credentials: the signature is the permission
    assert reply.status_code == 200
    assert reply.content == b"RIFF....WEBPVP8 image"
    assert reply.headers["content-type"] == "image/webp"
    assert httpx.get(url.replace("original.webp", "512.webp")).status_code == 403  # signed for one key

    short = blobs.presigned_url("results/t9/original.webp", expires_in=timedelta(seconds=1))
    time.sleep(2.1)
    assert httpx.get(short).status_code == 403  # expired
    assert httpx.get(url.split("?")[0]).status_code == 403  # unsigned: refused

    off = BlobStore(s3_server.url("signed"), tmp_path / "spool", s3=s3_server.config())
    assert off.presigned_url("results/t9/original.webp") is None  # presigning is opt-in
    local = BlobStore(str(tmp_path / "local"), tmp_path / "spool", presign=True)
    assert local.presigned_url("results/t9/original.webp") is None  # a folder cannot sign


def test_wrong_credentials_spool_until_a_store_with_the_right_ones_syncs(s3_server, tmp_path):
    """A bad secret (403, not retried by obstore) spools; after the fix, the next process syncs the spool."""
    url, spool = s3_server.url("creds"), tmp_path / "spool"
    wrong = BlobStore(url, spool, s3=s3_server.config(secret="not-the-secret"), backoff_s=0.001)
    wrong.put("results/t1/original.webp", b"kept safe")
    assert wrong.spooled_keys() == ["results/t1/original.webp"]
    assert wrong.sync_spool() == 0
    with pytest.raises(BlobStoreError):
        wrong.exists("results/t2/original.webp")

    fixed = BlobStore(url, spool, s3=s3_server.config())
    assert fixed.sync_spool() == 1
    assert fixed.spooled_keys() == []
    assert (
        bytes(obstore.get(s3_server.raw_store("creds"), "results/t1/original.webp").bytes()) == b"kept safe"
    )


def test_from_settings_reaches_s3(s3_server, tmp_path):
    settings = StorageSettings(
        blob_url=s3_server.url("from-settings"),
        s3_endpoint=s3_server.endpoint,
        s3_access_key_id=s3_server.access_key_id,
        s3_secret_access_key=s3_server.secret_access_key,
        s3_presign=True,
        spool_dir=tmp_path / "spool",
    )
    blobs = BlobStore.from_settings(settings)
    blobs.put("inputs/t1/init.png", b"png")
    assert httpx.get(blobs.presigned_url("inputs/t1/init.png")).content == b"png"
    assert s3_server.secret_access_key not in repr(blobs.__dict__)  # the secret stays out of reprs


def test_lifecycle_rule_archives_the_results_the_service_writes():
    """deploy/s3-lifecycle.json: results move to an archive class that still serves GETs at once."""
    from imagegenx.engine.service import result_key

    rules = json.loads((Path(__file__).parents[1] / "deploy" / "s3-lifecycle.json").read_text())["Rules"]
    archive = [r for r in rules if r.get("Transitions")]
    assert len(archive) == 1 and archive[0]["Status"] == "Enabled"
    assert result_key("t1", "original", ".webp").startswith(archive[0]["Filter"]["Prefix"])
    assert archive[0]["Transitions"] == [{"Days": 90, "StorageClass": "GLACIER_IR"}]  # seed 003: 90 days
