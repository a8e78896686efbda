"""BlobStore over a real local folder (obstore LocalStore): round trips, key rules, the spool.

Store failures are real: the blob folder is replaced by a plain file, so every write fails inside
obstore ("Not a directory") until the folder is put back.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import obstore
import pytest

from imagegenx.storage.blobs import BlobStore, BlobStoreError, BlobWriteError, validate_key


@pytest.fixture
def blobs(tmp_path) -> BlobStore:
    return BlobStore(str(tmp_path / "blobs"), tmp_path / "spool", backoff_s=0.001)


def break_store(folder: Path) -> None:
    shutil.rmtree(folder)
    folder.write_bytes(b"a file where the blob folder should be")


def repair_store(folder: Path) -> None:
    folder.unlink()
    folder.mkdir()


def test_round_trip(blobs, tmp_path):
    key = "tasks/abc/original.webp"
    assert not blobs.exists(key)
    blobs.put(key, b"\x00image bytes\xff")
    assert blobs.exists(key)
    assert blobs.get(key) == b"\x00image bytes\xff"
    assert (tmp_path / "blobs" / "tasks" / "abc" / "original.webp").read_bytes() == b"\x00image bytes\xff"
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
        BlobStore("s3://bucket/prefix", tmp_path / "spool")


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

    def flaky_put(store, path, data):
        calls.append(path)
        if len(calls) < 3:
            raise OSError("transient")
        return real_put(store, path, data)

    monkeypatch.setattr(obstore, "put", flaky_put)
    blobs.put("k.bin", b"third time")
    assert len(calls) == 3
    assert blobs.spooled_keys() == []
    assert blobs.get("k.bin") == b"third time"


def test_failed_store_spools_and_syncs_later(blobs, tmp_path):
    folder = tmp_path / "blobs"
    break_store(folder)
    blobs.put("tasks/t1/original.webp", b"one")  # reported as done: the bytes are spooled
    blobs.put("tasks/t1/512.webp", b"two")
    assert (tmp_path / "spool" / "tasks" / "t1" / "original.webp").read_bytes() == b"one"
    assert blobs.spooled_keys() == ["tasks/t1/512.webp", "tasks/t1/original.webp"]
    assert blobs.exists("tasks/t1/original.webp")
    assert blobs.get("tasks/t1/original.webp") == b"one"  # served from the spool

    assert blobs.sync_spool() == 0  # the store still refuses: everything stays spooled
    assert len(blobs.spooled_keys()) == 2

    repair_store(folder)
    assert blobs.sync_spool() == 2
    assert blobs.spooled_keys() == []
    assert not (tmp_path / "spool" / "tasks").exists()  # emptied folders are removed
    assert (folder / "tasks" / "t1" / "original.webp").read_bytes() == b"one"
    assert blobs.get("tasks/t1/512.webp") == b"two"
    assert blobs.sync_spool() == 0


def test_a_store_write_replaces_a_stale_spooled_copy(blobs, tmp_path):
    folder = tmp_path / "blobs"
    break_store(folder)
    blobs.put("k.png", b"old, spooled")
    repair_store(folder)
    blobs.put("k.png", b"new, stored")
    assert blobs.spooled_keys() == []  # the spool never shadows newer data
    assert blobs.get("k.png") == b"new, stored"
    assert blobs.sync_spool() == 0
    assert blobs.get("k.png") == b"new, stored"


def test_write_error_when_spooling_fails_too(tmp_path):
    (tmp_path / "not_a_dir").write_bytes(b"")
    blobs = BlobStore(str(tmp_path / "blobs"), tmp_path / "not_a_dir" / "spool", backoff_s=0.001)
    break_store(tmp_path / "blobs")
    with pytest.raises(BlobWriteError):
        blobs.put("k.png", b"lost")
    with pytest.raises(BlobStoreError):  # a failing store is not a missing blob
        blobs.get("k.png")
    with pytest.raises(BlobStoreError):
        blobs.exists("k.png")


def test_delete_and_delete_prefix_cover_spool_and_store(blobs, tmp_path):
    folder = tmp_path / "blobs"
    blobs.put("tasks/a/original.webp", b"1")
    blobs.put("tasks/a/256.webp", b"2")
    blobs.put("tasks/ab/original.webp", b"3")  # a sibling with a longer name: not under tasks/a
    break_store(folder)
    blobs.put("tasks/a/512.webp", b"spooled")
    blobs.put("tasks/ab/512.webp", b"spooled too")
    repair_store(folder)
    blobs.put("tasks/a/original.webp", b"1")
    blobs.put("tasks/a/256.webp", b"2")
    blobs.put("tasks/ab/original.webp", b"3")

    assert blobs.delete_prefix("tasks/a/") == 2
    for key in ("tasks/a/original.webp", "tasks/a/256.webp", "tasks/a/512.webp"):
        assert not blobs.exists(key)
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
