"""Vision room on real photographs with real weights: dlib identity, SSIM, Tenengrad, Open-NSFW, shortlist.

Photos come from scikit-image's bundled data (offline): ``astronaut`` (one face, 512x512), ``coffee``,
``chelsea`` (a cat) and ``lfw_subset`` (25x25 grayscale face crops from Labeled Faces in the Wild,
other people than the astronaut; upscaled to 150 px for the detector).
"""

import cv2
import numpy as np
import pytest
from skimage import data
from skimage.metrics import structural_similarity

from imagegenx.types import UserError
from imagegenx.vision.identity import (
    ARCFACE_TEMPLATE,
    ArcFaceOnnx,
    DlibIdentity,
    Face,
    align_face,
    arcface_points,
    cosine,
    identity_scores,
    umeyama,
)
from imagegenx.vision.nsfw import NsfwClassifier
from imagegenx.vision.quality import (
    QcScores,
    combined_scores,
    qc_batch,
    shortlist,
    ssim,
    tenengrad,
    to_gray,
)


@pytest.fixture(scope="module")
def astronaut():
    return data.astronaut()


@pytest.fixture(scope="module")
def dlib_id():
    return DlibIdentity()


@pytest.fixture(scope="module")
def astro_faces(dlib_id, astronaut):
    return dlib_id.faces(astronaut)


@pytest.fixture(scope="module")
def nsfw():
    return NsfwClassifier()


def jpeg(image, quality):
    ok, buf = cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]


def blur(image, sigma=3.0):
    return cv2.GaussianBlur(image, (0, 0), sigma)


def lfw_face(i):
    face = (data.lfw_subset()[i] * 255).round().astype(np.uint8)
    return cv2.resize(face, (150, 150), interpolation=cv2.INTER_CUBIC)


# --- identity ---------------------------------------------------------------------------------------


def test_astronaut_face_box_and_landmarks(astro_faces):
    assert len(astro_faces) == 1
    face = astro_faces[0]
    left, top, right, bottom = face.box
    # Her face sits around x 175-265, y 75-170 in the 512x512 photo.
    assert 150 < left < 200 and 240 < right < 290 and 50 < top < 110 and 140 < bottom < 200
    assert 60 < right - left < 130 and 60 < bottom - top < 130
    assert face.score > 0.5
    pts = face.landmarks
    assert pts.shape == (5, 2)
    assert np.all((pts[:, 0] >= left - 5) & (pts[:, 0] <= right + 5))
    assert np.all((pts[:, 1] >= top - 5) & (pts[:, 1] <= bottom + 5))
    # dlib 5-point order: eye on the image's right (0-1), eye on the left (2-3), nose base (4) below both.
    assert pts[0:2, 0].min() > pts[2:4, 0].max()
    assert pts[4, 1] > pts[:4, 1].max()
    assert face.embedding.shape == (128,)
    assert np.all(np.isfinite(face.embedding)) and float(np.linalg.norm(face.embedding)) > 0.5


def test_mirror_image_is_the_same_person_other_people_are_not(dlib_id, astronaut, astro_faces):
    ref = astro_faces[0].embedding
    mirrored = dlib_id.faces(np.ascontiguousarray(astronaut[:, ::-1]))
    assert len(mirrored) == 1
    same_dist = float(np.linalg.norm(ref - mirrored[0].embedding))
    same_cos = cosine(ref, mirrored[0].embedding)
    assert same_dist < 0.6  # dlib's same-person threshold (measured 0.186)
    assert same_cos > 0.97

    for i in range(3):
        other = dlib_id.faces(lfw_face(i))
        assert len(other) == 1, f"no face in lfw_subset()[{i}]"
        dist = float(np.linalg.norm(ref - other[0].embedding))
        assert dist > 0.6, (i, dist)  # measured 0.81-0.91
        assert cosine(ref, other[0].embedding) < same_cos - 0.05

    scores = identity_scores([mirrored, other, []], [ref])
    assert scores[0] == pytest.approx(same_cos, abs=1e-6)
    assert scores[0] > scores[1] and scores[2] == 0.0


