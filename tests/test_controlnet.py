"""ControlNet in the engine's loop: the same image as diffusers' ControlNet pipelines, per-job strength
in a shared batch, several ControlNets at once, loaded lazily and once."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline
from PIL import Image
from skimage import data

from conftest import make_settings
from imagegenx.engine.engine import Engine, JobFailed
from imagegenx.models.cache import ModelCache
from imagegenx.models.controlnet import RANDOM_CONTROLNET
from imagegenx.types import ControlRef, JobSpec, UserError
from test_reference import PROMPT, assert_matches, job, run_diffusers, run_runner

SD15, SDXL = "random:tiny-sd15", "random:tiny-sdxl"


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


# Real photographs as control images (a ControlNet takes any RGB image; pose and edges come later).
FACE = Image.fromarray(data.astronaut()).resize((64, 64))
CAT = Image.fromarray(data.chelsea()).resize((64, 64))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> ModelCache:
    return ModelCache(make_settings(tmp_path_factory.mktemp("controlnet")).models)


def _runner(cache: ModelCache, ref: str):
    from imagegenx.pipelines.sd import SDRunner

    model = cache.get(ref)
    runner = model.extras.get("test-runner") or SDRunner(model)
    model.extras["test-runner"] = runner
    return model, runner


@pytest.mark.parametrize(
    ("ref", "pipeline_class"),
    [(SD15, StableDiffusionControlNetPipeline), (SDXL, StableDiffusionXLControlNetPipeline)],
    ids=["sd15", "sdxl"],
)
def test_matches_diffusers_controlnet_pipeline(cache, ref, pipeline_class):
    model, runner = _runner(cache, ref)
    net = cache.controlnet(RANDOM_CONTROLNET, model)
    spec = job(ref, controls=(ControlRef(RANDOM_CONTROLNET, _png(FACE), 0.8),))
    samples = runner.prepare([spec], [net])
    while not all(s.done for s in samples):
        runner.step([s for s in samples if not s.done])
    [ours] = runner.decode(samples)
    call = {"image": FACE, "controlnet_conditioning_scale": 0.8}
    theirs = run_diffusers(model, spec, pipeline_class, call, controlnet=net)
    assert_matches(ours, theirs)
    # The control acts: without it the image differs.
    [plain] = run_runner(runner, [job(ref)])
    assert np.abs(plain - ours).max() > 0.01


def test_strength_per_job_in_one_batch_and_several_controlnets(cache):
    model, runner = _runner(cache, SD15)
    net = cache.controlnet(RANDOM_CONTROLNET, model)

    def controls(*pairs):
        return tuple(ControlRef(RANDOM_CONTROLNET, _png(image), strength) for image, strength in pairs)

    jobs = [
        job(SD15, controls=controls((FACE, 1.0))),
        job(SD15, controls=controls((FACE, 0.0)), seed=5),
        job(SD15, controls=controls((CAT, 0.5)), seed=6),
    ]
    samples = runner.prepare(jobs, [net])
    while not all(s.done for s in samples):
        runner.step([s for s in samples if not s.done])
    batched = runner.decode(samples)
    alone = [runner_image(runner, spec, [net]) for spec in jobs]
    for ours, single in zip(batched, alone, strict=True):
        assert np.abs(ours - single).max() < 1e-4  # a job's image does not depend on its neighbours
    # Strength 0 is the image without ControlNet.
    [plain] = run_runner(runner, [job(SD15, seed=5)])
    assert np.abs(batched[1] - plain).max() < 1e-4
    # Two ControlNets (the same weights twice here) at 0.5 each equal one at 1.0.
    two = job(SD15, controls=controls((FACE, 0.5), (FACE, 0.5)))
    assert np.abs(runner_image(runner, two, [net, net]) - batched[0]).max() < 1e-4


def runner_image(runner, spec: JobSpec, nets) -> np.ndarray:
    samples = runner.prepare([spec], nets)
    while not samples[0].done:
        runner.step(samples)
    return runner.decode(samples)[0]


def _spec(*controls: ControlRef, seed: int = 0, steps: int = 3) -> JobSpec:
    return JobSpec(PROMPT, SD15, width=64, height=64, steps=steps, seed=seed, controls=controls)


def test_engine_loads_a_controlnet_once_and_keeps_it(tmp_path):
    with Engine(make_settings(tmp_path)) as engine:
        control = ControlRef(RANDOM_CONTROLNET, _png(FACE), 0.7)
        first = engine.run([_spec(control, seed=s) for s in range(2)])
        second = engine.run([_spec(control, seed=9)])
        assert all(not isinstance(r, Exception) for r in first + second), first + second
        assert engine.models.loads[RANDOM_CONTROLNET] == 1 and engine.models.loads[SD15] == 1
        assert first[0].batch_size == 2  # both jobs in one batch
        [missing] = engine.run([_spec(ControlRef("openpose-sd15", _png(FACE)), steps=2)])
        assert isinstance(missing, JobFailed) and "no ControlNet 'openpose-sd15'" in str(missing)
        with pytest.raises(UserError, match="strength"):
            engine.submit(_spec(ControlRef(RANDOM_CONTROLNET, b"x", 3.0)))


def test_bad_control_image_fails_the_job_with_a_reason(tmp_path):
    with Engine(make_settings(tmp_path)) as engine:
        [result] = engine.run([_spec(ControlRef(RANDOM_CONTROLNET, b"not an image"), steps=2)])
        assert isinstance(result, JobFailed) and "control image" in str(result)


def test_random_controlnet_is_reproducible_and_leaves_the_global_generator_alone(tmp_path):
    settings = make_settings(tmp_path).models
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first = ModelCache(settings)
    a = first.controlnet(RANDOM_CONTROLNET, first.get(SD15))
    assert torch.equal(torch.random.get_rng_state(), state)
    second = ModelCache(settings)
    b = second.controlnet(RANDOM_CONTROLNET, second.get(SD15))
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_controlnet_route_and_cli(tmp_path):
    """The v1 route end to end (a ready control image), and the CLI's --control."""
    import base64
    import json

    from typer.testing import CliRunner

    from imagegenx.cli import app
    from support.server import Server, wait_for

    photo = tmp_path / "face.png"
    FACE.save(photo)
    result = CliRunner().invoke(
        app,
        ["generate", "a portrait", "-m", SD15, "--steps", "2", "--seed", "3", "--out", str(tmp_path / "o"),
         "--control", f"none,{RANDOM_CONTROLNET},{photo},0.6", "--json"],
        env={"IMAGEGENX_MODELS__MODEL_DIR": str(tmp_path)},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    assert record["controls"] == [{"model": RANDOM_CONTROLNET, "strength": 0.6}]
    bad = CliRunner().invoke(app, ["generate", "x", "-m", SD15, "--control", "pose-ish"])
    assert bad.exit_code == 2 and "TYPE,MODEL,IMAGE" in bad.output

    (tmp_path / "srv").mkdir()
    server = Server(tmp_path / "srv").start()
    try:
        with server.client(server.key()) as client:
            control = {
                "type": "none",
                "model": RANDOM_CONTROLNET,
                "image": base64.b64encode(_png(FACE)).decode(),
            }
            body = {"text": "a portrait", "width": 64, "height": 64, "steps": 2, "controls": [control]}
            response = client.post("/api/v1/image/controlnet", json=body)
            assert response.status_code == 200, response.text
            view = wait_for(client, response.json()["data"]["task_ids"][0], timeout=300)
            assert view["status"] == "succeeded", view["error"]
            assert view["metadata"]["controls"] == [{"model": RANDOM_CONTROLNET, "strength": 1.0}]
            # A photo made into a pose skeleton on the API node; a photo without a person is refused.
            photo = base64.b64encode(_png(Image.fromarray(data.astronaut()))).decode()
            as_pose = {"controls": [control | {"type": "openpose", "image": photo}]}
            pose = client.post("/api/v1/image/controlnet", json=body | as_pose)
            assert pose.status_code == 200, pose.text
            view = wait_for(client, pose.json()["data"]["task_ids"][0], timeout=300)
            assert view["status"] == "succeeded" and view["metadata"]["controls"][0]["strength"] == 0.45
            coffee = base64.b64encode(_png(Image.fromarray(data.coffee()))).decode()
            no_person = {"controls": [control | {"type": "openpose", "image": coffee}]}
            nobody = client.post("/api/v1/image/controlnet", json=body | no_person)
            assert nobody.status_code == 400 and "no person" in nobody.json()["message"]
            missing = client.post(
                "/api/v1/image/controlnet", json=body | {"controls": [control | {"model": "nope"}]}
            )
            view = wait_for(client, missing.json()["data"]["task_ids"][0], timeout=300)
            assert view["status"] == "failed" and "no ControlNet 'nope'" in view["error"]
    finally:
        server.stop()


def test_a_compiled_model_compiles_its_controlnets_and_pads_their_rows_too(tmp_path, monkeypatch):
    """With compile on, a ControlNet is compiled like the UNet it feeds, and sees the same padded
    batch bucket (3 jobs: 4 rows, the padding row at strength 0): the images match an eager run.
    torch.compile is recorded and left out, so the test checks the wiring, not Inductor's speed."""
    compiled = []

    def record(fn, *, mode, dynamic):
        compiled.append((getattr(fn, "__self__", None), mode, dynamic))
        return fn

    control = ControlRef(RANDOM_CONTROLNET, _png(FACE), 0.7)
    with Engine(make_settings(tmp_path)) as engine:
        eager = engine.run([_spec(control, seed=s) for s in range(3)])
    monkeypatch.setattr(torch, "compile", record)
    settings = make_settings(tmp_path)
    settings = settings.model_copy(
        update={"models": settings.models.model_copy(update={"compile": "default"})}
    )
    with Engine(settings) as engine:
        padded = engine.run([_spec(control, seed=s) for s in range(3)])
        net = engine.models.get(SD15).extras["controlnets"][RANDOM_CONTROLNET]
    assert (net, "default", False) in compiled
    assert {type(owner).__name__ for owner, _, _ in compiled} >= {"UNet2DConditionModel", "ControlNetModel"}
    for a, b in zip(eager, padded, strict=True):
        assert a.batch_size == b.batch_size == 3
        pixels = [np.frombuffer(r.rgb, np.uint8).astype(int) for r in (a, b)]
        assert np.abs(pixels[0] - pixels[1]).max() <= 1  # padding rows change nothing


def test_regional_compile_compiles_the_controlnets_blocks_too(tmp_path, monkeypatch):
    """With compile_regional, a ControlNet is compiled as its UNet is: its transformer blocks, each
    sharing the block's graph, not its whole forward (recorded, not run through Inductor)."""
    owners = []

    def record(fn, *, mode, dynamic):
        owners.append(getattr(fn, "__self__", None))
        return fn

    monkeypatch.setattr(torch, "compile", record)
    settings = make_settings(tmp_path)
    models = settings.models.model_copy(update={"compile": "default", "compile_regional": True})
    control = ControlRef(RANDOM_CONTROLNET, _png(FACE), 0.7)
    with Engine(settings.model_copy(update={"models": models})) as engine:
        [image] = engine.run([_spec(control, seed=1)])
        net = engine.models.get(SD15).extras["controlnets"][RANDOM_CONTROLNET]
    blocks = [m for m in net.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert blocks and all(any(block is owner for owner in owners) for block in blocks)
    # No whole forward of the UNet or the ControlNet (the VAE's decode is compiled as ever).
    assert {type(owner).__name__ for owner in owners} == {"BasicTransformerBlock", "AutoencoderKL"}
    assert not isinstance(image, Exception)
