"""The OpenAI Images and AUTOMATIC1111 APIs end to end: one real `imagegenx serve`, a tiny model."""

import base64
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from imagegenx.api.a1111_schemas import a1111_sampler, parse_infotext, split_loras
from imagegenx.api.openai_schemas import openai_mask
from imagegenx.postprocess.encode import read_parameters
from imagegenx.types import SchedulerName
from support.server import Server

OPENAI_SMALL = {"size": "64x64", "steps": 4}
A1111_SMALL = {"width": 64, "height": 64, "steps": 4}


def _png(value: int = 120, alpha: np.ndarray | None = None) -> bytes:
    pixels = np.full((64, 64, 3), value, np.uint8)
    image = Image.fromarray(pixels) if alpha is None else Image.fromarray(np.dstack([pixels, alpha]), "RGBA")
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _left_half_transparent() -> np.ndarray:
    alpha = np.full((64, 64), 255, np.uint8)
    alpha[:, :32] = 0
    return alpha


def _image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("compat")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def key(server):
    return server.key()


@pytest.fixture(scope="module")
def client(server, key):
    with server.client(key) as c:
        yield c


def _task_of(url: str) -> str:
    return url.split("/api/v1/image/task/")[1].split("/")[0]


# OpenAI Images -------------------------------------------------------------------------------------


