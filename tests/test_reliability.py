"""Access and bad input against a real `imagegenx serve`: keys on every route, keys hashed at rest, no
secret in logs or error bodies, SSRF refusals for image_url and callback_url (redirects too), LoRA
upload refusals and parameter extremes, each answered with a clear 4xx."""

import base64
import hashlib
import io
import ipaddress
import json
import re
import socket
import sqlite3

import pytest
from fastapi.routing import APIRoute
from PIL import Image
from starlette.routing import Mount

from imagegenx.api.app import create_app
from imagegenx.api.lora_upload import check_safetensors, save_lora
from imagegenx.config import Settings
from imagegenx.types import UserError
from support.server import Server
from test_api_security import _reply, _Server

SMALL = {"width": 64, "height": 64, "steps": 2}
IMG2IMG = "/api/v1/image/img2img"
JSON = {"Content-Type": "application/json"}
S3_SECRET = "s3-secret-MARKER-7f3a9c"  # set in the server's environment; must never be shown anywhere
# Served without a key, by design: liveness and readiness probes, the browser page and its static
# files, and the API's own description (the same for everyone). /metrics takes an API key or the
# scraper's token (test_metrics_take_a_key_or_the_scrapers_token).
PUBLIC = {"/healthz", "/readyz", "/", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
METRICS_TOKEN = "scrape-MARKER-51c2"


@pytest.fixture(scope="module")
def redirector():
    """An allowed host that redirects to private ones: each hop must be checked again."""
    srv = _Server(
        {
            "/local": lambda h: _reply(h, 302, headers=[("Location", "http://127.0.0.1:9/secret")]),
            "/v6": lambda h: _reply(h, 302, headers=[("Location", "http://[::1]/")]),
        }
    )
    yield srv.port
    srv.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, redirector):
    env = {
        "IMAGEGENX_SERVICE__ALLOWED_PRIVATE_HOSTS": json.dumps([f"127.0.0.1:{redirector}"]),
        "IMAGEGENX_SERVICE__MAX_LORA_BYTES": "4096",
        "IMAGEGENX_STORAGE__S3_SECRET_ACCESS_KEY": S3_SECRET,
        "IMAGEGENX_SERVICE__METRICS_TOKEN": METRICS_TOKEN,
    }
    srv = Server(tmp_path_factory.mktemp("reliability"), env=env).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with server.client(server.key()) as c:
        yield c


def _key_of(client) -> str:
    return client.headers["Authorization"].removeprefix("Bearer ")


def _png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 120, 200)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


# -- access ------------------------------------------------------------------------------------------


def _routes():
    """(method, path) for every route the app serves, path parameters filled in."""
    found = []

    def walk(routes, prefix=""):
        for route in routes:
            included = getattr(route, "original_router", None)  # FastAPI >= 0.16x wraps included routers
            if included is not None:
                walk(included.routes, prefix + route.include_context.prefix)
            elif isinstance(route, Mount):
                found.append(("GET", f"{prefix}{route.path}/app.js"))
            elif isinstance(route, APIRoute) or hasattr(route, "methods"):
                path = re.sub(r"\{[^}]+\}", "x", prefix + route.path)
                found.extend((method, path) for method in sorted(route.methods or ()) if method != "HEAD")

    walk(create_app(Settings()).routes)
    return found


def test_every_route_needs_a_valid_key_except_the_public_ones(server, client):
    routes = _routes()
    assert len(routes) > 40 and ("POST", "/api/v1/image/generate") in routes
    mounts = {path for method, path in routes if path.startswith("/web/")}
    assert mounts, "the page's static files are mounted under /web"
    revoked = server.key()
    from imagegenx.storage.tasks import TaskStore

    store = TaskStore(server.database_url)
    store.revoke_key(store.verify_key(revoked).key_id)
    store.close()
    unprotected = []
    for headers in [{}, {"Authorization": "Bearer igx_not_a_key"}, {"X-API-Key": revoked}]:
        with server.client() as anonymous:
            for method, path in routes:
                response = anonymous.request(method, path, headers=headers, json={})
                if path in PUBLIC or path in mounts:
                    assert response.status_code < 500, (method, path, response.text)
                    continue
                if response.status_code != 401:
                    unprotected.append((method, path, headers, response.status_code))
                else:
                    assert "key" in response.text.lower() and "igx_not_a_key" not in response.text
    assert unprotected == []
    assert client.get("/api/v1/image/tasks").status_code == 200  # a valid key opens them
    assert client.get("/sdapi/v1/sd-models").status_code == 200


