"""The chain's quality-control step: score every image of a batch, rank them, apply the NSFW gate.

Scores (``vision.quality``): Tenengrad sharpness, Open-NSFW probability, optional BRISQUE; with a
reference image also SSIM against it and the identity cosine of the best face (dlib ResNet). The
face count comes from the chain's detection pass when it ran (no second detection for it).
The batch is ranked by the combined score (identity first, sharpness as tie-breaker; SSIM below
τ = 0.75 drops an image from the ranking); ``post["qc"]`` keeps every score, the combined score and
the rank (1 = best, ``None`` = failed a gate). An image above ``nsfw_max`` gets ``post["error"]``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from imagegenx.postprocess.encode import to_pil
from imagegenx.types import GeneratedImage, UserError
from imagegenx.vision.quality import DEFAULT_SSIM_TAU, QcScores, combined_scores, qc_batch

if TYPE_CHECKING:
    from imagegenx.postprocess.chain import PostprocessSpec
    from imagegenx.vision.nsfw import NsfwClassifier


@functools.cache
def nsfw_model() -> NsfwClassifier:
    """The process's NSFW classifier (loaded on first use; ``QcPool`` shares it)."""
    from imagegenx.vision.nsfw import NsfwClassifier

    return NsfwClassifier()


@functools.cache
def _identity() -> Any:
    from imagegenx.vision.identity import DlibIdentity

    return DlibIdentity()


def score_batch(
    images: Sequence[GeneratedImage],
    spec: PostprocessSpec,
    reference: Image.Image | None,
    detections: Sequence[Sequence[Any]],
    *,
    reference_embedding: np.ndarray | None = None,
    identity: Any = None,
    ssim_tau: float = DEFAULT_SSIM_TAU,
    scores: Sequence[QcScores] | None = None,
) -> None:
    """Fill ``post["qc"]`` of each image (in place) and withhold those over the NSFW limit.

    ``reference_embedding`` replaces the reference image's own face as the identity to compare with
    (a portrait's mean over several selfies); ``identity`` replaces the default face backend.
    Besides the scores, the record holds ``combined`` (with the SSIM gate; ``None`` = gated),
    ``score`` (the same without the SSIM gate), ``passed_ssim_gate`` and ``rank``.
    ``scores`` are the images' scores computed already (``QcPool``, over the same arguments): only
    the ranking and the records are left to do.
    """
    if scores is None:
        scores = _scores(images, spec, reference, reference_embedding, identity or _identity())
    if any(detections):
        scores = [
            s if s.faces is not None else replace(s, faces=sum(d.kind == "face" for d in found))
            for s, found in zip(scores, detections, strict=True)
        ]
    # 3. Rank the batch: best combined score first; gated images get no rank.
    combined = combined_scores(scores, ssim_tau, nsfw_max=spec.nsfw_max)
    ungated = combined_scores(scores, float("-inf"), nsfw_max=spec.nsfw_max)
    order = sorted((i for i, c in enumerate(combined) if c is not None), key=lambda i: -combined[i])
    ranks = {i: rank for rank, i in enumerate(order, start=1)}
    for i, (image, s) in enumerate(zip(images, scores, strict=True)):
        record = {k: _round(v) for k, v in s.as_dict().items()}
        image.post["qc"] = record | {
            "rank": ranks.get(i),
            "combined": _round(combined[i]),
            "score": _round(ungated[i]),
            "passed_ssim_gate": s.ssim is None or s.ssim >= ssim_tau,
        }
        # 4. The NSFW gate (the limit comes from the key's tier).
        if spec.nsfw_max is not None and s.nsfw is not None and s.nsfw > spec.nsfw_max:
            image.post["error"] = (
                f"image withheld: NSFW probability {s.nsfw:.2f} is above this tier's limit {spec.nsfw_max:g}"
            )


def _scores(
    images: Sequence[GeneratedImage],
    spec: PostprocessSpec,
    reference: Image.Image | None,
    reference_embedding: np.ndarray | None,
    faces: Any,
) -> list[QcScores]:
    # 1. The identity to compare with, when there is a reference.
    ref_pixels = np.asarray(reference.convert("RGB")) if reference is not None else None
    if reference_embedding is None and ref_pixels is not None:
        reference_embedding = faces.embed(ref_pixels)
        if reference_embedding is None:
            raise UserError("no face found in the reference image: identity cannot be scored")
    # 2. Every score of every image (one batched NSFW call).
    extra = {"brisque": True} if spec.brisque else {}
    return qc_batch(
        [np.asarray(to_pil(image)) for image in images],
        reference=ref_pixels,
        reference_embedding=reference_embedding,
        identity=faces if reference_embedding is not None else None,
        nsfw=nsfw_model(),
        **extra,
    )


def _round(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value
