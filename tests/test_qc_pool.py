"""QC on a process pool (``postprocess.qc_pool``) gives bit-for-bit the scores of one thread.

Real helper models (dlib's detector, landmarks and ResNet, the Open-NSFW ONNX model) on scikit-image
photos: the astronaut (shifted, mirrored, softened), the coffee cup (no face). Images arrive in a
shuffled order with a failed draft among them, and small NSFW batches, as in a portrait run whose
drafts come out of the engine in batches; a portrait run with the pool forced on tiny drafts gives
the same report as without it; SSIM with the reference's blurs kept equals the five-blur formula.
"""

import io
import random

import numpy as np
import pytest
from PIL import Image
from skimage import data

from conftest import make_settings
from imagegenx.engine import portrait as portrait_module
from imagegenx.engine.engine import Engine
from imagegenx.engine.portrait import PortraitSpec, run_portrait
from imagegenx.postprocess.qc_pool import QcPool, default_workers
from imagegenx.postprocess.shortlist import draft_pool, score_drafts
from imagegenx.types import GeneratedImage, JobSpec
from imagegenx.vision.identity import DlibIdentity, mean_embedding
from imagegenx.vision.nsfw import NsfwClassifier
from imagegenx.vision.quality import SsimReference, qc_batch, ssim, to_gray
from imagegenx.vision.selfie import read_selfie

SIZE = 256
MODEL = "random:tiny-sdxl"


def _photos(n: int) -> list[np.ndarray]:
    """``n`` different SIZE² photos: astronaut variants, every fourth one the coffee cup."""
    astronaut = Image.fromarray(data.astronaut()).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    coffee = np.asarray(Image.fromarray(data.coffee()).resize((SIZE, SIZE)))
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        if i % 4 == 3:
            out.append(coffee)
            continue
        image = astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if i % 2 else astronaut
        pixels = np.roll(np.asarray(image).astype(np.int16), 4 * i, axis=1) + rng.integers(
            -6, 6, (SIZE, SIZE, 3)
        )
        out.append(np.clip(pixels, 0, 255).astype(np.uint8))
    return out


@pytest.fixture(scope="module")
def reference():
    """The astronaut's aligned selfie crop and the mean embedding of her and her mirror image."""
    faces = DlibIdentity()
    selfies = []
    for name, pixels in (("a.png", data.astronaut()), ("m.png", data.astronaut()[:, ::-1])):
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, "PNG")
        selfies.append(read_selfie(name, buffer.getvalue(), faces))
    return selfies[0].crop, mean_embedding([s.embedding for s in selfies])


def test_pool_scores_equal_one_thread_in_any_order_with_a_failed_image(reference):
    crop, embedding = reference
    photos = _photos(8)
    failed = 5
    faces, nsfw = DlibIdentity(upsample=1), NsfwClassifier(batch_size=3)  # 3 NSFW batches of the 7
    ref = np.asarray(crop.convert("RGB"))
    kept = [p for i, p in enumerate(photos) if i != failed]
    expected = qc_batch(kept, reference=ref, reference_embedding=embedding, identity=faces, nsfw=nsfw)
    order = list(range(len(photos)))
    random.Random(3).shuffle(order)
    with QcPool(reference=ref, reference_embedding=embedding, identity=faces, nsfw=nsfw, workers=2) as pool:
        for i in order:
            pool.add(i, None if i == failed else photos[i])
        scores, seconds = pool.scores()
    assert scores == expected  # exact floats, NSFW included
    assert [s.faces for s in scores] == [1, 1, 1, 0, 1, 1, 0]  # the coffee cups (3 and 7) have none
    assert all(s.nsfw is not None and s.identity is not None for s in scores)
    assert seconds > 0


def test_pool_without_identity_or_nsfw_scores_sharpness_and_ssim_only(reference):
    photos = _photos(3)
    ref = np.asarray(reference[0].convert("RGB"))
    expected = qc_batch(photos, reference=ref)
    with QcPool(
        reference=ref, reference_embedding=None, identity=DlibIdentity(), nsfw=None, workers=1
    ) as pool:
        for i, photo in enumerate(photos):
            pool.add(i, photo)
        assert pool.scores()[0] == expected
    assert expected[0].faces is None and expected[0].nsfw is None and expected[0].ssim is not None


