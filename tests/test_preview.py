"""Step previews: latents projected to RGB by the family's fixed matrix, a few times per job, in
the engine's progress events (the web page's queue shows them)."""

import io

import pytest
import torch
from PIL import Image

from conftest import make_settings
from imagegenx.engine.engine import Engine
from imagegenx.pipelines.preview import RGB_FACTORS, latent_preview, preview_due
from imagegenx.types import JobSpec, JobStatus


def test_projection_uses_the_family_factors():
    latents = torch.zeros(1, 4, 16, 24)
    latents[0, 0] = 1.0  # only the first channel: the pixel is (factors[0] + 1) / 2
    for family in ("sd15", "sdxl"):
        image = Image.open(io.BytesIO(latent_preview(latents, family)))
        assert image.size == (24, 16) and image.format == "JPEG"
        expected = [round((f + 1) / 2 * 255) for f in RGB_FACTORS[family][0]]
        got = image.convert("RGB").getpixel((12, 8))
        assert all(abs(a - b) <= 6 for a, b in zip(got, expected, strict=True)), (family, got, expected)
    big = latent_preview(torch.randn(1, 4, 256, 192), "sdxl")
    assert Image.open(io.BytesIO(big)).size == (96, 128)  # at most 128 px a side
    assert latent_preview(torch.zeros(1, 16, 8, 8), "flux") is None  # no factors: no preview


@pytest.mark.parametrize("total", [1, 4, 8, 30, 150])
def test_about_eight_previews_never_at_the_ends(total):
    due = [step for step in range(total + 1) if preview_due(step, total)]
    assert 0 not in due and total not in due
    assert len(due) <= 8 and (total < 2 or due)


@pytest.mark.parametrize("enabled", [True, False])
def test_progress_events_carry_previews_when_enabled(tmp_path, enabled):
    events = []
    with Engine(make_settings(tmp_path, step_previews=enabled)) as engine:
        engine.subscribe(lambda e: events.append(e) if e.status is JobStatus.RUNNING else None)
        job = JobSpec("a fox", "random:tiny-sdxl", width=64, height=64, steps=16, seed=1, job_id="j")
        engine.submit(job).result(timeout=120)
    previews = [e for e in events if e.preview]
    if not enabled:
        assert not previews
        return
    assert [e.step for e in previews] == [2, 4, 6, 8, 10, 12, 14]
    assert Image.open(io.BytesIO(previews[-1].preview)).size == (8, 8)  # the 64² image's latents
