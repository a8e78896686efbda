"""Decoding image bytes that a user sent us: the one place where untrusted images are opened.

Every route and step that reads an uploaded or fetched image calls ``decode_image``, so the limits
hold everywhere:

1. a byte cap before anything is parsed;
2. a format allow-list (PNG, JPEG, WebP), passed to
   ``Image.open(formats=...)`` so Pillow never even tries its other, rarely used decoders;
3. a pixel cap read from the header *before* the pixels are decoded, so a small file that claims
   65535x65535 pixels (a decompression bomb) is refused without allocating them;
4. a full decode (``load``), so a truncated or corrupt file is refused here, with a reason, rather
   than failing a task later; only the first frame of an animation is read.

Anything Pillow raises while parsing hostile bytes becomes a ``UserError`` (a 4xx): Pillow's own
fuzz harness (Tests/oss-fuzz) catches ``Exception`` for the same reason, since its decoders raise
OSError, SyntaxError, ValueError, EOFError, struct.error and others on corrupt input.
"""

from __future__ import annotations

import io

from PIL import Image, ImageOps

from imagegenx.types import UserError

__all__ = [
    "ALLOWED_FORMATS",
    "IN_PROCESS_FORMATS",
    "MAX_IMAGE_BYTES",
    "MAX_PIXELS",
    "ImageRejected",
    "decode_image",
    "encode_in_process",
]

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")  # JPEG also opens phones' multi-picture (MPO) files
# What the engine also reads: the raw pixels (PPM/PGM) that the post-processing passes hand it (a
# refine, a hires or a face-fix job of an image just made). A 1024² image encodes in under 1 ms where
# a PNG took 45-100 ms (scripts/pass_images_cpu.py), ten of them in a row before a portrait's refine
# batch could start. Uploads are
# checked against ALLOWED_FORMATS at the API before they reach the engine.
IN_PROCESS_FORMATS = (*ALLOWED_FORMATS, "PPM")
MAX_PIXELS = 4096 * 4096
MAX_IMAGE_BYTES = 32 * 1024 * 1024


class ImageRejected(UserError):
    """Bytes that ``decode_image`` refused; ``reason`` is the message without the image's name."""

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(f"{what} is {reason}")
        self.reason = reason


def decode_image(
    data: bytes,
    what: str = "the image",
    *,
    mode: str | None = "RGB",
    max_pixels: int = MAX_PIXELS,
    max_bytes: int = MAX_IMAGE_BYTES,
    exif_transpose: bool = False,
    formats: tuple[str, ...] = ALLOWED_FORMATS,
) -> Image.Image:
    """``data`` decoded and converted to ``mode`` (``None``: as stored, e.g. 16-bit depth), or
    ``ImageRejected`` (a ``UserError``) with the reason.

    ``exif_transpose`` turns a photo upright as its camera recorded (selfies); ``formats``: the
    decoders Pillow may use (``IN_PROCESS_FORMATS`` only where the bytes were checked before).
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ImageRejected(what, "not image bytes")
    if len(data) > max_bytes:
        raise ImageRejected(what, f"larger than {max_bytes} bytes")
    if not data:
        raise ImageRejected(what, "empty")
    try:
        with Image.open(io.BytesIO(data), formats=formats) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageRejected(what, f"too large ({width}x{height}; at most {max_pixels} pixels)")
            img.load()
            if exif_transpose:
                img = ImageOps.exif_transpose(img)
            return img.convert(mode) if mode else img.copy()
    except ImageRejected:
        raise
    except Image.DecompressionBombError:  # Pillow's own cap, hit while opening headers past 2 x 89 M pixels
        raise ImageRejected(what, f"too large (at most {max_pixels} pixels)") from None
    except Image.UnidentifiedImageError:
        raise ImageRejected(what, "not a readable image") from None  # or not PNG, JPEG or WebP
    except Exception as exc:
        raise ImageRejected(what, f"not a readable image ({type(exc).__name__}: {exc})"[:300]) from None


def encode_in_process(image: Image.Image) -> bytes:
    """``image`` (RGB or L) as PPM/PGM bytes: lossless and nearly free, for a job that never leaves
    the process (the engine reads them: ``IN_PROCESS_FORMATS``)."""
    buffer = io.BytesIO()
    image.save(buffer, "PPM")
    return buffer.getvalue()
