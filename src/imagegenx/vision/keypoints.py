"""InstantID's face-keypoint image, the control image IdentityNet follows.

InstantID draws five face points (two eyes, nose tip, two mouth corners, InsightFace's order) as
coloured sticks from each point to the nose at 60% brightness, then a disc of radius 10 on each
point, on black. Our face detector (mediapipe's BlazeFace, ``vision.detect``) gives the eyes, the nose
tip and the mouth centre; the mouth corners are placed on the eye line's direction through the mouth
centre, 0.445 eye-distances to each side (FFHQ's template: mouth width = 0.89 × eye distance).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]
LIMBS = [(0, 2), (1, 2), (3, 2), (4, 2)]  # every point to the nose
STICK_WIDTH = 4
MOUTH_HALF_WIDTH = 0.445  # of the eye distance


def five_points(blazeface: np.ndarray) -> np.ndarray:
    """BlazeFace's 6 keypoints → InstantID's 5: eye, eye, nose tip, mouth corner, mouth corner (image
    left to right for the pairs, as InsightFace orders them)."""
    left_eye, right_eye, nose, mouth = (np.asarray(blazeface[i], dtype=np.float64) for i in range(4))
    half = MOUTH_HALF_WIDTH * (right_eye - left_eye)
    return np.stack([left_eye, right_eye, nose, mouth - half, mouth + half])


def draw_face_keypoints(points: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """The (5, 2) points drawn as InstantID's ``draw_kps`` does, on a black ``size`` (w, h) image."""
    import cv2

    width, height = size
    canvas = np.zeros((height, width, 3), np.uint8)
    for a, b in LIMBS:
        (x0, y0), (x1, y1) = points[a], points[b]
        length = math.hypot(x0 - x1, y0 - y1)
        angle = math.degrees(math.atan2(y0 - y1, x0 - x1))
        centre = (round((x0 + x1) / 2), round((y0 + y1) / 2))
        polygon = cv2.ellipse2Poly(centre, (round(length / 2), STICK_WIDTH), round(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, COLOURS[a])
    canvas = (canvas * 0.6).astype(np.uint8)
    for (x, y), colour in zip(points, COLOURS, strict=True):
        cv2.circle(canvas, (round(x), round(y)), 10, colour, -1)
    return Image.fromarray(canvas)