def test_metrics_take_a_key_or_the_scrapers_token(server, client):
    with server.client() as anonymous:
        assert anonymous.get("/metrics").status_code == 401
        assert anonymous.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        scraped = anonymous.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert scraped.status_code == 200 and "imagegenx_queue_depth" in scraped.text
        assert anonymous.get("/metrics", headers={"X-API-Key": METRICS_TOKEN}).status_code == 401  # no key
    assert "imagegenx_queue_depth" in client.get("/metrics").text  # any valid API key


def test_keys_are_hashed_at_rest(server):
    secret = server.key()
    db = sqlite3.connect(server.database_url.removeprefix("sqlite:///"))
    rows = db.execute("SELECT * FROM api_keys").fetchall()
    db.close()
    assert rows
    cells = [str(cell) for row in rows for cell in row]
    assert not any(secret in cell or secret.split("_", 1)[-1] in cell for cell in cells)
    assert hashlib.sha256(secret.encode()).hexdigest() in cells


def test_no_secret_in_logs_or_error_bodies(server, client):
    webhook_secret = (server.root / "webhook_secret").read_text().strip()
    wrong = "igx_wrong_" + "z" * 30
    bodies = []
    with server.client(wrong) as stranger:
        bodies.append(stranger.get("/api/v1/image/tasks").text)
    for body in [
        {"text": "x", **SMALL, "callback_url": "https://user:hunter2-password@example.com/hook"},
        {"text": "x", **SMALL, "callback_url": "http://169.254.169.254/?token=sekrit-token-value"},
        {"text": "x", **SMALL, "image_url": "https://no-such-host.invalid/a.png?X-Amz-Signature=sekrit-sig"},
    ]:
        path = "/api/v1/image/img2img" if "image_url" in body else "/api/v1/image/generate"
        response = client.post(path, json=body)
        assert response.status_code == 400, response.text
        bodies.append(response.text)
    bodies.append(client.get("/api/v1/image/task/nope").text)
    log = server.log.read_text()
    secrets = [_key_of(client), wrong, webhook_secret, S3_SECRET, "hunter2-password", "sekrit"]
    for secret in secrets:
        assert secret not in log, secret
        assert not any(secret in body for body in bodies), secret


# -- SSRF through the API ----------------------------------------------------------------------------


def _private_name() -> str:
    """This machine's own name: /etc/hosts maps it to a loopback or private address."""
    name = socket.gethostname()
    addresses = {info[4][0] for info in socket.getaddrinfo(name, 80)}
    assert addresses and all(not ipaddress.ip_address(a).is_global for a in addresses), addresses
    return name


def test_ssrf_targets_are_refused_for_image_url_and_callback_url(client, redirector):
    targets = [
        "http://127.0.0.1/",
        "http://[::1]/",
        "http://169.254.169.254/latest/meta-data/",
        "http://2130706433/",  # decimal 127.0.0.1
        "http://0177.0.0.1/",  # octal
        "http://0x7f.1/",
        "http://10.0.0.1/",
        f"http://{_private_name()}/",  # a name that resolves to a private address
        "file:///etc/passwd",
    ]
    for url in targets:
        for path, field in [
            ("/api/v1/image/img2img", "image_url"),
            ("/api/v1/image/generate", "callback_url"),
        ]:
            response = client.post(path, json={"text": "x", **SMALL, field: url})
            assert response.status_code == 400, (field, url, response.text)
            assert re.search(r"allowed|loopback|private|link-local", response.json()["message"]), url
    for hop in ("local", "v6"):  # an allowed host whose redirect points at a private address
        url = f"http://127.0.0.1:{redirector}/{hop}"
        response = client.post("/api/v1/image/img2img", json={"text": "x", **SMALL, "image_url": url})
        assert response.status_code == 400 and "loopback" in response.json()["message"], response.text


# -- bad images, LoRA uploads, parameter extremes -----------------------------------------------------


