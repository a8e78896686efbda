"""Tiny latent decoders (models/tiny_decoder.py): loaded beside the model from random weights or a
user's folder, chosen per image, and decoded in the same batch as full-VAE images without mixing up
whose image is whose."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from importlib import resources

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny

from conftest import make_settings
from imagegenx.config import Settings
from imagegenx.engine.engine import Engine, JobFailed
from imagegenx.engine.service import job_from_params
from imagegenx.engine.validation import validate_job
from imagegenx.models import tiny_decoder
from imagegenx.models.loader import load_model
from imagegenx.models.sources import resolve
from imagegenx.pipelines.sd import SDRunner
from imagegenx.types import JobSpec, SchedulerName, UserError

MODEL = "random:tiny-sd21"


def tiny_settings(tmp_path, decoders: dict[str, str] | None = None, **models) -> Settings:
    base = make_settings(tmp_path)
    update = {"tiny_decoders": {"sd21": "random"} if decoders is None else decoders, **models}
    return base.model_copy(update={"models": base.models.model_copy(update=update)})


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> SDRunner:
    settings = tiny_settings(tmp_path_factory.mktemp("tiny"))
    return SDRunner(load_model(resolve(MODEL, settings.models), settings.models))


def job(seed: int, decoder: str = "full", model: str = MODEL) -> JobSpec:
    return JobSpec(
        "a lighthouse", model, width=64, height=64, steps=2, guidance_scale=1.0, seed=seed, decoder=decoder
    )


def test_the_tiny_decoder_decodes_the_same_latents_to_the_full_size(runner):
    full, tiny = runner.prepare([job(1), job(1, "tiny")])
    tiny.latents = full.latents.clone()
    full_image, tiny_image = runner.decode([full, tiny])
    assert full_image.shape == tiny_image.shape == (64, 64, 3)
    # It is the tiny decoder's output (its scaling factor is 1: TAESD takes the scaled latents)...
    decoder = runner.model.tiny_decoder
    assert isinstance(decoder, AutoencoderTiny) and decoder.config.scaling_factor == 1.0
    with torch.no_grad():
        direct = (decoder.decode(full.latents, return_dict=False)[0] / 2 + 0.5).clamp(0, 1)
    assert np.allclose(tiny_image, direct[0].permute(1, 2, 0).numpy(), atol=1e-6)
    # ... not the VAE's: another network, another image.
    assert np.abs(full_image - tiny_image).mean() > 0.01


def test_a_batch_mixing_decoders_gives_each_image_its_own_decode(runner):
    decoders = ["full", "tiny", "full", "tiny", "tiny"]
    samples = runner.prepare([job(seed, name) for seed, name in enumerate(decoders)])
    mixed = runner.decode(samples)
    for sample, image in zip(samples, mixed, strict=True):
        (alone,) = runner.decode([sample])
        assert np.allclose(image, alone, atol=1e-5), sample.job.decoder


def test_a_model_without_a_tiny_decoder_refuses_tiny_jobs_and_takes_full_ones(tmp_path):
    settings = tiny_settings(tmp_path, {"sdxl": "random"})  # none for SD 2.x
    with Engine(settings) as engine:
        with pytest.raises(JobFailed, match="has no tiny decoder"):
            engine.submit(job(1, "tiny")).result(timeout=120)
        assert engine.submit(job(1)).result(timeout=120).width == 64


def test_the_engine_runs_tiny_and_full_jobs_side_by_side(tmp_path):
    with Engine(tiny_settings(tmp_path)) as engine:
        futures = [engine.submit(job(7, name)) for name in ("full", "tiny", "full")]
        full, tiny, full_again = [f.result(timeout=120) for f in futures]
    assert full.job.decoder == "full" and tiny.job.decoder == "tiny"
    assert full.rgb == full_again.rgb  # same seed, same decoder
    assert full.rgb != tiny.rgb


def test_sd15s_tiny_decoder_serves_sd2_and_a_folder_is_read_not_random(tmp_path):
    saved = AutoencoderTiny(**tiny_decoder._random_config(8, 4))  # torch's default init: not seed 0's
    saved.save_pretrained(tmp_path / "taesd", safe_serialization=True)
    settings = tiny_settings(tmp_path, {"sd15": str(tmp_path / "taesd")})
    model = load_model(resolve("random:sd21", settings.models), settings.models)
    assert model.family == "sd21"  # found under sd15: the same latents
    loaded = model.tiny_decoder.state_dict()
    for name, tensor in saved.state_dict().items():
        assert torch.equal(loaded[name], tensor), name


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda path: path.mkdir(), "not a diffusers AutoencoderTiny folder"),
        # A config without safetensors weights (pickle files are never read).
        (
            lambda path: AutoencoderTiny(**tiny_decoder._random_config(8, 4, 16)).save_pretrained(
                path, safe_serialization=False
            ),
            "cannot read",
        ),
        # Full-size TAESD (1/8) for a tiny test model whose VAE downscales by 8 too but with
        # 16-channel latents: the wrong family's decoder.
        (
            lambda path: AutoencoderTiny(**tiny_decoder._random_config(8, 16)).save_pretrained(path),
            "16-channel latents",
        ),
    ],
)
def test_a_wrong_tiny_decoder_is_a_clear_error(tmp_path, make, words):
    make(tmp_path / "decoder")
    settings = tiny_settings(tmp_path, {"sd21": str(tmp_path / "decoder")})
    with pytest.raises(UserError, match=words):
        load_model(resolve(MODEL, settings.models), settings.models)


@pytest.mark.parametrize(("model", "family"), [("random:tiny-flux", "flux"), ("random:tiny-sd3", "sd3")])
def test_flux_and_sd3_decode_their_16_channel_latents_tiny_beside_full(tmp_path, model, family):
    """Their pipelines stop at the latents when a job asks for the tiny decoder; a full-decoded job of
    the same batch then matches diffusers' own decode of the same job."""
    settings = tiny_settings(tmp_path, {family: "random"})

    def flow_job(seed: int, decoder: str = "full") -> JobSpec:
        return JobSpec("a lighthouse", model, width=64, height=64, steps=2, guidance_scale=3.5,
                       scheduler=SchedulerName.EULER, seed=seed, decoder=decoder)  # fmt: skip

    with Engine(settings) as engine:
        assert engine.models.get(model).tiny_decoder.config.latent_channels == 16
        alone = engine.run([flow_job(1)])[0]  # diffusers decodes (no tiny job in the batch)
        mixed = engine.run([flow_job(1), flow_job(1, "tiny")])
    full, tiny = (np.frombuffer(image.rgb, np.uint8).astype(int) for image in mixed)
    assert np.abs(full - np.frombuffer(alone.rgb, np.uint8).astype(int)).max() <= 2
    assert np.abs(full - tiny).mean() > 2  # another decoder, another image
    assert mixed[1].job.decoder == "tiny" and mixed[1].width == 64


