"""InstantID's keypoint image from a real face's detection."""

import numpy as np
from skimage import data

from imagegenx.vision.detect import MediapipeDetector
from imagegenx.vision.keypoints import COLOURS, draw_face_keypoints, five_points


def test_keypoint_image_of_the_astronaut():
    photo = data.astronaut()
    [face] = [d for d in MediapipeDetector().detect(photo) if d.kind == "face"]
    points = five_points(face.keypoints)
    left, top, right, bottom = face.box
    assert all(left <= x <= right and top <= y <= bottom for x, y in points)  # all on the face
    assert points[3][0] < points[2][0] < points[4][0]  # mouth corners either side of the nose
    assert np.isclose(np.linalg.norm(points[4] - points[3]), 0.89 * np.linalg.norm(points[1] - points[0]))
    image = np.asarray(draw_face_keypoints(points, (512, 512)))
    assert image.shape == (512, 512, 3)
    assert image[:, : left - 12].max() == 0 and image[bottom + 12 :].max() == 0  # black off the face
    for (x, y), colour in zip(points.round().astype(int), COLOURS, strict=True):
        assert tuple(image[y, x]) == colour  # a full-colour disc on each point
    nose_to_eye = image[int((points[0][1] + points[2][1]) / 2), int((points[0][0] + points[2][0]) / 2)]
    assert tuple(nose_to_eye) == tuple(int(c * 0.6) for c in COLOURS[0])  # the stick at 60%
