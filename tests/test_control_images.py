"""ControlNet control images: OpenPose skeletons from mediapipe's real pose models, Canny edges, depth.

Photos come from scikit-image's bundled data. None shows a full body: ``astronaut`` is a woman in a
space suit from the waist up, facing the camera (so hips, knees and ankles are missing); ``camera`` is
a man bent over a camera on a tripod, seen down to the hips; ``coffee`` has no person; ``retina`` (a
fundus photo) fools the person detector (score 0.51) but not the landmark model's presence score.

The ``MEDIAPIPE_*`` numbers below were produced by mediapipe 0.10.21 itself (``pose_landmark_cpu``
graph as ``mp.solutions.pose`` builds it with ``static_image_mode=True``, reading its ``pose_detection``,
``pose_rect_from_detection`` and ``pose_landmarks`` streams) in a throwaway environment with its own
dependencies, then converted to pixels. Our detector's scores agree to 0.005 and its keypoints to 0.4 px
(astronaut) and 1.3 px (cameraman); the ROI follows them, 2.5 x their distance wide (1255 and 973 px,
most of it outside the photo). Given mediapipe's own ROI, our landmarks agree to 0.13 px (median) on
the astronaut and 0.9 px on the cameraman. Points whose heatmap peak sits near the 0.5 refinement
threshold (the cameraman's fingers) can fall on the other side of it and move by up to 25 px; the face
and shoulders do not: end to end they agree within 1.3 px on the astronaut.
"""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from skimage import data

from imagegenx.types import UserError
from imagegenx.vision import pose
from imagegenx.vision.canny import canny_control_image, depth_control_image
from imagegenx.vision.detect import MediapipeDetector, _ssd_detect
from imagegenx.vision.pose import (
    OPENPOSE_KEYPOINTS,
    Pose,
    PoseDetector,
    draw_openpose,
    pose_control_image,
    pose_roi,
)

K = {name: i for i, name in enumerate(OPENPOSE_KEYPOINTS)}

# Astronaut: person detector score, its keypoints 0 (mid-hip) and 1 (size and rotation), the ROI
# (centre x, centre y, side, rotation in radians) and BlazePose landmarks (x, y, visibility).
MEDIAPIPE_SCORE = 0.8071
MEDIAPIPE_DETECTOR_KEYPOINTS = [(158.729, 524.012), (238.748, 28.462)]
MEDIAPIPE_ROI = (158.729, 524.012, 1254.921, 0.160093)
MEDIAPIPE_LANDMARKS = {
    0: (222.74, 127.96, 0.999),  # nose
    2: (248.95, 112.46, 0.999),  # left eye
    5: (204.95, 103.34, 0.999),  # right eye
    7: (268.02, 122.80, 0.998),  # left ear
    8: (190.38, 107.37, 0.999),  # right ear
    11: (306.24, 256.64, 0.998),  # left shoulder
    12: (112.66, 239.95, 0.998),  # right shoulder
    14: (64.60, 413.61, 0.763),  # right elbow
}
# The cameraman: detector keypoints 0 and 1, and the ROI mediapipe built from them.
MEDIAPIPE_CAMERA_DETECTOR_KEYPOINTS = [(54.181, 401.240), (249.185, 64.418)]
MEDIAPIPE_CAMERA_ROI = (54.181, 401.240, 972.997, 0.524798)
# The astronaut cropped to rows 40-400, columns 60-512: nose and eyes.
MEDIAPIPE_CROP_FACE = {"nose": (161.82, 84.97), "right_eye": (142.88, 61.98), "left_eye": (185.64, 67.53)}
MEDIAPIPE_CAMERA_FACE = {0: (247.00, 169.61), 2: (250.79, 152.36), 5: (236.64, 151.66), 7: (231.01, 144.02)}


@pytest.fixture(scope="module")
def detector():
    return PoseDetector()


@pytest.fixture(scope="module")
def astronaut():
    return data.astronaut()


@pytest.fixture(scope="module")
def astronaut_pose(detector, astronaut):
    poses = detector.detect(astronaut)
    assert len(poses) == 1
    return poses[0]


def visible(p: Pose) -> set[str]:
    return {name for name, xy in zip(OPENPOSE_KEYPOINTS, p.keypoints, strict=True) if not np.isnan(xy).any()}


