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
from typing import Any

import numpy as np
from PIL import Image

from imagegenx.postprocess.encode import to_pil
from imagegenx.postprocess.qc import _nsfw  # one NSFW session per process, shared with the chain
from imagegenx.types import GeneratedImage
from imagegenx.vision.identity import DlibIdentity
from imagegenx.vision.quality import DEFAULT_SSIM_TAU, combined_scores, qc_batch


def score_drafts(
    drafts: Sequence[GeneratedImage],
    reference: Image.Image,
    embedding: np.ndarray,
    *,
    k: int = 15,
    ssim_tau: float = DEFAULT_SSIM_TAU,
    nsfw_max: float | None = None,
    fill: bool = True,
) -> tuple[list[GeneratedImage], list[int], int]:
    """QC into each draft's ``post["qc"]``: the chain's record (scores, ``combined``, ``rank``) plus
    ``score`` (the combined score without the SSIM gate) and ``passed_ssim_gate``. Returns the drafts,
    the shortlist (indices into ``drafts``, best first: those that pass the gates, then with ``fill``
    the best of the others up to ``k``) and how many drafts passed the gates."""
    started = time.perf_counter()
    width, height = drafts[0].width, drafts[0].height
    ref = np.asarray(reference.convert("RGB").resize((width, height), Image.Resampling.BOX))
    faces = DlibIdentity(upsample=0 if min(width, height) >= 512 else 1)  # portrait faces are big
    pixels = [np.asarray(to_pil(d)) for d in drafts]
    scores = qc_batch(pixels, reference=ref, reference_embedding=embedding, identity=faces, nsfw=_nsfw())
    gated = combined_scores(scores, ssim_tau, nsfw_max=nsfw_max)
    ungated = combined_scores(scores, float("-inf"), nsfw_max=nsfw_max)
    ranked = sorted((i for i, c in enumerate(gated) if c is not None), key=lambda i: -gated[i])  # type: ignore[operator]
    rest = [i for i in sorted(range(len(drafts)), key=lambda i: -(ungated[i] or 0)) if gated[i] is None]
    rest = [i for i in rest if ungated[i] is not None] if fill else []
    shortlist = (ranked + rest)[:k]
    ranks = {i: rank for rank, i in enumerate(ranked, start=1)}
    seconds = round((time.perf_counter() - started) / len(drafts), 4)
    out = []
    for i, (draft, s) in enumerate(zip(drafts, scores, strict=True)):
        qc = {name: _round(value) for name, value in s.as_dict().items()} | {"rank": ranks.get(i)}
        qc |= {"combined": _round(gated[i]), "score": _round(ungated[i])}
        qc["passed_ssim_gate"] = s.ssim is None or s.ssim >= ssim_tau
        steps = [*draft.post.get("steps", []), {"name": "qc", "seconds": seconds}]
        post = {**draft.post, "qc": qc, "steps": steps}
        if nsfw_max is not None and s.nsfw is not None and s.nsfw > nsfw_max:
            post["error"] = f"withheld: NSFW probability {s.nsfw:.2f} is above {nsfw_max:g}"
        out.append(replace(draft, post=post))
    return out, shortlist, len(ranked)


def _round(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value
