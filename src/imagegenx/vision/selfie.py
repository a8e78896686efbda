"""Selfies for identity portraits: decode, find exactly one face, cut it out aligned.

A selfie passes when it decodes as an image (EXIF rotation applied), dlib's detector (run at most
``DETECT_SIDE`` pixels on the long side, upsampled once) finds exactly one face, and that face is at
least ``MIN_FACE_PX`` pixels in the original photo. Each passing selfie keeps its dlib embedding,
its face warped upright into a ``CROP_SIZE``² square (a similarity transform of eyes and nose onto
the ArcFace template, scaled into the middle half of the square, so the crop shows the face with a
margin as a portrait frames it) and five InstantID keypoints in that square.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from imagegenx.types import ControlRef, IdentityRef, UserError
from imagegenx.vision.identity import ARCFACE_TEMPLATE, DlibIdentity, arcface_points, umeyama
from imagegenx.vision.imagefile import ImageRejected, decode_image

__all__ = ["Selfie", "SelfieError", "aligned_crop", "instantid_refs", "keypoint_image", "read_selfie"]

RANDOM_ARCFACE = "random:arcface"  # tests with random InstantID parts: see random_arcface_embedding
MIN_FACE_PX = 64
MAX_SELFIE_PIXELS = 64 * 1024 * 1024
DETECT_SIDE = 1280
CROP_SIZE = 512
CROP_MARGIN = 0.5  # of the template's size on each side: the face fills the middle half of the crop


class SelfieError(UserError):
    """Bad selfies: ``problems`` holds ``(file name, reason)`` for each of them."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{name}: {reason}" for name, reason in problems))


@dataclass(frozen=True)
class Selfie:
    name: str
    size: tuple[int, int]
    box: tuple[int, int, int, int]  # the face, in the selfie's pixels
    score: float  # dlib's detection score
    embedding: np.ndarray  # dlib 128-d
    crop: Image.Image  # CROP_SIZE² aligned face with margin
    keypoints: np.ndarray  # (5, 2) eyes, nose, mouth corners in crop pixels (InstantID order)

    def status(self) -> dict[str, Any]:
        return {
            "file": self.name,
            "status": "ok",
            "size": list(self.size),
            "face_box": list(self.box),
            "face_px": min(self.box[2] - self.box[0], self.box[3] - self.box[1]),
            "detector_score": round(self.score, 3),
        }


def read_selfie(name: str, data: bytes, detector: DlibIdentity) -> Selfie:
    """One selfie, or ``UserError`` with the reason (without the file name)."""
    try:
        rgb = decode_image(data, "the selfie", max_pixels=MAX_SELFIE_PIXELS, exif_transpose=True)
    except ImageRejected as exc:
        raise UserError(exc.reason) from None
    scale = min(1.0, DETECT_SIDE / max(rgb.size))
    small = rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.Resampling.BOX)
    found = detector.faces(np.asarray(small))
    if not found:
        raise UserError(f"no face found (a frontal face of at least {MIN_FACE_PX} px is needed)")
    if len(found) > 1:
        raise UserError(f"several faces ({len(found)}); one face per selfie")
    face = found[0]
    left, top, right, bottom = (round(v / scale) for v in face.box)
    box = (left, top, right, bottom)
    side = min(box[2] - box[0], box[3] - box[1])
    if side < MIN_FACE_PX:
        raise UserError(f"face too small ({side} px; at least {MIN_FACE_PX})")
    crop, keypoints = aligned_crop(np.asarray(rgb), face.landmarks / scale)
    return Selfie(name, rgb.size, box, face.score, face.embedding, crop, keypoints)


def aligned_crop(rgb: np.ndarray, landmarks: np.ndarray) -> tuple[Image.Image, np.ndarray]:
    """The face warped upright into a CROP_SIZE² square (the ArcFace template in its middle half) and
    the 5 InstantID keypoints in it (eyes and nose from dlib; mouth corners from the template)."""
    import cv2

    inner = CROP_SIZE / (1 + 2 * CROP_MARGIN)
    template = ARCFACE_TEMPLATE / 112 * inner + CROP_MARGIN * inner
    points = arcface_points(landmarks)
    m = umeyama(points, template[:3])
    shrink = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))
    if shrink < 0.5:  # a big face: area-downscale first, so the warp does not alias
        size = (max(1, round(rgb.shape[1] * shrink)), max(1, round(rgb.shape[0] * shrink)))
        points = points * np.array([size[0] / rgb.shape[1], size[1] / rgb.shape[0]])
        rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BOX))
        m = umeyama(points, template[:3])
    crop = cv2.warpAffine(
        rgb, m, (CROP_SIZE, CROP_SIZE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )
    keypoints = np.vstack([points @ m[:, :2].T + m[:, 2], template[3:]])
    return Image.fromarray(crop), keypoints


def keypoint_image(keypoints: np.ndarray, width: int, height: int) -> Image.Image:
    """InstantID's keypoint image: the crop's keypoints scaled into the middle square of the draft."""
    from imagegenx.vision.keypoints import draw_face_keypoints

    side = min(width, height)
    points = keypoints * (side / CROP_SIZE) + np.array([(width - side) / 2, (height - side) / 2])
    return draw_face_keypoints(points, (width, height))


def random_arcface_embedding(dlib_embedding: np.ndarray) -> np.ndarray:
    """``random:arcface``, for tests with random InstantID parts only: the 128-d dlib embedding through
    a fixed random 128→512 projection. It keeps "same face, similar vector" but is NOT ArcFace: real
    InstantID weights need a real ArcFace model's embedding."""
    projection = np.random.default_rng(0).normal(size=(len(dlib_embedding), 512)) / np.sqrt(
        len(dlib_embedding)
    )
    return np.asarray(dlib_embedding, dtype=np.float64) @ projection * 20.0  # ArcFace-like magnitude


def instantid_refs(
    selfies: list[Selfie],
    arcface: str,
    adapter: str,
    identitynet: str,
    scale: float,
    size: tuple[int, int],
) -> tuple[IdentityRef, ControlRef]:
    """InstantID for drafts of ``size``: the raw mean ArcFace embedding of the selfies' crops (InstantID
    was trained on raw, not normalised, embeddings) and IdentityNet on the first selfie's keypoints;
    ``scale`` is both the identity attention scale and IdentityNet's strength."""
    from imagegenx.vision.identity import ArcFaceOnnx

    if arcface == RANDOM_ARCFACE:
        embeddings = [random_arcface_embedding(selfie.embedding) for selfie in selfies]
    else:
        model, embeddings = ArcFaceOnnx(arcface), []
        for selfie in selfies:
            found = model.embed(np.asarray(selfie.crop))
            if found is None:
                raise SelfieError([(selfie.name, "the ArcFace detector found no face in the aligned crop")])
            embeddings.append(found)
    buffer = io.BytesIO()
    keypoint_image(selfies[0].keypoints, *size).save(buffer, "PNG")
    mean = tuple(float(v) for v in np.mean(embeddings, axis=0))
    return IdentityRef(adapter, mean, scale, identitynet=identitynet), ControlRef(
        identitynet, buffer.getvalue(), scale
    )
