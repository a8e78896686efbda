"""A finished image as result blobs: the original in the task's format, and WebP thumbnails."""

from __future__ import annotations

from PIL import Image

from imagegenx.engine.service import result_key
from imagegenx.postprocess.encode import ImageFormat, encode_image, encode_pil, to_pil
from imagegenx.storage.blobs import BlobStore
from imagegenx.types import GeneratedImage

__all__ = ["THUMBNAILS", "store_images"]

THUMBNAILS = (512, 256)


def store_images(
    blobs: BlobStore, task_id: str, image: GeneratedImage, fmt_name: str, embed_metadata: bool
) -> dict[str, str]:
    """Encode and write the image and its thumbnails (fixed keys, so a retry overwrites); returns
    the blob key of each ("original", "512", "256"). Raises ``BlobWriteError`` if a write fails."""
    fmt = ImageFormat.parse(fmt_name)
    results = {"original": result_key(task_id, "original", fmt.extension)}
    original = encode_image(image, fmt, embed_metadata=embed_metadata)
    blobs.put(results["original"], original)
    pil = to_pil(image)
    for side in THUMBNAILS:
        results[str(side)] = result_key(task_id, str(side), ".webp")
        if fmt is ImageFormat.WEBP and max(pil.size) <= side:
            # Nothing to shrink, and the original is WebP already: encoding the same pixels again
            # cost as much as the original (a 512² image's "512" was ~45% of its storing CPU).
            blobs.put(results[str(side)], original)
            continue
        thumb = pil.copy()
        thumb.thumbnail((side, side), Image.Resampling.LANCZOS)
        blobs.put(results[str(side)], encode_pil(thumb, ImageFormat.WEBP, quality=85))
    return results