# --- pose: agreement with mediapipe ------------------------------------------------------------------


def test_roi_from_detector_keypoints_matches_mediapipe():
    np.testing.assert_allclose(pose_roi(*np.array(MEDIAPIPE_DETECTOR_KEYPOINTS)), MEDIAPIPE_ROI, atol=2e-3)
    np.testing.assert_allclose(
        pose_roi(*np.array(MEDIAPIPE_CAMERA_DETECTOR_KEYPOINTS)), MEDIAPIPE_CAMERA_ROI, atol=2e-3
    )
    # Upright body: kp1 straight above the hips → no rotation, side 2 x 1.25 x distance.
    assert pose_roi(np.array([100.0, 300.0]), np.array([100.0, 100.0])) == (100.0, 300.0, 500.0, 0.0)
    # kp1 to the right of the hips: the body lies along +x, so the ROI turns a quarter clockwise on screen.
    assert pose_roi(np.array([0.0, 0.0]), np.array([10.0, 0.0]))[3] == pytest.approx(np.pi / 2)


def test_astronaut_detection_and_landmarks_match_mediapipe(astronaut, astronaut_pose):
    found = _ssd_detect(astronaut, pose._DETECTOR, 0.5)
    assert len(found) == 1  # one person after NMS
    _box, kps, score = found[0]
    assert score == pytest.approx(MEDIAPIPE_SCORE, abs=0.005)
    np.testing.assert_allclose(kps[:2], MEDIAPIPE_DETECTOR_KEYPOINTS, atol=1.0)
    assert astronaut_pose.score == pytest.approx(score)
    assert astronaut_pose.landmarks.shape == (33, 5)
    for index, (x, y, vis) in MEDIAPIPE_LANDMARKS.items():
        np.testing.assert_allclose(astronaut_pose.landmarks[index, :2], (x, y), atol=3.0, err_msg=str(index))
        assert astronaut_pose.landmarks[index, 3] == pytest.approx(vis, abs=0.03)
    face_and_shoulders = [0, 2, 5, 7, 8, 11, 12]
    errors = [
        np.abs(astronaut_pose.landmarks[i, :2] - MEDIAPIPE_LANDMARKS[i][:2]).max() for i in face_and_shoulders
    ]
    assert max(errors) < 1.5


def test_cameraman_matches_mediapipe(detector):
    found = detector.detect(data.camera())  # grayscale input is fine
    assert len(found) == 1
    assert found[0].score == pytest.approx(0.614, abs=0.01)
    for index, xy in MEDIAPIPE_CAMERA_FACE.items():
        np.testing.assert_allclose(found[0].landmarks[index, :2], xy, atol=2.0)
    # The same keypoints pass the visibility threshold as with mediapipe's landmarks: all but the knees
    # and ankles (he is cut off at the hips).
    assert visible(found[0]) == set(OPENPOSE_KEYPOINTS) - {
        "right_knee",
        "left_knee",
        "right_ankle",
        "left_ankle",
    }


def test_detection_without_a_body_is_rejected_by_the_presence_score(detector):
    retina = data.retina()
    # The person detector fires (mediapipe: 0.511) but the landmark model sees no pose, as in mediapipe.
    assert [round(s, 2) for _b, _k, s in _ssd_detect(retina, pose._DETECTOR, 0.5)] == [0.51]
    assert detector.detect(retina) == []


# --- pose: keypoints ---------------------------------------------------------------------------------


