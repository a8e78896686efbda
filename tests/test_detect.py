"""Face and hand detection with mediapipe 0.10.21's real TFLite models on real photos (offline).

Photos come from scikit-image's bundled data: ``astronaut`` (one face), ``camera`` (the cameraman, face in
near profile, black gloves on the camera), ``coffee`` and ``chelsea`` (no people). No bundled photo shows a
bare hand: the cameraman's gloved left hand is the only one, and the palm model gives it 0.42, below
mediapipe's default 0.5, so the hand tests lower the threshold to 0.3.

The ``MEDIAPIPE_*`` numbers below were produced by mediapipe 0.10.21 itself (``mp.solutions`` face
detection, and the hand tracking graph's ``palm_detections`` / ``hand_rects_from_palm_detections`` streams)
in a throwaway environment with its own dependencies, then converted to pixels.
"""

import math
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage import data

from imagegenx.types import UserError
from imagegenx.vision import detect
from imagegenx.vision.detect import Detection, MediapipeDetector, hand_box_from_palm, ssd_anchor_centres

# (left, top, right, bottom) of the astronaut's face.
MEDIAPIPE_FULL_RANGE_BOX = (173.66, 67.78, 277.59, 171.70)
MEDIAPIPE_SHORT_RANGE_BOX = (177.57, 82.87, 272.91, 178.22)
# The cameraman's gloved left hand at min_detection_confidence 0.3: palm box, 7 palm keypoints, and the
# hand rect (centre x, centre y, side, rotation in radians).
MEDIAPIPE_PALM_SCORE = 0.4165
MEDIAPIPE_PALM_BOX = (187.91, 194.71, 235.64, 242.44)
MEDIAPIPE_PALM_KEYPOINTS = [
    (197.06, 236.08),
    (212.38, 201.02),
    (220.05, 208.94),
    (227.53, 217.31),
    (234.84, 226.00),
    (193.73, 222.34),
    (190.71, 208.47),
]
MEDIAPIPE_HAND_RECT = (227.203, 200.363, 124.112, 0.70282)


def rotated_square(cx, cy, side, rotation):
    """Corners of mediapipe's rotated square rect, in pixels (rotation clockwise on screen, y down)."""
    c, s = math.cos(rotation), math.sin(rotation)
    half = side / 2
    local = np.array([[-half, -half], [half, -half], [half, half], [-half, half]])
    return local @ np.array([[c, s], [-s, c]]) + [cx, cy]


@pytest.fixture(scope="module")
def detector():
    return MediapipeDetector()


@pytest.fixture(scope="module")
def astronaut():
    return data.astronaut()


@pytest.fixture(scope="module")
def camera():
    return np.stack([data.camera()] * 3, axis=-1)


def faces(found):
    return [d for d in found if d.kind == "face"]


def hands(found):
    return [d for d in found if d.kind == "hand"]


def inside(point, box):
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


# --- faces ------------------------------------------------------------------------------------------


def test_astronaut_face_found_once_where_mediapipe_finds_it(detector, astronaut):
    found = detector.detect(astronaut)
    assert [d.kind for d in found] == ["face"]
    face = found[0]
    assert isinstance(face, Detection)
    assert face.score == pytest.approx(0.912, abs=0.01)
    assert np.allclose(face.box, MEDIAPIPE_FULL_RANGE_BOX, atol=1.5)
    # Her face sits around x 175-275, y 70-175 in the 512x512 photo.
    left, top, right, bottom = face.box
    assert 160 <= left < 190 and 255 < right <= 290 and 55 <= top < 90 and 160 < bottom <= 190
    assert face.keypoints.shape == (6, 2)
    right_eye, left_eye = face.keypoints[0], face.keypoints[1]  # the subject's: image left, image right
    assert inside(right_eye, face.box) and inside(left_eye, face.box)
    assert right_eye[0] < left_eye[0] and abs(right_eye[1] - left_eye[1]) < 10
    nose, mouth = face.keypoints[2], face.keypoints[3]
    assert right_eye[1] < nose[1] < mouth[1]


def test_short_range_model_matches_mediapipe(astronaut):
    found = MediapipeDetector(face_range="short").detect(astronaut)
    assert len(faces(found)) == 1
    assert np.allclose(found[0].box, MEDIAPIPE_SHORT_RANGE_BOX, atol=1.0)