def test_bad_images_are_refused_at_submit(client):
    from test_fuzz_images import png_bomb

    cases = {
        "truncated": base64.b64decode(_png())[:80],
        "gif": Image.new("RGB", (8, 8)),
        "bomb": png_bomb(6000),  # 36 M pixels in ~40 kB
    }
    for name, data in cases.items():
        if isinstance(data, Image.Image):
            buf = io.BytesIO()
            data.save(buf, "GIF")
            data = buf.getvalue()
        body = {"text": "x", **SMALL, "image": base64.b64encode(data).decode()}
        response = client.post("/api/v1/image/img2img", json=body)
        assert response.status_code == 400, (name, response.text)
        assert re.search(r"not a readable image|too large", response.json()["message"]), name
    upload = client.post(
        "/api/v1/image/img2img/upload",
        files={"image": ("x.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 50)},
        data={"params": json.dumps({"text": "x", **SMALL})},
    )
    assert upload.status_code == 400 and "not a readable image" in upload.json()["message"]


def test_lora_uploads_are_refused_unless_real_safetensors(client, tmp_path):
    import torch
    from safetensors.torch import save

    good = save({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)})
    for bad, reason in [
        (b"\x80\x04\x95" + b"\0" * 64, "pickled"),  # a pickle (torch.save / .ckpt)
        (b"PK\x03\x04" + b"\0" * 64, "safetensors"),  # a zip (torch.save's default format)
        (b"hello, world, not a model", "safetensors"),
        (b"x" * 5000, "larger than 4096 bytes"),
    ]:
        response = client.post("/api/v1/lora/upload", files={"file": ("a.safetensors", bad)})
        assert response.status_code == 400 and reason in response.json()["message"], response.text
    for filename in ["../../etc/evil.safetensors", "/etc/passwd.safetensors", "..\\..\\x.safetensors", "\0."]:
        response = client.post("/api/v1/lora/upload", files={"file": (filename, good)})
        assert response.status_code == 200, response.text
        name = response.json()["data"]["name"]
        assert re.fullmatch(r"[A-Za-z0-9_-]+", name), name
    # A symlink planted where the upload will land is replaced, never written through.
    outside = tmp_path / "outside.txt"
    outside.write_text("untouched")
    name = save_lora(tmp_path / "loras", "planted.safetensors", good)
    target = tmp_path / "loras" / f"{name}.safetensors"
    target.unlink()
    target.symlink_to(outside)
    assert save_lora(tmp_path / "loras", "planted.safetensors", good) == name
    assert not target.is_symlink() and target.read_bytes() == good and outside.read_text() == "untouched"
    with pytest.raises(UserError, match="points outside"):
        check_safetensors(good[:-4])  # a tensor whose data runs past the end


def test_parameter_extremes_get_a_clear_4xx(client):
    cases = [
        ({"text": ""}, "text"),
        ({"text": "a" * 100_000}, "text"),
        ({"text": "x", "steps": 0}, "steps"),
        ({"text": "x", "steps": 1_000_000}, "steps"),
        ({"text": "x", "width": 65}, "multiple of 8"),
        ({"text": "x", "height": 100}, "multiple of 8"),
        ({"text": "x", "width": 0}, "width"),
        ({"text": "x", "width": -64}, "width"),
        ({"text": "x", "width": 10**9}, "width"),
        ({"text": "x", "seed": 2**80}, "seed"),
        ({"text": "x", "cfg_scale": 1e308}, "cfg_scale"),
        ({"text": "x", "priority": 99}, "priority"),
        ({"text": ["not", "a", "string"]}, "text"),
    ]
    for body, words in cases:
        response = client.post("/api/v1/image/generate", json={**SMALL, **body})
        assert 400 <= response.status_code < 500, (body, response.text)
        message = response.json()["message"]
        assert words in message.lower(), (body, message)
    raw = '{"text": "x", "width": 64, "height": 64, "steps": 2, "cfg_scale": NaN}'
    response = client.post(
        "/api/v1/image/generate", content=raw, headers={"Content-Type": "application/json"}
    )
    assert 400 <= response.status_code < 500, response.text
    broken = client.post(
        "/api/v1/image/generate", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert broken.status_code in (400, 422) and broken.json()["message"]