def test_openai_generation_b64_json(client):
    body = {"model": "dall-e-3", "prompt": "a red fox in snow", "response_format": "b64_json", "seed": 11}
    body |= {"quality": "hd", "style": "vivid", "user": "someone", "background": "auto", **OPENAI_SMALL}
    started = time.time()
    response = client.post("/v1/images/generations", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert started - 1 <= answer["created"] <= time.time() + 1
    assert len(answer["data"]) == 1 and set(answer["data"][0]) == {"b64_json", "revised_prompt"}
    assert answer["data"][0]["revised_prompt"] is None
    png = base64.b64decode(answer["data"][0]["b64_json"])
    assert _image(png).format == "PNG" and _image(png).size == (64, 64)
    parameters = read_parameters(png)
    assert "a red fox in snow" in parameters and "Seed: 11" in parameters


def test_openai_generation_url_needs_the_key(client, server):
    body = {"prompt": "a lighthouse", "response_format": "url", "output_format": "webp", **OPENAI_SMALL}
    response = client.post("/v1/images/generations", json=body)
    assert response.status_code == 200, response.text
    url = response.json()["data"][0]["url"]
    assert url.startswith(f"{server.url}/api/v1/image/task/") and "/download" in url
    image = client.get(url)
    assert image.status_code == 200 and image.headers["content-type"] == "image/webp"
    assert _image(image.content).size == (64, 64)
    assert httpx.get(url).status_code == 401


def test_openai_n_images_differ(client):
    body = {"prompt": "a bowl of fruit", "n": 2, "response_format": "b64_json", **OPENAI_SMALL}
    response = client.post("/v1/images/generations", json=body)
    assert response.status_code == 200, response.text
    images = [base64.b64decode(item["b64_json"]) for item in response.json()["data"]]
    assert len(images) == 2
    pixels = [np.asarray(_image(data)) for data in images]
    assert not np.array_equal(*pixels)


def test_openai_mask_becomes_white_where_transparent():
    mask = _image(openai_mask(_png(alpha=_left_half_transparent())))
    pixels = np.asarray(mask)
    assert mask.mode == "L" and (pixels[:, :32] == 255).all() and (pixels[:, 32:] == 0).all()


def test_openai_edits_with_and_without_mask(client):
    form = {"prompt": "make it blue", "response_format": "url", "steps": "4", "model": "gpt-image-1"}
    mask = _png(alpha=_left_half_transparent())
    with_mask = client.post(
        "/v1/images/edits",
        data=form,
        files=[("image", ("in.png", _png(), "image/png")), ("mask", ("mask.png", mask, "image/png"))],
    )
    assert with_mask.status_code == 200, with_mask.text
    plain = client.post(  # the openai client sends a list of images as image[]
        "/v1/images/edits", data=form | {"n": "2"}, files=[("image[]", ("in.png", _png(60), "image/png"))]
    )
    assert plain.status_code == 200, plain.text
    assert len(plain.json()["data"]) == 2
    for answer, task_type in ((with_mask, "inpaint"), (plain, "img2img")):
        for item in answer.json()["data"]:
            view = client.get(f"/api/v1/image/task/{_task_of(item['url'])}").json()["data"]
            assert view["task_type"] == task_type and (view["width"], view["height"]) == (64, 64)
            assert _image(client.get(item["url"]).content).format == "PNG"
    opaque_mask = client.post(
        "/v1/images/edits",
        data=form,
        files=[("image", ("in.png", _png(), "image/png")), ("mask", ("m.png", _png(255), "image/png"))],
    )
    assert opaque_mask.status_code == 400 and opaque_mask.json()["error"]["param"] == "mask"


def test_openai_error_shape_only_under_v1(client, server):
    bad_size = client.post("/v1/images/generations", json={"prompt": "x", "size": "huge"})
    assert bad_size.status_code == 400
    assert bad_size.json() == {
        "error": {"message": bad_size.json()["error"]["message"], "type": "invalid_request_error"}
        | {"param": "size", "code": None}
    }
    assert "huge" in bad_size.json()["error"]["message"]
    too_many = client.post("/v1/images/generations", json={"prompt": "x", "n": 11})
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "n"
    with httpx.Client(base_url=server.url) as anonymous:
        missing = anonymous.post("/v1/images/generations", json={"prompt": "x"})
        assert missing.status_code == 401
        error = missing.json()["error"]
        assert error["type"] == "invalid_request_error" and error["code"] is None and error["message"]
        wrong = anonymous.post("/v1/images/generations", json={"prompt": "x"}, headers={"X-API-Key": "nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        native = anonymous.post("/api/v1/image/generate", json={"text": "x"})
        assert native.status_code == 401 and native.json()["code"] == 401 and "error" not in native.json()
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and "random:tiny-sd15" in {m["id"] for m in models["data"]}


def test_the_openai_python_client_works_unchanged(server, key):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(api_key=key, base_url=f"{server.url}/v1", max_retries=0)
    result = client.images.generate(
        model="gpt-image-1", prompt="a small robot", size="64x64", extra_body={"steps": 4}
    )
    assert _image(base64.b64decode(result.data[0].b64_json)).size == (64, 64)  # GPT image models: b64
    edited = client.images.edit(
        image=("in.png", _png(), "image/png"),
        mask=("mask.png", _png(alpha=_left_half_transparent()), "image/png"),
        prompt="a red door",
        size="64x64",
        response_format="b64_json",
        extra_body={"steps": 4},
    )
    assert _image(base64.b64decode(edited.data[0].b64_json)).size == (64, 64)
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt="x", size="huge")
    assert bad.value.param == "size"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(api_key="wrong", base_url=f"{server.url}/v1", max_retries=0).images.generate(prompt="x")


# AUTOMATIC1111 -------------------------------------------------------------------------------------


def test_a1111_txt2img_batch_with_infotext(client):
    body = {
        "prompt": "a lighthouse at dusk",
        "negative_prompt": "fog",
        "seed": 5,
        "batch_size": 2,
        "sampler_name": "DPM++ 2M",
        "scheduler": "Karras",
        "cfg_scale": 6,
        "override_settings": {"CLIP_stop_at_last_layers": 2},
        "enable_hr": False,  # known to A1111, not here: ignored
        "no_such_field": 1,
        **A1111_SMALL,
    }
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["parameters"]["prompt"] == body["prompt"] and answer["parameters"]["no_such_field"] == 1
    info = json.loads(answer["info"])
    assert info["all_seeds"] == [5, 6] and info["seed"] == 5 and info["clip_skip"] == 2
    assert info["sampler_name"] == "DPM++ 2M Karras" and info["all_negative_prompts"] == ["fog", "fog"]
    assert len(answer["images"]) == 2 and len(info["infotexts"]) == 2
    for seed, b64, infotext in zip((5, 6), answer["images"], info["infotexts"], strict=True):
        png = base64.b64decode(b64)
        assert _image(png).format == "PNG" and _image(png).size == (64, 64)
        parameters = read_parameters(png)
        assert parameters == infotext and "a lighthouse at dusk" in parameters
        assert f"Seed: {seed}," in parameters and "Clip skip: 2" in parameters
    png_info = client.post("/sdapi/v1/png-info", json={"image": answer["images"][0]})
    assert png_info.status_code == 200, png_info.text
    assert png_info.json()["info"] == info["infotexts"][0]
    parsed = png_info.json()["parameters"]
    assert parsed["Prompt"] == "a lighthouse at dusk" and parsed["Negative prompt"] == "fog"
    assert parsed["Seed"] == "5" and parsed["Size-1"] == "64" and parsed["Sampler"] == "DPM++ 2M Karras"


def test_a1111_img2img_and_inpaint(client):
    init = base64.b64encode(_png(90)).decode()
    body = {"prompt": "a stone wall", "init_images": [init], "denoising_strength": 0.5, **A1111_SMALL}
    plain = client.post("/sdapi/v1/img2img", json=body)
    assert plain.status_code == 200, plain.text
    assert json.loads(plain.json()["info"])["denoising_strength"] == 0.5
    assert plain.json()["parameters"]["init_images"] is None  # include_init_images is false
    mask = "data:image/png;base64," + base64.b64encode(_png(255)).decode()
    inpaint = client.post("/sdapi/v1/img2img", json=body | {"mask": mask, "batch_size": 1})
    assert inpaint.status_code == 200, inpaint.text
    assert len(inpaint.json()["images"]) == 1
    assert _image(base64.b64decode(inpaint.json()["images"][0])).size == (64, 64)
    history = client.get("/api/v1/image/tasks", params={"page_size": 2}).json()["data"]["items"]
    assert [t["task_type"] for t in history] == ["inpaint", "img2img"]
    no_image = client.post("/sdapi/v1/img2img", json={"prompt": "x", **A1111_SMALL})
    assert no_image.status_code == 422 and no_image.json()["error"] == "RequestValidationError"


def test_a1111_listings(client):
    models = client.get("/sdapi/v1/sd-models").json()
    tiny = next(m for m in models if m["title"] == "random:tiny-sd15")
    assert tiny["model_name"] == "random:tiny-sd15" and tiny["hash"] is None and tiny["filename"]
    samplers = {s["name"]: s for s in client.get("/sdapi/v1/samplers").json()}
    assert {"Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "UniPC"} <= set(samplers)
    assert set(samplers["Euler a"]) == {"name", "aliases", "options"}
    assert {"automatic", "karras"} <= {s["name"] for s in client.get("/sdapi/v1/schedulers").json()}
    assert [u["name"] for u in client.get("/sdapi/v1/upscalers").json()] == ["None", "Lanczos"]
    assert len(client.get("/sdapi/v1/prompt-styles").json()) >= 20


def test_a1111_options(client):
    options = client.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == "random:tiny-sd15" and options["CLIP_stop_at_last_layers"] == 1
    unknown = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "no-such-model"})
    assert unknown.status_code == 422 and set(unknown.json()) == {"error", "detail", "body", "errors"}
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "random:tiny-sd15"
    change = {"sd_model_checkpoint": "random:tiny-sdxl", "CLIP_stop_at_last_layers": 2}
    try:
        assert client.post("/sdapi/v1/options", json=change | {"samples_format": "jpg"}).status_code == 200
        assert client.get("/sdapi/v1/options").json().items() >= change.items()
        assert "random:tiny-sdxl" in {m["title"] for m in client.get("/sdapi/v1/sd-models").json()}
    finally:
        restore = {"sd_model_checkpoint": "random:tiny-sd15", "CLIP_stop_at_last_layers": 1}
        assert client.post("/sdapi/v1/options", json=restore).status_code == 200


def test_a1111_progress_and_interrupt(server):
    with server.client(server.key()) as client:  # a key of its own: progress is per key
        idle = client.get("/sdapi/v1/progress").json()
        assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["current_image"] is None
        answer = {}
        body = {"prompt": "a slow one", "batch_size": 3, "width": 64, "height": 64, "steps": 150}
        worker = threading.Thread(target=lambda: answer.update(r=client.post("/sdapi/v1/txt2img", json=body)))
        worker.start()
        deadline = time.monotonic() + 30
        while (busy := client.get("/sdapi/v1/progress").json())["state"]["job_count"] == 0:
            assert time.monotonic() < deadline, "the request never showed in progress"
            time.sleep(0.02)
        assert busy["state"]["job_count"] == 3 and 0 <= busy["progress"] < 1 and busy["eta_relative"] >= 0
        assert client.post("/sdapi/v1/interrupt").json() == {}
        worker.join(60)
        assert answer["r"].status_code == 200, answer["r"].text
        assert len(answer["r"].json()["images"]) < 3
        assert client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0
    with httpx.Client(base_url=server.url) as anonymous:
        missing = anonymous.post("/sdapi/v1/txt2img", json={"prompt": "x"})
        assert missing.status_code == 401 and missing.json()["error"] == "Unauthorized"


# Pure helpers ----------------------------------------------------------------------------------------


def test_a1111_sampler_names_and_schedulers():
    assert a1111_sampler("DPM++ 2M", None) is SchedulerName.DPMPP_2M_KARRAS  # A1111 1.9's default
    assert a1111_sampler("DPM++ 2M", "Uniform") is SchedulerName.DPMPP_2M
    assert a1111_sampler("DPM++ 2M Karras", "automatic") is SchedulerName.DPMPP_2M_KARRAS
    assert a1111_sampler("Euler a", "karras") is SchedulerName.EULER_A


def test_lora_tags_and_infotext_parsing():
    assert split_loras("a cat, <lora:film:0.8>, <lora:grain>") == (
        "a cat",
        [{"name": "film", "weight": 0.8}, {"name": "grain", "weight": 1.0}],
    )
    text = 'a cat\nin a hat\nNegative prompt: dog\nSteps: 4, Sampler: Euler a, Size: 64x32, Model: "a, b"'
    assert parse_infotext(text) == {
        "Prompt": "a cat\nin a hat",
        "Negative prompt": "dog",
        "Steps": "4",
        "Sampler": "Euler a",
        "Size-1": "64",
        "Size-2": "32",
        "Model": "a, b",
        "Clip skip": "1",
    }
