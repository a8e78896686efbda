"""InstantID in the engine's loop: identity attention equals diffusers' IP-Adapter path, IdentityNet
reads the identity tokens, and switching identity off gives the base model back untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from conftest import make_settings
from imagegenx.engine.engine import Engine, JobFailed
from imagegenx.models.cache import ModelCache
from imagegenx.models.controlnet import RANDOM_CONTROLNET
from imagegenx.models.instantid import ARCFACE_DIM, RANDOM_FACEID, RANDOM_INSTANTID
from imagegenx.pipelines.sd import SDRunner
from imagegenx.types import ControlRef, IdentityRef, JobSpec
from test_controlnet import FACE, _png, runner_image
from test_reference import PROMPT, assert_matches, job, run_diffusers

SD15 = "random:tiny-sd15"
FACE_EMBEDDING = tuple(float(v) for v in np.random.default_rng(7).normal(size=ARCFACE_DIM))


@pytest.mark.parametrize("adapter_ref", [RANDOM_INSTANTID, RANDOM_FACEID], ids=["instantid", "faceid"])
def test_identity_attention_matches_diffusers_ip_adapter_path(tmp_path, adapter_ref):
    cache = ModelCache(make_settings(tmp_path).models)
    model = cache.get(SD15)
    runner = SDRunner(model)
    plain_before = runner_image(runner, job(SD15), [])
    adapter = cache.identity_adapter(adapter_ref, model)
    assert adapter.embedding_dim == ARCFACE_DIM
    runner.set_identity(adapter, 0.9)
    spec = job(SD15, identity=IdentityRef(adapter_ref, FACE_EMBEDDING, 0.9))
    ours = runner_image(runner, spec, [])
    face = torch.tensor([FACE_EMBEDDING])
    embeds = torch.cat([torch.zeros_like(face), face])[:, None, None, :]  # negative, then the face
    theirs = run_diffusers(model, spec, StableDiffusionPipeline, {"ip_adapter_image_embeds": [embeds]})
    assert_matches(ours, theirs)
    assert np.abs(ours - plain_before).max() > 0.01  # the identity acts
    # Off again: the base model is exactly as before the adapter was loaded.
    runner.set_identity(None, None)
    assert model.pipe.unet.encoder_hid_proj is None
    assert np.array_equal(runner_image(runner, job(SD15), []), plain_before)


def test_instantid_with_identitynet_through_the_engine(tmp_path):
    identity = IdentityRef(RANDOM_INSTANTID, FACE_EMBEDDING, 1.0, identitynet=RANDOM_CONTROLNET)
    keypoints = (ControlRef(RANDOM_CONTROLNET, _png(FACE), 0.8),)

    def spec(seed: int, **changes) -> JobSpec:
        base = {
            "width": 64,
            "height": 64,
            "steps": 3,
            "seed": seed,
            "identity": identity,
            "controls": keypoints,
        }
        return JobSpec(PROMPT, SD15, **(base | changes))

    with Engine(make_settings(tmp_path)) as engine:
        results = engine.run([spec(1), spec(2), spec(3, identity=None, controls=())])
        assert all(not isinstance(r, Exception) for r in results), results
        assert results[0].batch_size == 2  # the two identity jobs shared a batch; the plain one did not
        assert engine.models.loads[RANDOM_INSTANTID] == 1
        short = IdentityRef(RANDOM_INSTANTID, (0.1,) * 128, 1.0)
        [failed] = engine.run([spec(4, identity=short, controls=())])
        assert isinstance(failed, JobFailed) and "512" in str(failed)
        [missing] = engine.run([spec(5, identity=IdentityRef("instantid-sdxl", FACE_EMBEDDING), controls=())])
        assert isinstance(missing, JobFailed) and "no InstantID adapter" in str(missing)