def test_with_compile_on_the_tiny_decoder_is_compiled_and_split_into_buckets(tmp_path, monkeypatch):
    """torch.compile is recorded and left out: the wiring is checked, not Inductor."""
    compiled, rows = [], []

    def record(fn, mode=None, dynamic=None, **_):
        owner = getattr(fn, "__self__", None)
        compiled.append((owner, mode, dynamic))

        def counted(first, *args, **kwargs):
            rows.append((type(owner).__name__, first.shape[0]))
            return fn(first, *args, **kwargs)

        return counted

    monkeypatch.setattr(torch, "compile", record)
    settings = tiny_settings(tmp_path, compile="default")
    model = load_model(resolve(MODEL, settings.models), settings.models)
    assert (model.tiny_decoder, "default", False) in compiled
    runner = SDRunner(model)
    images = runner.decode(runner.prepare([job(seed, "tiny") for seed in range(3)]))
    assert len(images) == 3 and all(image.shape == (64, 64, 3) for image in images)
    # 3 rows run as 2 + 1 (padding to 4 would waste a third: decode_chunks), both warmed shapes
    assert [n for name, n in rows if name == "AutoencoderTiny"] == [2, 1]


@pytest.mark.parametrize(("arch", "side", "full_tflop"), [("sd21", 512, 2.51), ("sdxl", 1024, 10.47)])
def test_at_full_size_the_random_tiny_decoder_is_taesds_architecture_and_a_18th_of_the_work(
    arch, side, full_tflop
):
    """Counted on the meta device (no memory, no time): the full VAE decode against TAESD's."""
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    config = json.loads(
        (resources.files("imagegenx.models") / "archs" / arch / "vae" / "config.json").read_text()
    )
    tflop = {}
    with torch.device("meta"):
        full = AutoencoderKL.from_config(config)
        tiny = AutoencoderTiny(**tiny_decoder._random_config(8, 4, max(config["block_out_channels"])))
        latents = torch.empty(1, 4, side // 8, side // 8)
        for name, vae in (("full", full), ("tiny", tiny)):
            with FlopCounterMode(display=False) as counter:
                vae.decode(latents)
            tflop[name] = counter.get_total_flops() / 1e12
    assert sum(p.numel() for p in tiny.decoder.parameters()) == 1_222_531  # TAESD's decoder
    assert tflop["full"] == pytest.approx(full_tflop, rel=0.01)
    assert tflop["full"] / tflop["tiny"] > 17


def test_requests_name_the_decoder():
    params = {"prompt": "x", "model": MODEL, "width": 64, "height": 64, "decoder": "tiny"}
    assert job_from_params("t", params, None, None).decoder == "tiny"
    assert job_from_params("t", params | {"decoder": "full"}, None, None).decoder == "full"
    with pytest.raises(UserError, match="decoder 'vae' is not one of full, tiny"):
        validate_job(job_from_params("t", params | {"decoder": "vae"}, None, None), Settings().engine)


def test_portrait_drafts_decoded_tiny_and_the_refined_ones_made_again(tmp_path):
    from PIL import Image
    from skimage import data

    from imagegenx.engine.portrait import PortraitSpec, run_portrait

    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buffer, "PNG")
    spec = PortraitSpec(
        "a portrait photo of a woman", n=3, model="random:tiny-sdxl", seed=3, shortlist=2, refine_top=1,
        refiner_steps=2, upscale=1, draft_decoder="tiny",
    )  # fmt: skip
    with Engine(tiny_settings(tmp_path, {"sdxl": "random"})) as engine:
        result = run_portrait(engine, [("astronaut.png", buffer.getvalue())], spec)
    refined, kept = result.finals
    assert result.report["draft_decoder"] == "tiny"
    assert kept.job.decoder == "tiny"  # a shortlisted draft beyond refine_top, as drafted
    assert refined.job.decoder == "full" and "refine" in refined.post  # made again at low strength
    with pytest.raises(UserError, match="draft decoder"):
        PortraitSpec("x", draft_decoder="vae")


