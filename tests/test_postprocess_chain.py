"""The post-processing chain end to end: upscale, visible and invisible watermark, from CLI and API."""

import io
import json

from PIL import Image
from typer.testing import CliRunner

from imagegenx.cli import app
from imagegenx.postprocess.encode import read_parameters
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
        "--face-fix",
        "--hand-fix",
        "--qc",
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
    steps = ["detect", "qc", "face and hand fix", "upscale x4", "watermark", "invisible watermark"]
    assert record["postprocess"] == steps
    assert set(record["postprocess_seconds"]) == set(steps)
    assert record["qc"]["rank"] == 1 and record["qc"]["sharpness"] > 0
    assert record["detections"] == [] and record["fixed"] == []  # noise has no faces
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
            assert view["metadata"]["postprocess_seconds"]["upscale x2"] > 0
            image = Image.open(io.BytesIO(paid.get(view["urls"]["original"]).content))
            assert image.size == (128, 128)
            refused = free.post("/api/v1/image/generate", json=body | {"upscale": 4})
            assert refused.status_code == 403 and "paid" in refused.json()["message"]
    finally:
        server.stop()


def test_api_declared_chain_and_tier_nsfw_gate(tmp_path):
    """``postprocess`` declares the chain; the free tier's NSFW limit (0 here) withholds every image."""
    server = Server(
        tmp_path, model="random:tiny-sdxl", env={"IMAGEGENX_SERVICE__NSFW_MAX_BY_TIER": '{"free": 0}'}
    )
    server.start()
    try:
        with server.client(server.key(tier="paid")) as paid, server.client(server.key(tier="free")) as free:
            chain = {"hires_scale": 2, "qc": True, "face_fix": True, "refiner": "random:tiny-sdxl-refiner"}
            body = {"text": "a portrait", "width": 64, "height": 64, "steps": 4, "postprocess": chain}
            ok = paid.post("/api/v1/image/generate", json=body).json()["data"]["task_ids"][0]
            held = free.post("/api/v1/image/generate", json=body).json()["data"]["task_ids"][0]
            view = wait_for(paid, ok, timeout=300)
            assert view["status"] == "succeeded", view["error"]
            meta = view["metadata"]
            assert meta["postprocess"] == ["hires x2", "detect", "qc", "refine", "face fix"]
            assert meta["width"] == 128 and meta["hires"]["scale"] == 2 and meta["refine"]["steps"] == 34
            assert meta["qc"]["rank"] == 1 and "nsfw_max" not in view["params"]["postprocess"]
            view = wait_for(free, held, timeout=300)
            assert view["status"] == "failed" and "withheld" in view["error"]
            assert view["params"]["postprocess"]["nsfw_max"] == 0
            plain = {"text": "a barn", "width": 64, "height": 64, "steps": 2, "format": "png"}
            stripped = paid.post("/api/v1/image/generate", json=plain | {"embed_metadata": False})
            view = wait_for(paid, stripped.json()["data"]["task_ids"][0], timeout=300)
            assert read_parameters(paid.get(view["urls"]["original"]).content) is None
            missing = paid.post(
                "/api/v1/image/generate", json=body | {"postprocess": {"face_restore": "GFPGANv1.4"}}
            )
            assert missing.status_code == 400 and "no face restoration model" in missing.json()["message"]
            escape = paid.post(
                "/api/v1/image/generate", json=body | {"postprocess": {"face_restore": "../x"}}
            )
            assert escape.status_code == 422
            bad = paid.post("/api/v1/image/generate", json=body | {"postprocess": {"hires_scale": 9}})
            assert bad.status_code == 422
    finally:
        server.stop()


def test_cli_qc_report_ranks_and_shortlists(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGEGENX_MODELS__MODEL_DIR", str(tmp_path))
    out = tmp_path / "o"
    args = ["generate", "a fox", "-m", "random:tiny-sdxl", "--steps", "2", "-n", "3", "--seed", "4"]
    result = CliRunner().invoke(app, [*args, "--qc", "--shortlist", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "qc.json").read_text())
    assert [entry["rank"] for entry in report["images"]] == [1, 2, 3]
    assert report["shortlist"] == [entry["file"] for entry in report["images"][:2]]
    best = json.loads((out / report["shortlist"][0]).with_suffix(".json").read_text())
    assert best["qc"]["rank"] == 1 and best["qc"]["combined"] >= report["images"][1]["combined"]
