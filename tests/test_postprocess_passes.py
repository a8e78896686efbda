"""The chain's denoising passes through a real engine on tiny models: hires fix, refiner on the
top-k, ADetailer-style face fix on a real photograph; and QC scores in the metadata."""

import numpy as np
import pytest
from PIL import Image
from skimage import data

from imagegenx.engine.engine import Engine
from imagegenx.postprocess.chain import PostprocessSpec, apply_chain
from imagegenx.postprocess.encode import image_metadata, to_pil
from imagegenx.types import GeneratedImage, JobSpec, SchedulerName, UserError


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from conftest import make_settings

    with Engine(make_settings(tmp_path_factory.mktemp("engine"))) as engine:
        yield engine


def _job(seed: int, size: int = 64, **changes) -> JobSpec:
    values = dict(prompt="a portrait", model="random:tiny-sdxl", width=size, height=size, steps=4, seed=seed)
    return JobSpec(**(values | changes), job_id=f"t{seed}-{size}")


def _generated(engine: Engine, seeds) -> list[GeneratedImage]:
    results = engine.run([_job(seed) for seed in seeds])
    assert all(isinstance(r, GeneratedImage) for r in results), results
    return results


def _photo(pixels: np.ndarray, seed: int = 0) -> GeneratedImage:
    """A real photograph in the place of a generated image (faces are what the fix needs)."""
    height, width = pixels.shape[:2]
    job = _job(seed, width, steps=4, scheduler=SchedulerName.EULER)
    return GeneratedImage(job, width, height, pixels.tobytes(), "random:tiny-sdxl", 1)


def test_hires_fix_renders_larger_and_records_the_pass(engine):
    [first] = _generated(engine, [3])
    [out] = apply_chain([first], PostprocessSpec(hires_scale=2, hires_strength=0.5), engine)
    assert (out.width, out.height) == (128, 128)
    assert out.job == first.job  # the metadata keeps describing the request
    assert out.post["hires"]["steps"] == 4  # ceil(round(4 * 0.5) / 0.5): the same schedule, its last half
    # Denoised, not just resized: differs from a Lanczos upscale of the first pass.
    lanczos = np.asarray(to_pil(first).resize((128, 128), Image.Resampling.LANCZOS), dtype=float)
    assert np.abs(np.asarray(to_pil(out), dtype=float) - lanczos).mean() > 5
    meta = image_metadata(out)
    assert meta["postprocess"] == ["hires x2"] and meta["postprocess_seconds"]["hires x2"] > 0


def test_refiner_runs_only_on_the_top_k_by_qc(engine):
    drafts = _generated(engine, [10, 11, 12, 13])
    spec = PostprocessSpec(qc=True, refiner="random:tiny-sdxl-refiner", refiner_steps=2, refine_top_k=2)
    out = apply_chain(drafts, spec, engine)
    ranks = [image.post["qc"]["rank"] for image in out]
    assert sorted(ranks) == [1, 2, 3, 4]
    for before, after in zip(drafts, out, strict=True):
        qc = after.post["qc"]
        assert qc["sharpness"] > 0 and 0 <= qc["nsfw"] <= 1
        if qc["rank"] <= 2:
            assert after.post["refine"]["model"] == "random:tiny-sdxl-refiner"
            assert after.post["refine"]["batch_size"] == 2  # both refined in one batch
            assert after.rgb != before.rgb
        else:
            assert "refine" not in after.post and after.rgb == before.rgb
    # The rank follows the combined score.
    combined = sorted(out, key=lambda image: image.post["qc"]["rank"])
    assert [i.post["qc"]["combined"] for i in combined] == sorted(
        (i.post["qc"]["combined"] for i in out), reverse=True
    )


def test_refine_top_k_needs_qc():
    with pytest.raises(UserError, match="qc"):
        PostprocessSpec(refiner="random:tiny-sdxl-refiner", refine_top_k=2)


def test_face_fix_regenerates_the_faces_of_a_batch_in_one_batch(engine):
    photo = data.astronaut()
    images = [_photo(photo, 0), _photo(np.ascontiguousarray(photo[:, ::-1]), 1)]
    out = apply_chain(images, PostprocessSpec(face_fix=True, fix_strength=0.5), engine)
    for before, after in zip(images, out, strict=True):
        faces = [d for d in after.post["detections"] if d["kind"] == "face"]
        assert len(faces) == 1
        [fixed] = after.post["fixed"]
        assert fixed["kind"] == "face" and fixed["batch_size"] == 2  # both crops in one UNet batch
        left, top, right, bottom = fixed["box"]
        old = np.asarray(to_pil(before), dtype=float)
        new = np.asarray(to_pil(after), dtype=float)
        # Inside the face box the pixels are regenerated (random weights: very different) ...
        assert np.abs(new[top:bottom, left:right] - old[top:bottom, left:right]).mean() > 20
        # ... outside the box plus the feather not one pixel changes.
        margin = 16
        keep = np.ones(old.shape[:2], bool)
        keep[max(0, top - margin) : bottom + margin, max(0, left - margin) : right + margin] = False
        assert np.array_equal(new[keep], old[keep])
    assert out[0].post["steps"][0]["name"] == "detect"


def test_face_fix_without_faces_changes_nothing(engine):
    [noise] = _generated(engine, [5])
    [out] = apply_chain([noise], PostprocessSpec(face_fix=True, hand_fix=True), engine)
    assert out.post["detections"] == [] and out.post["fixed"] == []
    assert out.rgb == noise.rgb
    assert [s["name"] for s in out.post["steps"]] == ["detect", "face and hand fix"]


def test_qc_with_a_reference_scores_identity_and_ssim():
    photo = data.astronaut()
    images = [_photo(photo, 0), _photo(np.asarray(Image.fromarray(photo).resize((512, 512)).rotate(180)), 1)]
    out = apply_chain(images, PostprocessSpec(qc=True), reference=Image.fromarray(photo))
    same, other = (image.post["qc"] for image in out)
    assert same["identity"] > 0.99 and same["ssim"] > 0.99 and same["rank"] == 1
    assert other["ssim"] < 0.75 and other["rank"] is None  # below τ = 0.75: not ranked


def test_nsfw_gate_withholds_the_image():
    photo = _photo(data.astronaut())
    [passed] = apply_chain([photo], PostprocessSpec(qc=True, nsfw_max=0.5))
    assert "error" not in passed.post and passed.post["qc"]["nsfw"] < 0.5
    [held] = apply_chain([photo], PostprocessSpec(qc=True, nsfw_max=0.0, upscale=2))
    assert "withheld" in held.post["error"]
    assert held.width == 512  # later steps skipped


def test_cancel_stops_the_post_processing_passes_of_a_job(engine):
    """Cancelling a job also cancels its passes (``<id>:hires`` ...): the chain reports it, fast."""
    import threading
    import time

    [first] = _generated(engine, [21])
    slow = PostprocessSpec(hires_scale=2, hires_strength=1.0, hires_steps=150)
    out: list = []
    worker = threading.Thread(target=lambda: out.extend(apply_chain([first], slow, engine)))
    worker.start()
    deadline = time.monotonic() + 60
    while f"{first.job.job_id}:hires" not in engine._active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.cancel(first.job.job_id)  # the base job is done: only its pass is still running
    worker.join(timeout=60)
    assert not worker.is_alive()
    assert "hires failed: canceled" in out[0].post["error"]