def test_astronaut_keypoints_are_where_she_is(astronaut, astronaut_pose):
    kp = {name: astronaut_pose.keypoints[i] for name, i in K.items()}
    assert astronaut_pose.keypoints.shape == (18, 2)
    # Waist-up photo: no hips, knees or ankles; her wrists and left elbow are hidden in the suit.
    assert visible(astronaut_pose) == {
        "nose", "neck", "right_shoulder", "left_shoulder", "right_elbow",
        "right_eye", "left_eye", "right_ear", "left_ear",
    }  # fmt: skip
    # Measured windows in the 512x512 photo.
    assert 210 < kp["nose"][0] < 235 and 115 < kp["nose"][1] < 140
    assert 195 < kp["right_eye"][0] < 215 and 95 < kp["right_eye"][1] < 115
    assert 240 < kp["left_eye"][0] < 260 and 100 < kp["left_eye"][1] < 120
    assert 95 < kp["right_shoulder"][0] < 130 and 225 < kp["right_shoulder"][1] < 255
    assert 290 < kp["left_shoulder"][0] < 320 and 240 < kp["left_shoulder"][1] < 270
    # Eyes inside the face box that the face detector finds, nose below them, shoulders below the face.
    faces = MediapipeDetector().detect(astronaut)
    assert [d.kind for d in faces] == ["face"]
    left, top, right, bottom = faces[0].box
    for eye in (kp["right_eye"], kp["left_eye"]):
        assert left <= eye[0] <= right and top <= eye[1] <= bottom
    assert kp["nose"][1] > max(kp["right_eye"][1], kp["left_eye"][1])
    assert min(kp["right_shoulder"][1], kp["left_shoulder"][1]) > bottom
    # Her right is on the image's left: she faces the camera.
    assert kp["right_shoulder"][0] < kp["nose"][0] < kp["left_shoulder"][0]
    assert kp["right_eye"][0] < kp["left_eye"][0] and kp["right_ear"][0] < kp["left_ear"][0]
    np.testing.assert_allclose(kp["neck"], (kp["right_shoulder"] + kp["left_shoulder"]) / 2)


def test_mirrored_photo_gives_mirrored_keypoints_with_sides_swapped(detector, astronaut, astronaut_pose):
    mirrored = detector.detect(np.ascontiguousarray(astronaut[:, ::-1]))
    assert len(mirrored) == 1
    width = astronaut.shape[1]
    flipped = mirrored[0].keypoints.copy()
    flipped[:, 0] = width - 1 - flipped[:, 0]
    swap = {"right": "left", "left": "right"}
    # mediapipe's own mirrored run moves the nose by 2.5 px and the shoulders by 10-11 px: the networks are
    # not mirror-symmetric, and the suit hides where the shoulders are.
    tolerance = {"nose": 5, "right_eye": 5, "left_eye": 5, "right_shoulder": 14, "left_shoulder": 14}
    for name, atol in tolerance.items():
        side, _, part = name.partition("_")
        other = f"{swap[side]}_{part}" if part else name  # the mirror's left eye is her right eye
        np.testing.assert_allclose(
            flipped[K[other]], astronaut_pose.keypoints[K[name]], atol=atol, err_msg=name
        )
    # The labels follow the body, not the image: the mirror's right shoulder is still on the image's left.
    assert mirrored[0].keypoints[K["right_shoulder"], 0] < mirrored[0].keypoints[K["left_shoulder"], 0]


def test_non_square_and_pil_input(detector, astronaut, astronaut_pose):
    crop = np.ascontiguousarray(astronaut[40:400, 60:512])  # 452x360: letterboxed top and bottom
    found = detector.detect(Image.fromarray(crop))
    assert len(found) == 1
    # mediapipe on this crop: nose and eyes within 1 px of its numbers; the crop's own ROI moves them by up
    # to 5 px from the full photo's (mediapipe's too), so that comparison is looser.
    for name, xy in MEDIAPIPE_CROP_FACE.items():
        np.testing.assert_allclose(found[0].keypoints[K[name]], xy, atol=1.5, err_msg=name)
        shifted = found[0].keypoints[K[name]] + (60, 40)
        np.testing.assert_allclose(shifted, astronaut_pose.keypoints[K[name]], atol=6, err_msg=name)
    image = pose_control_image(crop, detector)
    assert image.size == (452, 360) and image.mode == "RGB"


def test_no_person_is_a_user_error(detector):
    coffee = data.coffee()
    assert detector.detect(coffee) == []
    with pytest.raises(UserError, match=r"^no person found in the pose image$"):
        pose_control_image(coffee, detector)


def test_thresholds_drop_keypoints(astronaut, astronaut_pose):
    # Visibility: her right elbow 0.76, left elbow 0.33, right wrist 0.32; face and shoulders above 0.99.
    loose = PoseDetector(keypoint_threshold=0.3).detect(astronaut)[0]
    strict = PoseDetector(keypoint_threshold=0.9).detect(astronaut)[0]
    assert visible(loose) == visible(astronaut_pose) | {"left_elbow", "right_wrist"}
    assert visible(strict) == visible(astronaut_pose) - {"right_elbow"}
    assert PoseDetector(detection_threshold=0.9).detect(astronaut) == []


