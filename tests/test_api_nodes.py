"""Two API nodes (two ``create_app(run_worker=False)``) on shared PostgreSQL, Redis and S3, as a scaled-out
deployment runs them: a key revoked through one node is refused by both at once, one rate-limit budget
per key across the nodes, and result downloads by presigned S3 URL (node A) or proxied (node B).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from fastapi.testclient import TestClient

from imagegenx.api.app import create_app
from imagegenx.config import ModelSettings, ServiceSettings, Settings, StorageSettings
from imagegenx.storage.blobs import BlobStore
from imagegenx.storage.tasks import TaskStore
from imagegenx.types import TaskRecord, TaskStatus, Tier


@dataclass
class Nodes:
    a: TestClient  # presigned downloads on
    b: TestClient  # downloads proxied
    store: TaskStore  # the shared database, reached around the nodes
    blobs: BlobStore  # the shared bucket prefix


def _settings(tmp, node: str, database_url: str, s3, redis_url: str, *, presign: bool) -> Settings:
    storage = StorageSettings(
        database_url=database_url,
        blob_url=s3.url("nodes"),
        s3_endpoint=s3.endpoint,
        s3_access_key_id=s3.access_key_id,
        s3_secret_access_key=s3.secret_access_key,
        s3_presign=presign,
        spool_dir=tmp / node / "spool",  # a spool is per process
    )
    models = ModelSettings(model_dir=tmp / "models", lora_dir=tmp / "loras", device="cpu")
    service = ServiceSettings(rate_limit_url=redis_url, prompt_filter=False)
    return Settings(storage=storage, models=models, service=service)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory, postgres_url, s3_server, redis_url) -> Iterator[Nodes]:
    tmp = tmp_path_factory.mktemp("nodes")
    database_url = postgres_url.render_as_string(hide_password=False)
    a = _settings(tmp, "a", database_url, s3_server, redis_url, presign=True)
    b = _settings(tmp, "b", database_url, s3_server, redis_url, presign=False)
    with (
        TestClient(create_app(a, run_worker=False)) as client_a,
        TestClient(create_app(b, run_worker=False)) as client_b,
        TaskStore(database_url) as store,
    ):
        yield Nodes(client_a, client_b, store, BlobStore.from_settings(b.storage))


def _key(nodes: Nodes, rate: float = 100.0) -> tuple[str, str]:
    key, secret = nodes.store.create_key(f"test-{uuid.uuid4().hex[:6]}", Tier.PAID, rate, 10)
    return key.key_id, secret


def _auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def test_a_key_revoked_on_one_node_is_refused_by_every_node_at_once(nodes):
    key_id, secret = _key(nodes)
    for client in (nodes.a, nodes.b):  # both nodes have seen the key: nothing to cache-hit afterwards
        assert client.get("/api/v1/image/tasks", headers=_auth(secret)).status_code == 200
    assert nodes.store.revoke_key(key_id)  # what `imagegenx keys revoke` does, on the shared database
    for client in (nodes.b, nodes.a):
        reply = client.get("/api/v1/image/tasks", headers=_auth(secret))
        assert reply.status_code == 401
        assert "revoked" in reply.json()["message"]


def test_the_nodes_share_one_rate_limit_budget(nodes):
    _, secret = _key(nodes, rate=0.2)  # a burst of 1, then one request per 5 s
    assert nodes.a.get("/api/v1/image/tasks", headers=_auth(secret)).status_code == 200
    refused = nodes.b.get("/api/v1/image/tasks", headers=_auth(secret))
    assert refused.status_code == 429  # the other node knows the budget is spent
    assert refused.headers["Retry-After"] == "5"
    assert nodes.a.get("/api/v1/image/tasks", headers=_auth(secret)).status_code == 429
    _, other = _key(nodes, rate=0.2)
    assert nodes.b.get("/api/v1/image/tasks", headers=_auth(other)).status_code == 200  # per key


def test_results_download_by_presigned_url_or_proxied(nodes, s3_server):
    key_id, secret = _key(nodes)
    task_id = uuid.uuid4().hex
    blob_key = f"results/{task_id}/original.webp"
    nodes.blobs.put(blob_key, b"RIFF\x00\x00\x00\x00WEBPVP8 not really")
    record = TaskRecord(
        task_id=task_id,
        user_id=key_id,
        task_type="generate",
        status=TaskStatus.SUCCEEDED,
        priority=2,
        params={"text": "a cat"},
        created_at=time.time(),
        results={"original": blob_key},
    )
    nodes.store.create([record])
    path = f"/api/v1/image/task/{task_id}/download?version=original"

    redirect = nodes.a.get(path, headers=_auth(secret), follow_redirects=False)
    assert redirect.status_code == 307
    signed = redirect.headers["location"]
    assert signed.startswith(f"{s3_server.endpoint}/{s3_server.bucket}/nodes/{blob_key}?")
    assert "X-Amz-Signature=" in signed
    fetched = httpx.get(signed)  # from S3 itself, without the API key
    assert fetched.status_code == 200
    assert fetched.content == b"RIFF\x00\x00\x00\x00WEBPVP8 not really"
    assert fetched.headers["content-type"] == "image/webp"

    proxied = nodes.b.get(path, headers=_auth(secret))
    assert proxied.status_code == 200
    assert proxied.content == fetched.content
    assert proxied.headers["content-disposition"] == f'attachment; filename="{task_id}-original.webp"'

    assert nodes.a.get(path, follow_redirects=False).status_code == 401  # no key, no URL
    _, stranger = _key(nodes)
    assert nodes.a.get(path, headers=_auth(stranger), follow_redirects=False).status_code == 404