def test_no_face_in_coffee(dlib_id):
    assert dlib_id.faces(data.coffee()) == []


def test_cosine_and_identity_scores_use_the_best_face():
    a = np.array([1.0, 0.0, 0.0])
    assert cosine(a, a) == pytest.approx(1.0)
    assert cosine(a, np.array([0.0, 2.0, 0.0])) == pytest.approx(0.0)
    assert cosine(a, np.zeros(3)) == 0.0
    with pytest.raises(ValueError):
        cosine(a, np.ones(4))

    def face(v):
        return Face(box=(0, 0, 1, 1), landmarks=np.zeros((5, 2)), embedding=np.asarray(v, float), score=1.0)

    refs = [np.array([1.0, 0.0]), np.array([0.0, 1.0])]  # mean direction: 45 degrees
    scores = identity_scores([[face([1, 0]), face([1, 1])], [face([-1, 0])]], refs)
    assert scores[0] == pytest.approx(1.0)
    assert scores[1] == pytest.approx(-np.sqrt(0.5))


def test_umeyama_recovers_a_similarity_transform():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, size=(5, 2))
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -4.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = src @ (scale * rot).T + shift
    m = umeyama(src, dst)
    np.testing.assert_allclose(m[:, :2], scale * rot, atol=1e-9)
    np.testing.assert_allclose(m[:, 2], shift, atol=1e-9)


def test_arcface_alignment_puts_the_eyes_on_the_template(astronaut, astro_faces):
    pts = arcface_points(astro_faces[0].landmarks)
    crop = align_face(astronaut, pts)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    m = umeyama(pts, ARCFACE_TEMPLATE[:3])
    mapped = np.c_[pts, np.ones(3)] @ m.T
    np.testing.assert_allclose(mapped[:2], ARCFACE_TEMPLATE[:2], atol=4.0)  # both eyes within 4 px
    # A face crop, not background: skin-toned centre, brighter than the dark edges of the photo.
    assert 80 < crop[40:90, 30:80].mean() < 230


def test_arcface_onnx_clear_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        ArcFaceOnnx(tmp_path / "w600k_r50.onnx")
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"this is not a protobuf" * 10)
    model = ArcFaceOnnx(bogus)  # lazy: nothing loads until first use
    with pytest.raises(UserError, match="not a loadable ONNX model"):
        model.embed_aligned(np.zeros((1, 112, 112, 3), np.uint8))


# --- quality ----------------------------------------------------------------------------------------


def test_ssim_is_one_for_identical_and_drops_under_jpeg_and_blur(astronaut):
    assert ssim(astronaut, astronaut) == pytest.approx(1.0)
    low_q = ssim(astronaut, jpeg(astronaut, 10))
    blurred = ssim(astronaut, blur(astronaut))
    assert 0.5 < low_q < 0.95  # measured 0.85
    assert 0.5 < blurred < 0.9  # measured 0.74
    assert ssim(astronaut, data.coffee()[:512, :512]) < 0.3
    # Same definition as scikit-image's Gaussian SSIM.
    ref = structural_similarity(
        to_gray(astronaut),
        to_gray(blur(astronaut)),
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=255,
    )
    assert blurred == pytest.approx(ref, abs=1e-6)


def test_ssim_resizes_a_reference_of_another_size(astronaut):
    half = cv2.resize(astronaut, (256, 256), interpolation=cv2.INTER_AREA)
    assert ssim(astronaut, half) > 0.75


def test_tenengrad_detects_blur(astronaut):
    sharp = tenengrad(astronaut)
    soft = tenengrad(blur(astronaut, 1.0))
    softer = tenengrad(blur(astronaut, 3.0))
    assert sharp > soft > softer > 0
    assert softer < 0.3 * sharp
    assert tenengrad(np.full((64, 64, 3), 128, np.uint8)) == 0.0


