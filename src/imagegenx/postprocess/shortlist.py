"""QC of a batch of drafts against a person's selfies, and the shortlist (seed 000's portrait jobs).

The scores are those of the chain's QC step (``postprocess.qc``, from ``vision.quality``): Tenengrad
sharpness, NSFW, the face count, SSIM against a reference image and the dlib identity cosine; the
ranking is the chain's combined score with its SSIM gate. What differs: identity is measured against
a given embedding (the mean over several selfies) instead of the reference image's own face, and
the shortlist can be filled past the gate. Two photos of one face rarely reach SSIM 0.75 (0.4 for
the astronaut and her own mirror image), so a strict gate against a selfie leaves a portrait run
with nothing; filled entries keep ``rank`` ``None`` and ``passed_ssim_gate`` false, so it shows.
A draft without a face scores identity 0.0 with ``faces`` 0.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
from PIL import Image

from imagegenx.postprocess.chain import PostprocessSpec
from imagegenx.postprocess.qc import nsfw_model, score_batch
from imagegenx.postprocess.qc_pool import QcPool
from imagegenx.types import GeneratedImage
from imagegenx.vision.identity import DlibIdentity
from imagegenx.vision.quality import DEFAULT_SSIM_TAU, QcScores


def draft_faces(width: int, height: int) -> DlibIdentity:
    """The face backend QC uses on drafts of this size: portrait faces are big, so drafts of 512 px
    and up are searched without upsampling (4x cheaper)."""
    return DlibIdentity(upsample=0 if min(width, height) >= 512 else 1)


def draft_pool(
    reference: Image.Image, embedding: np.ndarray, width: int, height: int, workers: int | None = None
) -> QcPool:
    """A :class:`QcPool` whose scores equal :func:`score_drafts`' own for drafts of this size; give
    them back to it as ``scores``."""
    return QcPool(
        reference=np.asarray(reference.convert("RGB")),
        reference_embedding=embedding,
        identity=draft_faces(width, height),
        nsfw=nsfw_model(),
        workers=workers,
    )


def score_drafts(
    drafts: Sequence[GeneratedImage],
    reference: Image.Image,
    embedding: np.ndarray,
    *,
    k: int = 15,
    ssim_tau: float = DEFAULT_SSIM_TAU,
    nsfw_max: float | None = None,
    fill: bool = True,
    scores: tuple[list[QcScores], float] | None = None,
) -> tuple[list[GeneratedImage], list[int], int]:
    """The chain's QC step (``postprocess.qc.score_batch``) against the selfies' mean embedding, into
    each draft's ``post["qc"]``. Returns the drafts, the shortlist (indices into ``drafts``, best first:
    those that pass the gates, then with ``fill`` the best of the others by ``score`` up to ``k``) and
    how many drafts passed the gates. ``scores``: what ``draft_pool(...).scores()`` gave for these
    drafts (then only the ranking is done here, and the step's seconds are the workers' per draft)."""
    started = time.perf_counter()
    out = [replace(draft, post={**draft.post}) for draft in drafts]
    spec = PostprocessSpec(qc=True, nsfw_max=nsfw_max)
    score_batch(
        out,
        spec,
        reference,
        [[] for _ in out],
        reference_embedding=embedding,
        identity=draft_faces(out[0].width, out[0].height),
        ssim_tau=ssim_tau,
        scores=scores[0] if scores is not None else None,
    )
    records = [draft.post["qc"] for draft in out]
    ranked = sorted((i for i, qc in enumerate(records) if qc["rank"]), key=lambda i: records[i]["rank"])
    others = [i for i, qc in enumerate(records) if qc["rank"] is None and qc["score"] is not None]
    rest = sorted(others, key=lambda i: -records[i]["score"]) if fill else []
    per_draft = scores[1] if scores is not None else (time.perf_counter() - started) / len(out)
    seconds = round(per_draft, 4)
    for draft in out:
        draft.post["steps"] = [*draft.post.get("steps", []), {"name": "qc", "seconds": seconds}]
    return out, (ranked + rest)[:k], len(ranked)