def test_heatmap_refinement_uses_cell_indices_and_a_confidence_gate():
    heatmap = np.full((64, 64, 2), -30.0, np.float32)
    heatmap[20, 30, 0] = 10.0  # a sharp, confident peak at row 20, column 30
    heatmap[20, 30, 1] = -1.0  # a weak one (sigmoid 0.27 < 0.5)
    points = np.array([[31.5 / 64, 21.5 / 64], [31.5 / 64, 21.5 / 64]])
    refined = pose._refine_from_heatmap(points, heatmap)
    np.testing.assert_allclose(refined[0], (30 / 64, 20 / 64), atol=1e-6)  # the cell's index, not its centre
    np.testing.assert_array_equal(refined[1], points[1])  # not confident: left alone
    far = np.array([[50 / 64, 50 / 64], [50 / 64, 50 / 64]])  # the peak is outside the 7x7 window
    np.testing.assert_array_equal(pose._refine_from_heatmap(far, heatmap)[0], far[0])


# --- pose: drawing -----------------------------------------------------------------------------------


def test_skeleton_image_of_the_astronaut(astronaut, astronaut_pose):
    image = pose_control_image(astronaut)
    assert image.size == (512, 512) and image.mode == "RGB"
    arr = np.asarray(image).astype(int)
    lit = arr.sum(axis=2) > 0
    assert 0.005 < lit.mean() < 0.05  # thin limbs on black
    assert not lit[:60].any() and not lit[:, 350:].any()  # nothing above her head or right of her shoulder
    kp = {name: astronaut_pose.keypoints[i] for name, i in K.items()}
    # Neck → right shoulder is limb 0, red at 60%; neck → left shoulder limb 1, orange at 60%.
    for name, colour in (("right_shoulder", (153, 0, 0)), ("left_shoulder", (153, 51, 0))):
        mid = ((kp["neck"] + kp[name]) / 2).astype(int)
        np.testing.assert_array_equal(arr[mid[1], mid[0]], colour, err_msg=name)
    # Joints are full-colour dots: the right shoulder (keypoint 2) orange-yellow, the nose (0) red.
    x, y = kp["right_shoulder"].astype(int)
    np.testing.assert_array_equal(arr[y, x], (255, 170, 0))
    x, y = kp["nose"].astype(int)
    np.testing.assert_array_equal(arr[y, x], (255, 0, 0))
    # Every lit pixel is within a stick's width of the skeleton's keypoints' bounding box.
    ys, xs = np.nonzero(lit)
    pts = astronaut_pose.keypoints[~np.isnan(astronaut_pose.keypoints[:, 0])]
    assert xs.min() >= pts[:, 0].min() - 6 and xs.max() <= pts[:, 0].max() + 6
    assert ys.min() >= pts[:, 1].min() - 6 and ys.max() <= pts[:, 1].max() + 6


def test_draw_openpose_on_hand_made_keypoints():
    keypoints = np.full((18, 2), np.nan)
    keypoints[K["neck"]] = (100, 50)
    keypoints[K["right_shoulder"]] = (60, 50)
    keypoints[K["right_elbow"]] = (60, 120)
    image = draw_openpose([Pose(keypoints, 1.0, np.zeros((33, 5)))], (300, 200))
    assert image.size == (300, 200)
    arr = np.asarray(image).astype(int)
    np.testing.assert_array_equal(arr[50, 80], (153, 0, 0))  # neck → right shoulder, limb 0
    np.testing.assert_array_equal(arr[85, 60], (153, 102, 0))  # right shoulder → elbow, limb 2 (255,170,0)
    np.testing.assert_array_equal(arr[120, 60], (255, 255, 0))  # the elbow's dot, keypoint 3
    np.testing.assert_array_equal(arr[50, 100], (255, 85, 0))  # the neck's dot, keypoint 1
    # Stick width 4: the neck-shoulder limb is 9 px tall at its middle; nothing drawn elsewhere.
    assert (arr[:, 80].sum(axis=1) > 0).sum() == 9
    assert arr[:, 150:].sum() == 0 and arr[130:].sum() == 0
    assert np.asarray(draw_openpose([], (30, 20))).sum() == 0


