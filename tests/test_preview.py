"""Step previews: latents projected to RGB by the family's fixed matrix, a few times per job, in
the engine's progress events (the web page's queue shows them). They are started at a due step and
ride a later event of the job, once the device has finished them (PendingPreviews)."""

import io
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

import imagegenx.engine.batch_runner as batch_runner_module
from conftest import make_settings
from imagegenx.engine.engine import Engine
from imagegenx.pipelines.preview import RGB_FACTORS, PendingPreviews, latent_preview, preview_due
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
    # due at steps 2, 4, ..., 14; on the CPU each is ready for the job's next event
    assert [e.step for e in previews] == [3, 5, 7, 9, 11, 13, 15]
    assert Image.open(io.BytesIO(previews[-1].preview)).size == (8, 8)  # the 64² image's latents


def test_pending_previews_give_the_same_jpeg_once():
    latents = torch.randn(1, 4, 24, 16)
    previews = PendingPreviews()
    previews.start("a", latents, "sdxl")
    previews.start("flux", torch.randn(1, 16, 8, 8), "flux")  # no factors: nothing pending
    previews.start("b", latents * 2, "sd15")
    previews.drop("b")
    assert len(previews) == 1
    assert previews.ready() == {"a": latent_preview(latents, "sdxl")}
    assert previews.ready() == {} and len(previews) == 0


class _Recording(PendingPreviews):
    """The engine's PendingPreviews, noting the job's last step and a copy of the latents at each
    start (the events list is appended on the engine thread, before the start)."""

    instances: ClassVar[list["_Recording"]] = []
    events: ClassVar[list] = []

    def __init__(self) -> None:
        super().__init__()
        self.started: list[tuple[int, torch.Tensor]] = []
        type(self).instances.append(self)

    def start(self, job_id, latents, family, decoder=None):
        self.started.append((self.events[-1].step, latents.clone()))
        super().start(job_id, latents, family, decoder)


class _Busy(_Recording):
    """A device that never catches up: every preview is still on its way when the job ends."""

    def ready(self):
        return {}


class _Broken(_Recording):
    def start(self, job_id, latents, family, decoder=None):
        raise RuntimeError("projection failed")


def _run_job(tmp_path, monkeypatch, previews_class, steps):
    events = []
    previews_class.instances, previews_class.events = [], events
    monkeypatch.setattr(batch_runner_module, "PendingPreviews", previews_class)
    with Engine(make_settings(tmp_path)) as engine:
        engine.subscribe(events.append)
        job = JobSpec("a fox", "random:tiny-sdxl", width=64, height=64, steps=steps, seed=3, job_id="j")
        result = engine.submit(job).result(timeout=120)
    assert result.width == 64 and events[-1].status is JobStatus.SUCCEEDED
    (previews,) = previews_class.instances
    return [e for e in events if e.preview], previews


def test_a_later_event_carries_the_jpeg_of_the_started_latents(tmp_path, monkeypatch):
    with_preview, previews = _run_job(tmp_path, monkeypatch, _Recording, steps=24)
    assert 0 < len(with_preview) <= 8
    assert len(with_preview) == len(previews.started)  # the CPU is always done by the next step
    for event, (step, latents) in zip(with_preview, previews.started, strict=True):
        assert event.status is JobStatus.RUNNING and event.step == step + 1
        assert event.preview == latent_preview(latents, "sdxl")  # the same projection, the same bytes
        assert Image.open(io.BytesIO(event.preview)).size == (8, 8)
    assert len(previews) == 0


def test_a_preview_pending_when_its_job_ends_is_dropped(tmp_path, monkeypatch):
    with_preview, previews = _run_job(tmp_path, monkeypatch, _Busy, steps=8)
    assert not with_preview and previews.started  # started, never ready: the image came instead
    assert len(previews) == 0  # nothing left behind


def test_a_failed_preview_costs_only_the_preview(tmp_path, monkeypatch):
    with_preview, previews = _run_job(tmp_path, monkeypatch, _Broken, steps=8)
    assert not with_preview and len(previews) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: pinned memory and events")
def test_cuda_previews_wait_for_the_device_without_blocking_the_host():
    latents = torch.randn(1, 4, 128, 128, device="cuda", dtype=torch.float16)
    expected = latent_preview(latents, "sdxl")
    previews = PendingPreviews()
    previews.start("warm", latents, "sdxl")  # first pinned allocation and factors upload: may wait
    torch.cuda.synchronize()
    assert previews.ready() == {"warm": expected}  # the same bytes as the blocking projection
    torch.cuda._sleep(2_000_000_000)  # keep the GPU busy for a while (about a second)
    previews.start("j", latents, "sdxl")
    copy = previews._pending["j"]
    assert copy._host.device.type == "cpu" and copy._host.is_pinned() and not copy.done()
    assert previews.ready() == {}  # the copy waits behind the sleep; the host did not
    torch.cuda.synchronize()
    assert previews.ready() == {"j": expected} and len(previews) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: pinned memory and events")
def test_cuda_decoded_images_come_to_the_host_without_blocking_it():
    from imagegenx.pipelines.hostcopy import HostCopy, PendingImages

    images = torch.randint(0, 255, (2, 64, 64, 3), device="cuda", dtype=torch.uint8)
    finite = torch.tensor([True, False], device="cuda")
    torch.cuda._sleep(2_000_000_000)  # the device busy for a while: the copies queue behind it
    pending = PendingImages(HostCopy(images), HostCopy(finite))
    assert not pending.images.done()  # queued, and the host went on
    first, second = pending.result()  # waits for the copies
    assert np.array_equal(first, images[0].cpu().numpy()) and second is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: pinned memory and events")
def test_cuda_noise_goes_to_the_device_without_waiting_for_it():
    from diffusers.utils.torch_utils import randn_tensor

    from imagegenx.pipelines.hostcopy import to_device

    generators = [torch.Generator("cpu").manual_seed(seed) for seed in (1, 2)]
    expected = randn_tensor(
        (2, 4, 8, 8), generator=generators, device=torch.device("cuda")
    )  # diffusers' copy
    host = randn_tensor((2, 4, 8, 8), generator=[torch.Generator("cpu").manual_seed(s) for s in (1, 2)])
    done = torch.cuda.Event()
    torch.cuda._sleep(2_000_000_000)  # the device busy for a while
    noise = to_device(host, torch.device("cuda"))
    done.record()
    assert not done.query()  # the host went on while the copy waits behind the sleep
    torch.cuda.synchronize()
    assert torch.equal(noise, expected)


def test_noise_on_the_cpu_is_the_tensor_drawn():
    from imagegenx.pipelines.hostcopy import to_device

    host = torch.randn(2, 3)
    assert torch.equal(to_device(host, torch.device("cpu")), host)