def test_mirrored_photo_gives_the_mirrored_box(detector, astronaut):
    left, top, right, bottom = detector.detect(astronaut)[0].box
    mirrored = faces(detector.detect(np.ascontiguousarray(astronaut[:, ::-1])))
    assert len(mirrored) == 1
    width = astronaut.shape[1]
    # The network is not exactly mirror-symmetric: the box moves by up to 4 px.
    assert np.allclose(mirrored[0].box, (width - right, top, width - left, bottom), atol=5)
    # Point 0 is still on the image's left: the model labels the eyes of the person it sees.
    assert mirrored[0].keypoints[0, 0] < mirrored[0].keypoints[1, 0]


@pytest.mark.parametrize("name", ["coffee", "chelsea"])
def test_photos_without_people_give_no_face(detector, name):
    assert faces(detector.detect(getattr(data, name)())) == []


@pytest.mark.parametrize(
    ("crop", "mediapipe_box"),
    [
        ((slice(40, 400), slice(60, 512)), (112.06, 26.94, 219.10, 133.97)),  # wide: padded top and bottom
        ((slice(0, 512), slice(100, 400)), (72.31, 67.50, 177.07, 172.28)),  # tall: padded left and right
    ],
)
def test_non_square_input_removes_the_letterbox(detector, astronaut, crop, mediapipe_box):
    image = np.ascontiguousarray(astronaut[crop])
    found = faces(detector.detect(image))
    assert len(found) == 1
    assert np.allclose(found[0].box, mediapipe_box, atol=2.5)
    # The same face as in the full photo, moved by the crop's offset.
    dx, dy = crop[1].start, crop[0].start
    shifted = np.array(MEDIAPIPE_FULL_RANGE_BOX) - [dx, dy, dx, dy]
    assert np.allclose(found[0].box, shifted, atol=6)


def test_full_range_default_finds_small_faces_that_short_range_misses(astronaut):
    # The astronaut shrunk to 224 px on a grey 512 px canvas: her face is about 45 px wide.
    canvas = np.full((512, 512, 3), 128, np.uint8)
    canvas[16:240, 40:264] = cv2.resize(astronaut, (224, 224), interpolation=cv2.INTER_AREA)
    expected = np.array(MEDIAPIPE_FULL_RANGE_BOX) * 224 / 512 + [40, 16, 40, 16]
    found = faces(MediapipeDetector().detect(canvas))
    assert len(found) == 1
    assert np.allclose(found[0].box, expected, atol=5)
    assert faces(MediapipeDetector(face_range="short").detect(canvas)) == []


def test_batch_equals_single_images_and_pil_equals_numpy(detector, astronaut, camera):
    images = [astronaut, data.coffee(), camera, Image.fromarray(astronaut)]
    batch = detector.detect_batch(images)
    assert len(batch) == 4
    assert [len(b) for b in batch] == [1, 0, 1, 1]
    for got, image in zip(batch, images, strict=True):
        want = detector.detect(image)
        assert [(d.kind, d.box, d.score) for d in got] == [(d.kind, d.box, d.score) for d in want]
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g.keypoints, w.keypoints)
    assert batch[3][0].box == batch[0][0].box


def test_grayscale_input_equals_its_rgb_version(detector, camera):
    gray = detector.detect(data.camera())
    assert len(faces(gray)) == 1
    assert [(d.kind, d.box, d.score) for d in gray] == [
        (d.kind, d.box, d.score) for d in detector.detect(camera)
    ]


# --- hands ------------------------------------------------------------------------------------------


def test_gloved_hand_is_below_the_default_threshold(detector, camera):
    assert hands(detector.detect(camera)) == []


def test_cameramans_hand_matches_mediapipe(camera):
    found = MediapipeDetector(hand_threshold=0.3).detect(camera)
    assert [d.kind for d in found] == ["face", "hand"]  # faces first
    hand = found[1]
    assert hand.score == pytest.approx(MEDIAPIPE_PALM_SCORE, abs=0.005)
    assert hand.keypoints.shape == (7, 2)
    np.testing.assert_allclose(hand.keypoints, MEDIAPIPE_PALM_KEYPOINTS, atol=1.0)
    # The box is the whole hand region (the expanded, rotated palm rect), not the palm.
    corners = rotated_square(*MEDIAPIPE_HAND_RECT)
    expected = (*corners.min(axis=0), *corners.max(axis=0))
    assert np.allclose(hand.box, expected, atol=2)
    palm_width = MEDIAPIPE_PALM_BOX[2] - MEDIAPIPE_PALM_BOX[0]
    assert hand.box[2] - hand.box[0] > 2.6 * palm_width
    # The glove (around x 180-245, y 190-250) lies inside the hand box.
    assert hand.box[0] < 180 and hand.box[1] < 190 and hand.box[2] > 245 and hand.box[3] > 250