def test_shortlist_from_pool_scores_equals_the_serial_shortlist(reference):
    crop, embedding = reference
    drafts = [
        GeneratedImage(JobSpec("p", MODEL, seed=i), SIZE, SIZE, pixels.tobytes(), MODEL, 1)
        for i, pixels in enumerate(_photos(6))
    ]
    serial = score_drafts(drafts, crop, embedding, k=4, ssim_tau=0.3)
    with draft_pool(crop, embedding, SIZE, SIZE, workers=2) as pool:
        for i in (2, 0, 5, 1, 4, 3):
            pool.add(i, np.asarray(Image.frombytes("RGB", (SIZE, SIZE), drafts[i].rgb)))
        pooled = score_drafts(drafts, crop, embedding, k=4, ssim_tau=0.3, scores=pool.scores())
        # The workers load no torch (they import only the vision room).
        assert pool._procs.submit(eval, "'torch' in __import__('sys').modules").result() is False
    assert [d.post["qc"] for d in pooled[0]] == [d.post["qc"] for d in serial[0]]
    assert pooled[1:] == serial[1:] and len(pooled[1]) == 4


def test_pool_raises_what_a_worker_raised_and_refuses_misuse(reference):
    ref = np.asarray(reference[0].convert("RGB"))
    with QcPool(
        reference=ref, reference_embedding=None, identity=DlibIdentity(), nsfw=None, workers=1
    ) as pool:
        pool.add(0, _photos(1)[0])
        with pytest.raises(ValueError, match="already added"):
            pool.add(0, None)
        pool.add(2, np.zeros((8, 8, 3), np.uint8))  # too small for SSIM's window
        with pytest.raises(ValueError, match="images missing"):
            pool.scores()  # index 1 never came
    with QcPool(
        reference=ref, reference_embedding=None, identity=DlibIdentity(), nsfw=None, workers=1
    ) as pool:
        pool.add(0, np.zeros((8, 8, 3), np.uint8))
        with pytest.raises(ValueError, match="at least 11x11"):
            pool.scores()
    assert default_workers() >= 1


def test_portrait_run_with_the_pool_reports_the_same_qc(tmp_path, monkeypatch):
    """Tiny drafts, with the pool forced on: the same QC records, shortlist and report as in one
    thread (drafts of a random model have no faces; sharpness, SSIM and NSFW still differ)."""
    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buffer, "PNG")
    selfies = [("astronaut.png", buffer.getvalue())]
    spec = PortraitSpec(
        "a portrait", n=6, seed=5, model=MODEL, shortlist=3, refine_top=0, face_fix=False, upscale=1
    )
    with Engine(make_settings(tmp_path)) as engine:
        serial = run_portrait(engine, selfies, spec)
        monkeypatch.setattr(portrait_module, "_POOL_MIN_PIXELS", 0)
        pooled = run_portrait(engine, selfies, spec)
    drafts = [[d["qc"] for d in r.report["drafts"]] for r in (serial, pooled)]
    assert drafts[0] == drafts[1] and all(isinstance(q["sharpness"], float) for q in drafts[0])
    assert [e["draft"] for e in pooled.report["shortlist"]] == [
        e["draft"] for e in serial.report["shortlist"]
    ]
    assert pooled.report["ssim_gate"] == serial.report["ssim_gate"]


def _five_blur_ssim(a: np.ndarray, b: np.ndarray, sigma: float = 1.5) -> float:
    """SSIM as ``vision.quality.ssim`` computed it before the reference's blurs were kept."""
    import cv2

    x, y = to_gray(a), to_gray(b)
    if y.shape != x.shape:
        y = cv2.resize(y, (x.shape[1], x.shape[0]), interpolation=cv2.INTER_AREA)
    radius = int(3.5 * sigma + 0.5)
    win = 2 * radius + 1
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(img: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(img, (win, win), sigma, borderType=cv2.BORDER_REFLECT)

    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x * mu_x
    syy = blur(y * y) - mu_y * mu_y
    sxy = blur(x * y) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2)
    return float((num / den)[radius:-radius, radius:-radius].mean())


def test_kept_reference_blurs_give_the_same_ssim_bit_for_bit(reference):
    """One ``SsimReference`` for a batch (reference resized and blurred once per size) gives exactly
    the SSIM of the five-blur formula, for images of the reference's size and of others."""
    ref = np.asarray(reference[0].convert("RGB"))
    kept = SsimReference(ref)
    for photo in [*_photos(3), np.asarray(Image.fromarray(_photos(1)[0]).resize((512, 512))), ref]:
        assert kept.against(to_gray(photo)) == _five_blur_ssim(photo, ref) == ssim(photo, ref)