def test_quality_passes_decode_with_the_full_vae():
    """Hires, refine and fix passes make the image again for quality: whatever the first pass used."""
    from PIL import Image

    from imagegenx.postprocess.hires import img2img_job

    image = Image.new("RGB", (64, 64))
    again = img2img_job(job(1, "tiny"), image, suffix="refine", strength=0.3, steps_run=2)
    assert again.decoder == "full" and again.init_image
    assert img2img_job(job(1), image, suffix="x", strength=0.3, steps_run=2, decoder="tiny").decoder == "tiny"


def test_previews_from_the_tiny_decoder_are_the_picture_at_preview_size(tmp_path):
    from PIL import Image

    from imagegenx.pipelines.preview import PendingPreviews

    settings = tiny_settings(tmp_path)
    settings = settings.model_copy(
        update={"engine": settings.engine.model_copy(update={"preview_decoder": "tiny"})}
    )
    events = []
    with Engine(settings) as engine:
        engine.subscribe(lambda e: events.append(e) if e.preview else None)
        engine.submit(replace(job(1), steps=8, job_id="j")).result(timeout=120)
        decoder = engine.models.get(MODEL).tiny_decoder
    previews = [Image.open(io.BytesIO(e.preview)) for e in events]
    assert previews and all(p.size == (64, 64) for p in previews)  # decoded pixels, not 8x8 latents
    # Larger images shrink to at most 128 pixels a side, on the device, from the decoder's picture.
    latents = torch.randn(1, 4, 32, 24)
    pending = PendingPreviews()
    pending.start("big", latents, "sd21", decoder)
    big = Image.open(io.BytesIO(pending.ready()["big"])).convert("RGB")
    assert big.size == (96, 128)
    with torch.no_grad():
        full = (decoder.decode(latents, return_dict=False)[0] / 2 + 0.5).clamp(0, 1)
    small = torch.nn.functional.interpolate(full, size=(128, 96), mode="area")[0].permute(1, 2, 0) * 255
    assert np.abs(np.asarray(big, float) - small.numpy()).mean() < 6  # JPEG at quality 75