def test_palm_to_hand_rect_upright_and_sideways():
    box = np.array([100.0, 100.0, 140.0, 140.0])  # a 40 px palm
    kps = np.zeros((7, 2))
    # Upright: wrist below, middle finger MCP above → no rotation, centre shifted up by half the palm
    # (20 px), side 2.6 x 40 = 104.
    kps[0], kps[2] = (120, 140), (120, 100)
    corners = hand_box_from_palm(box, kps)
    np.testing.assert_allclose(corners.min(axis=0), (120 - 52, 100 - 52), atol=1e-9)
    np.testing.assert_allclose(corners.max(axis=0), (120 + 52, 100 + 52), atol=1e-9)
    # Fingers pointing right: rotated 90°, so the shift goes right instead of up.
    kps[0], kps[2] = (100, 120), (140, 120)
    corners = hand_box_from_palm(box, kps)
    np.testing.assert_allclose(corners.mean(axis=0), (140, 120), atol=1e-9)
    np.testing.assert_allclose(corners.max(axis=0) - corners.min(axis=0), (104, 104), atol=1e-9)
    # Fingers pointing up-right at 45°: the rotated square's bounds grow by sqrt(2).
    kps[0], kps[2] = (110, 130), (130, 110)
    corners = hand_box_from_palm(box, kps)
    np.testing.assert_allclose(corners.max(axis=0) - corners.min(axis=0), [104 * math.sqrt(2)] * 2)
    np.testing.assert_allclose(corners.mean(axis=0), (120 + 20 / math.sqrt(2), 120 - 20 / math.sqrt(2)))


def test_palm_to_hand_rect_matches_mediapipe_numbers():
    corners = hand_box_from_palm(np.array(MEDIAPIPE_PALM_BOX), np.array(MEDIAPIPE_PALM_KEYPOINTS))
    np.testing.assert_allclose(corners, rotated_square(*MEDIAPIPE_HAND_RECT), atol=0.1)


def test_palm_model_runs_and_finds_no_hand_in_coffee(detector):
    assert hands(detector.detect(data.coffee())) == []
    assert hands(MediapipeDetector(hand_threshold=0.9).detect(data.astronaut())) == []


# --- models and errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [detect._FACE_SHORT, detect._FACE_FULL, detect._PALM])
def test_anchors_match_the_models_outputs(spec):
    model = detect._model(spec)
    anchors = ssd_anchor_centres(spec)
    rows = {int(d["shape"][1]) for d in model.interpreter.get_output_details()}
    assert rows == {len(anchors)} and len(anchors) in (896, 2304, 2016)
    assert model.interpreter.get_input_details()[0]["shape"].tolist() == [1, spec.size, spec.size, 3]
    assert anchors.min() > 0 and anchors.max() < 1


def test_missing_model_files_are_a_user_error(monkeypatch, tmp_path, astronaut):
    monkeypatch.setattr(detect, "mediapipe_models_dir", lambda: tmp_path)
    with pytest.raises(UserError, match=r"pip install --no-deps mediapipe==0\.10\.21"):
        MediapipeDetector().detect(astronaut)


def test_mediapipe_not_installed_is_a_user_error(monkeypatch):
    # A None entry in sys.modules is how Python marks a module as not importable: find_spec gives None.
    monkeypatch.setitem(sys.modules, "mediapipe", None)
    with pytest.raises(UserError, match=r"mediapipe 0\.10\.21's model files"):
        detect.mediapipe_models_dir()


def test_bad_arguments():
    with pytest.raises(UserError, match="face_range"):
        MediapipeDetector(face_range="medium")
    with pytest.raises(ValueError, match="uint8"):
        MediapipeDetector().detect(np.zeros((64, 64, 3), np.float32))


def test_importing_detect_loads_no_runtime():
    code = "import sys, imagegenx.vision.detect; "
    code += "print(sorted(m for m in ('cv2', 'ai_edge_litert', 'mediapipe') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stderr
