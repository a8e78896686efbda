"""The post-processing chain end to end: upscale, visible and invisible watermark, from CLI and API."""

import io
import json

from PIL import Image
from typer.testing import CliRunner

from imagegenx.cli import app
from imagegenx.postprocess.watermark import check_watermark
from support.server import Server, wait_for


def test_cli_upscale_and_watermarks(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGEGENX_MODELS__MODEL_DIR", str(tmp_path))
    args = [
        "generate",
        "a red fox",
        "-m",
        "random:tiny-sdxl",
        "--steps",
        "4",
        "--seed",
        "1",
        "--format",
        "png",
    ]
    args += [
        "--upscale",
        "4",
        "--watermark",
        "imagegenx",
        "--invisible-watermark",
        "--out",
        str(tmp_path / "o"),
    ]
    args += ["--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    assert record["postprocess"] == ["upscale x4", "watermark", "invisible watermark"]
    path = tmp_path / "o" / record["file"]
    assert Image.open(path).size == (256, 256)  # 64 x 4
    assert check_watermark(path)["found"]


def test_api_upscale_and_tier(tmp_path):
    server = Server(tmp_path).start()
    try:
        with server.client(server.key(tier="paid")) as paid, server.client(server.key(tier="free")) as free:
            body = {"text": "a barn", "width": 64, "height": 64, "steps": 4, "upscale": 2, "watermark": "igx"}
            task_id = paid.post("/api/v1/image/generate", json=body).json()["data"]["task_ids"][0]
            view = wait_for(paid, task_id, timeout=300)
            assert view["status"] == "succeeded", view["error"]
            assert view["metadata"]["postprocess"] == ["upscale x2", "watermark"]
            image = Image.open(io.BytesIO(paid.get(view["urls"]["original"]).content))
            assert image.size == (128, 128)
            refused = free.post("/api/v1/image/generate", json=body | {"upscale": 4})
            assert refused.status_code == 403 and "paid" in refused.json()["message"]
    finally:
        server.stop()