# --- NSFW -------------------------------------------------------------------------------------------


def test_nsfw_probability_is_low_on_safe_photos(nsfw, astronaut):
    probs = nsfw.probability([astronaut, data.coffee(), data.chelsea()])
    assert len(probs) == 3
    assert all(isinstance(p, float) and 0.0 <= p <= 1.0 for p in probs)
    assert all(p < 0.2 for p in probs), probs
    assert nsfw.probability([]) == []


def test_nsfw_batches_match_single_calls(astronaut):
    small = NsfwClassifier(batch_size=2)
    images = [astronaut, data.coffee(), data.chelsea()]
    batched = small.probability(images)
    singles = [small.probability([img])[0] for img in images]
    np.testing.assert_allclose(batched, singles, atol=1e-5)


# --- QC and shortlist -------------------------------------------------------------------------------


def test_qc_scores_on_real_images(dlib_id, nsfw, astronaut, astro_faces):
    ref_emb = astro_faces[0].embedding
    images = [
        astronaut,
        blur(astronaut, 1.0),
        np.ascontiguousarray(astronaut[:, ::-1]),
        data.coffee()[:512, :512],
    ]
    scores = qc_batch(images, reference=astronaut, reference_embedding=ref_emb, identity=dlib_id, nsfw=nsfw)
    original, blurred, mirrored, coffee = scores
    assert original.identity == pytest.approx(1.0, abs=1e-5) and original.ssim == pytest.approx(1.0)
    assert original.faces == 1 and coffee.faces == 0 and coffee.identity == 0.0
    assert mirrored.identity > 0.97 and mirrored.ssim < 0.75  # same person, different structure
    assert blurred.sharpness < original.sharpness
    assert all(s.nsfw is not None and s.nsfw < 0.2 for s in scores)
    d = original.as_dict()
    assert set(d) == {"sharpness", "ssim", "identity", "faces", "nsfw", "brisque"}
    # The mirror and coffee fail the SSIM gate (0.75); the sharp original beats its blurred copy.
    assert shortlist(scores, k=4) == [0, 1]


def test_shortlist_orders_by_identity_then_sharpness_and_applies_the_ssim_gate():
    scores = [
        QcScores(sharpness=100.0, ssim=0.9, identity=0.80),
        QcScores(sharpness=50.0, ssim=0.9, identity=0.95),
        QcScores(sharpness=400.0, ssim=0.5, identity=0.99),  # best identity, fails SSIM gate
        QcScores(sharpness=400.0, ssim=0.8, identity=0.80),  # same identity as 0, sharper
        QcScores(sharpness=10.0, ssim=0.76, identity=0.10),
    ]
    assert shortlist(scores, k=3) == [1, 3, 0]
    assert shortlist(scores, k=10) == [1, 3, 0, 4]
    assert shortlist(scores, k=10, ssim_tau=0.0) == [2, 1, 3, 0, 4]
    assert shortlist(scores, k=0) == []
    combined = combined_scores(scores)
    assert combined[2] is None
    assert combined[3] == pytest.approx(0.80 + 0.05)
    assert combined[0] == pytest.approx(0.80 + 0.05 * 0.25)


def test_shortlist_without_references_ranks_by_sharpness_and_gates_nsfw():
    scores = [QcScores(sharpness=s, nsfw=p) for s, p in [(10.0, 0.0), (30.0, 0.9), (20.0, 0.1)]]
    assert shortlist(scores, k=3) == [1, 2, 0]
    assert shortlist(scores, k=3, nsfw_max=0.5) == [2, 0]


def test_importing_the_vision_room_loads_no_model_runtime():
    import subprocess
    import sys

    code = "import sys, imagegenx.vision.identity, imagegenx.vision.quality, imagegenx.vision.nsfw; "
    code += "print(sorted(m for m in ('torch', 'cv2', 'dlib', 'onnxruntime') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stderr
