"""What a portrait run reports about its drafts: the contact sheet of all of them, labelled, and
one entry each for ``report.json``."""

from __future__ import annotations

from PIL import Image

from imagegenx.postprocess.contact_sheet import contact_sheet
from imagegenx.postprocess.encode import to_pil
from imagegenx.types import GeneratedImage


def draft_sheet(results: list[GeneratedImage | Exception], shortlist: list[int]) -> Image.Image:
    """Every draft labelled "#rank combined score", or "gate score" when the SSIM gate dropped it
    (score without the gate), "withheld" (NSFW) or "failed"; the shortlisted ones outlined."""
    thumbs, labels = [], []
    for r in results:
        if isinstance(r, Exception):
            thumbs.append(None)
            labels.append("failed")
            continue
        qc = r.post["qc"]
        thumbs.append(to_pil(r))
        gated = f"gate {qc['score']:.3f}" if qc["score"] is not None else "withheld"
        labels.append(f"#{qc['rank']} {qc['combined']:.3f}" if qc["rank"] else gated)
    return contact_sheet(thumbs, labels, set(shortlist))


def draft_entries(results: list[GeneratedImage | Exception], shortlist: list[int], seed: int) -> list[dict]:
    position = {i: p for p, i in enumerate(shortlist, start=1)}
    entries: list[dict] = []
    for i, r in enumerate(results):
        if isinstance(r, Exception):
            entries.append({"seed": seed + i, "error": str(r)})
            continue
        timing = {"denoise_s": round(r.timings.denoise_s, 3), "batch_size": r.batch_size}
        entries.append(
            {"seed": r.job.seed, "qc": r.post["qc"], "shortlist_position": position.get(i)} | timing
        )
    return entries
