"""The HTTP service end to end: a real `imagegenx serve` process, real HTTP, tiny models."""

import base64
import io
import json
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import ClassVar

import numpy as np
import pytest
from PIL import Image
from standardwebhooks import Webhook

from support.server import Server, free_port, wait_for

SMALL = {"width": 64, "height": 64, "steps": 4}


def _png(value: int = 120) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


class _Receiver(BaseHTTPRequestHandler):
    received: ClassVar[list] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        type(self).received.append((dict(self.headers), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def receiver():
    port = free_port()
    httpd = HTTPServer(("127.0.0.1", port), _Receiver)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield port
    httpd.shutdown()


@pytest.fixture(scope="module")
def server(tmp_path_factory, receiver):
    root = tmp_path_factory.mktemp("serve")
    env = {"IMAGEGENX_SERVICE__ALLOWED_PRIVATE_HOSTS": json.dumps([f"127.0.0.1:{receiver}"])}
    srv = Server(root, env=env).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with server.client(server.key()) as c:
        yield c


def submit(client, path: str, body: dict) -> str:
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    envelope = response.json()
    assert envelope["code"] == 0 and envelope["message"] == "ok"
    return envelope["data"]["task_ids"][0]


def test_generate_and_download_every_version(client):
    task_id = submit(client, "/api/v1/image/generate", {"text": "a red fox in snow", **SMALL, "seed": 3})
    view = wait_for(client, task_id)
    assert view["status"] == "succeeded" and view["progress"] == 100 and view["attempts"] == 1
    assert set(view["urls"]) == {"original", "512", "256"}
    assert view["metadata"]["seed"] == 3 and "Steps: 4" in view["metadata"]["parameters"]
    for version, fmt in (("original", "WEBP"), ("512", "WEBP"), ("256", "WEBP")):
        response = client.get(view["urls"][version])
        assert response.status_code == 200
        assert Image.open(io.BytesIO(response.content)).format == fmt


def test_a_request_without_a_sampler_gets_the_models_own(client):
    """No "sampler": DPM++ 2M Karras for an SD model, flow-matching Euler for Flux (which takes no
    other, so a Flux request with the UNet families' default used to fail)."""
    samplers = {}
    for model in ("random:tiny-sd15", "random:tiny-flux"):
        body = {"text": "a red fox", "model": model, **SMALL, "cfg_scale": 3.5}
        view = wait_for(client, submit(client, "/api/v1/image/generate", body))
        assert view["status"] == "succeeded", view.get("error")
        assert "scheduler" not in view["params"]  # the choice is the worker's, per model family
        samplers[model] = view["metadata"]["sampler"]
    assert samplers == {"random:tiny-sd15": "DPM++ 2M Karras", "random:tiny-flux": "Euler"}


def test_png_output_and_style(client):
    task_id = submit(
        client, "/api/v1/image/generate", {"text": "a cat", **SMALL, "format": "png", "style": "anime"}
    )
    view = wait_for(client, task_id)
    assert view["urls"]["original"].endswith("version=original")
    assert (
        view["style"] == "anime"
        and "a cat" in view["params"]["prompt"]
        and view["params"]["prompt"] != "a cat"
    )
    data = client.get(view["urls"]["original"]).content
    assert Image.open(io.BytesIO(data)).format == "PNG"


def test_img2img_base64_and_inpaint_upload(client):
    b64 = base64.b64encode(_png()).decode()
    task_a = submit(
        client, "/api/v1/image/img2img", {"text": "a barn", **SMALL, "image": b64, "strength": 0.5}
    )
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, "PNG")
    response = client.post(
        "/api/v1/image/inpaint/upload",
        files={"image": ("in.png", _png(), "image/png"), "mask": ("mask.png", buf.getvalue(), "image/png")},
        data={"params": json.dumps({"text": "a window", **SMALL})},
    )
    assert response.status_code == 200, response.text
    task_b = response.json()["data"]["task_ids"][0]
    for task_id, kind in ((task_a, "img2img"), (task_b, "inpaint")):
        view = wait_for(client, task_id)
        assert (view["status"], view["task_type"]) == ("succeeded", kind)


def test_bad_requests_get_clear_errors(client):
    cases = [
        ("/api/v1/image/generate", {"text": "x", "width": 65, "height": 64}, 400, "multiple of 8"),
        ("/api/v1/image/generate", {"text": "", **SMALL}, 422, "text"),
        ("/api/v1/image/generate", {"text": "x", **SMALL, "sampler": "warp"}, 400, "unknown scheduler"),
        ("/api/v1/image/generate", {"text": "x", **SMALL, "style": "nope"}, 400, "style"),
        ("/api/v1/image/generate", {"text": "x", **SMALL, "decoder": "tiny"}, 400, "no tiny decoder"),
        ("/api/v1/image/generate", {"text": "x", **SMALL, "decoder": "vae"}, 422, "decoder"),
        (
            "/api/v1/portrait",
            {"prompt": "x", "selfies": [base64.b64encode(_png()).decode()], "draft_decoder": "tiny"},
            400,
            "no tiny decoder",
        ),
        ("/api/v1/image/img2img", {"text": "x", **SMALL}, 400, "image is required"),
        ("/api/v1/image/img2img", {"text": "x", **SMALL, "image": "%%%"}, 400, "base64"),
        ("/api/v1/image/img2img", {"text": "x", **SMALL, "image_url": "http://169.254.169.254/x"}, 400, ""),
        ("/api/v1/image/generate", {"text": "x", **SMALL, "callback_url": "http://127.0.0.1:1/"}, 400, ""),
        (
            "/api/v1/image/controlnet",
            {"text": "x", **SMALL, "controls": [{"type": "canny", "model": "m"}]},
            400,
            "canny image is required",
        ),
        ("/api/v1/image/generate", {"text": "you stupid fucking idiot", **SMALL}, 400, "safety filter"),
        (
            "/api/v1/image/batch-generate",
            {"texts": ["a cat", "a dismembered corpse, gore"], **SMALL},
            400,
            "gore",
        ),
    ]
    for path, body, status, words in cases:
        response = client.post(path, json=body)
        assert response.status_code == status, (path, body, response.text)
        envelope = response.json()
        assert envelope["code"] == status and envelope["data"] is None and words in envelope["message"]
    junk = {"text": "x", **SMALL, "image": base64.b64encode(b"junk").decode()}
    response = client.post("/api/v1/image/img2img", json=junk)  # refused at once, not a failed task later
    assert response.status_code == 400 and "not a readable image" in response.json()["message"]


def test_batch_generate_and_zip(client):
    response = client.post(
        "/api/v1/image/batch-generate", json={"texts": ["a cat", "a dog", "an owl"], **SMALL, "seed": 1}
    )
    data = response.json()["data"]
    assert len(data["task_ids"]) == 3 and data["batch_id"]
    for task_id in data["task_ids"]:
        assert wait_for(client, task_id)["status"] == "succeeded"
    archive = zipfile.ZipFile(
        io.BytesIO(client.get(f"/api/v1/image/download.zip?batch_id={data['batch_id']}").content)
    )
    names = archive.namelist()
    assert sorted(n.split(".")[0] for n in names if n.endswith(".webp")) == sorted(data["task_ids"])
    assert len([n for n in names if n.endswith(".json")]) == 3
    ids = ",".join(data["task_ids"][:2])
    archive = zipfile.ZipFile(io.BytesIO(client.get(f"/api/v1/image/download.zip?task_ids={ids}").content))
    assert len(archive.namelist()) == 4


def test_progress_as_server_sent_events(client):
    task_id = submit(
        client, "/api/v1/image/generate", {"text": "a tree", "width": 64, "height": 64, "steps": 30}
    )
    events = []
    with client.stream("GET", f"/api/v1/image/task/{task_id}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    assert events[-1]["status"] == "succeeded"
    progress = [e["progress"] for e in events if e["status"] == "processing"]
    assert progress == sorted(progress) and len(set(progress)) >= 3


def test_cancel_queued_and_running(server, client):
    long = {"text": "slow", "width": 64, "height": 64, "steps": 150, "priority": 3}
    running = submit(client, "/api/v1/image/generate", long)
    wait_for(client, running, until=("processing",))
    time.sleep(0.3)
    response = client.post(f"/api/v1/image/task/{running}/cancel")
    assert response.status_code == 200
    assert wait_for(client, running)["status"] == "canceled"
    queued = [submit(client, "/api/v1/image/generate", long | {"width": 72}) for _ in range(3)]
    last = queued[-1]
    assert client.post(f"/api/v1/image/task/{last}/cancel").json()["data"]["status"] in (
        "canceled",
        "processing",
    )
    assert wait_for(client, last)["status"] == "canceled"
    for task_id in queued[:-1]:
        client.post(f"/api/v1/image/task/{task_id}/cancel")
        assert wait_for(client, task_id)["status"] == "canceled"
    assert client.post("/api/v1/image/task/nope/cancel").status_code == 404


def test_history_filters_and_pages(client):
    for style in ("anime", "oil-painting"):
        wait_for(client, submit(client, "/api/v1/image/generate", {"text": "h", **SMALL, "style": style}))
    page = client.get("/api/v1/image/tasks", params={"style": "anime", "page_size": 1}).json()["data"]
    assert page["total"] >= 1 and len(page["items"]) == 1 and page["items"][0]["style"] == "anime"
    done = client.get("/api/v1/image/tasks", params={"status": "succeeded", "resolution": "64x64"}).json()[
        "data"
    ]
    assert all(i["status"] == "succeeded" and i["width"] == 64 for i in done["items"])
    assert client.get("/api/v1/image/tasks", params={"since": time.time() + 60}).json()["data"]["total"] == 0


def test_keys_rate_limits_quotas_and_tiers(server):
    with server.client() as anonymous:
        assert anonymous.get("/api/v1/image/tasks").status_code == 401
    with server.client("igx_fake_secret") as wrong:
        assert wrong.get("/api/v1/image/tasks").status_code == 401
    with server.client(server.key(rate=1.0)) as slow:
        codes = [slow.get("/api/v1/image/tasks") for _ in range(3)]
        limited = [r for r in codes if r.status_code == 429]
        assert limited and int(limited[0].headers["Retry-After"]) >= 1
    with server.client(server.key(quota=1)) as small:
        first = small.post(
            "/api/v1/image/generate", json={"text": "q", "width": 64, "height": 64, "steps": 150}
        )
        second = small.post("/api/v1/image/generate", json={"text": "q", **SMALL})
        assert (
            first.status_code == 200 and second.status_code == 429 and "at most 1" in second.json()["message"]
        )
        small.post(f"/api/v1/image/task/{first.json()['data']['task_ids'][0]}/cancel")
    with server.client(server.key(tier="free")) as free:
        big = free.post("/api/v1/image/generate", json={"text": "x", "width": 2048, "height": 2048})
        assert big.status_code == 403 and "1024x1024" in big.json()["message"]
        upload = free.post("/api/v1/lora/upload", files={"file": ("a.safetensors", b"x" * 64)})
        assert upload.status_code == 403


def test_revoked_key_is_refused_at_once(server):
    from imagegenx.storage.tasks import TaskStore

    secret = server.key()
    with server.client(secret) as c:
        assert c.get("/api/v1/image/tasks").status_code == 200
        store = TaskStore(server.database_url)
        key = store.verify_key(secret)
        assert store.revoke_key(key.key_id)
        store.close()
        assert c.get("/api/v1/image/tasks").status_code == 401


def test_lora_upload(client):
    import torch
    from safetensors.torch import save

    good = save({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)})
    response = client.post("/api/v1/lora/upload", files={"file": ("../../evil name.safetensors", good)})
    assert response.status_code == 200, response.text
    name = response.json()["data"]["name"]
    assert "/" not in name and ".." not in name and name.startswith("evil-name")
    assert name in client.get("/api/v1/loras").json()["data"]
    pickled = client.post(
        "/api/v1/lora/upload", files={"file": ("x.safetensors", b"\x80\x04\x95" + b"\0" * 64)}
    )
    assert pickled.status_code == 400 and "safetensors" in pickled.json()["message"]


def test_webhook_is_signed_per_standard_webhooks(server, client, receiver):
    _Receiver.received.clear()
    body = {"text": "hook", **SMALL, "callback_url": f"http://127.0.0.1:{receiver}/hook"}
    task_id = submit(client, "/api/v1/image/generate", body)
    wait_for(client, task_id)
    deadline = time.monotonic() + 30
    while not _Receiver.received and time.monotonic() < deadline:
        time.sleep(0.1)
    headers, raw = _Receiver.received[-1]
    secret = (server.root / "webhook_secret").read_text().strip()
    payload = Webhook(secret).verify(raw, {k.lower(): v for k, v in headers.items()})
    assert payload["type"] == "task.succeeded" and payload["data"]["task_id"] == task_id
    with pytest.raises(Exception):  # noqa: B017 - any verification failure will do
        Webhook(secret).verify(raw.replace(b"hook", b"hack"), {k.lower(): v for k, v in headers.items()})


def test_models_metrics_health_and_openapi(server, client):
    assert "random:tiny-sd15" in {m["name"] for m in client.get("/api/v1/models").json()["data"]}
    assert len(client.get("/api/v1/styles").json()["data"]) >= 20
    assert client.get("/healthz").json() == {"status": "ok"}
    metrics = client.get("/metrics").text
    names = ("imagegenx_queue_depth", "imagegenx_model_loads_total", "imagegenx_unet_batch_images")
    names += ("imagegenx_generation_seconds_bucket", "imagegenx_vram_used_bytes", "imagegenx_images_total")
    for name in names:
        assert name in metrics
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/api/v1/image/generate", "/api/v1/image/task/{task_id}", "/api/v1/image/download.zip"):
        assert path in paths


def test_logs_are_json_lines_with_task_fields(server, client):
    task_id = submit(client, "/api/v1/image/generate", {"text": "logged", **SMALL})
    wait_for(client, task_id)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [json.loads(line) for line in server.log.read_text().splitlines() if line.startswith("{")]
        mine = [line for line in lines if line.get("task_id") == task_id]
        if mine:
            break
        time.sleep(0.2)
    assert mine[0]["model"] == "random:tiny-sd15" and mine[0]["resolution"] == "64x64"
    assert mine[0]["status"] == "succeeded" and mine[0]["level"] == "info"
    assert not any(line.get("message", "").count("igx_") for line in lines)  # no key secret in logs