# --- canny and depth ---------------------------------------------------------------------------------


def test_canny_edges_on_the_astronaut(astronaut):
    import cv2

    image = canny_control_image(astronaut)
    assert image.size == (512, 512) and image.mode == "RGB"
    arr = np.asarray(image)
    assert set(np.unique(arr)) == {0, 255}
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all()
    fraction = (arr[..., 0] == 255).mean()
    assert 0.06 < fraction < 0.13  # 0.090
    blurred = cv2.GaussianBlur(astronaut, (0, 0), 3)
    assert (np.asarray(canny_control_image(blurred))[..., 0] == 255).mean() < fraction / 3
    # Lower thresholds find more edges; PIL input equals the array; grayscale input works.
    assert (np.asarray(canny_control_image(astronaut, 50, 100))[..., 0] == 255).mean() > fraction
    np.testing.assert_array_equal(np.asarray(canny_control_image(Image.fromarray(astronaut))), arr)
    gray = canny_control_image(data.camera())
    assert gray.mode == "RGB" and 0.02 < (np.asarray(gray)[..., 0] == 255).mean() < 0.2
    with pytest.raises(UserError, match="low <= high"):
        canny_control_image(astronaut, 200, 100)


def test_canny_sees_edges_between_colours_of_equal_brightness():
    # Dark red and green of the same luminance (about 60): ControlNet's annotator runs Canny on the RGB
    # image, which finds this edge; Canny on the grayscale image would not.
    image = np.zeros((32, 32, 3), np.uint8)
    image[:, :16] = (200, 0, 0)
    image[:, 16:] = (0, 102, 0)
    edges = np.asarray(canny_control_image(image))[..., 0]
    assert (edges[:, 15:17] == 255).any(axis=1).all()  # one edge down the whole seam
    assert edges[:, :14].sum() == 0 and edges[:, 18:].sum() == 0
    assert np.asarray(canny_control_image(Image.fromarray(image).convert("L"))).sum() == 0


def test_depth_normalisation():
    depth = np.array([[2.0, 4.0, 6.0], [8.0, 10.0, np.nan]])
    arr = np.asarray(depth_control_image(depth))
    assert arr.shape == (2, 3, 3) and (arr[..., 0] == arr[..., 2]).all()
    np.testing.assert_array_equal(arr[..., 0], [[0, 64, 128], [191, 255, 0]])  # min → 0, max → 255, NaN far
    inverted = np.asarray(depth_control_image(depth, invert=True))[..., 0]
    np.testing.assert_array_equal(inverted, [[255, 191, 128], [64, 0, 0]])  # metric depth: near = small
    # A 16-bit PIL image keeps its range; an 8-bit one is stretched to the full range.
    sixteen = Image.fromarray(np.array([[1000, 3000], [5000, 2000]], np.uint16))
    np.testing.assert_array_equal(np.asarray(depth_control_image(sixteen))[..., 0], [[0, 128], [255, 64]])
    eight = Image.fromarray(np.array([[100, 150]], np.uint8))
    np.testing.assert_array_equal(np.asarray(depth_control_image(eight))[..., 0], [[0, 255]])
    with pytest.raises(UserError, match="flat"):
        depth_control_image(np.ones((4, 4)))
    with pytest.raises(UserError, match="one channel"):
        depth_control_image(np.zeros((2, 2, 2)))


# --- models and errors -------------------------------------------------------------------------------


def test_missing_model_files_are_a_user_error(monkeypatch, tmp_path, astronaut):
    monkeypatch.setattr(pose, "mediapipe_models_dir", lambda: tmp_path)
    with pytest.raises(UserError, match=r"pose detection needs .*pip install --no-deps mediapipe==0\.10\.21"):
        PoseDetector().detect(astronaut)


def test_importing_loads_no_runtime():
    code = "import sys, imagegenx.vision.pose, imagegenx.vision.canny; "
    code += "print(sorted(m for m in ('cv2', 'ai_edge_litert', 'mediapipe') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stderr
