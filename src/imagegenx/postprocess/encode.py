"""Encode finished images as WebP, PNG, JPEG or AVIF with A1111-compatible generation metadata.

The "parameters" text follows AUTOMATIC1111's ``create_infotext`` layout so that A1111's
"PNG Info" tab, Civitai and other readers recognise it:

    a cat in a hat, <lora:film_grain:0.8>
    Negative prompt: blurry
    Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7.0, Seed: 7, Size: 1024x1024, Model: sdxl, ...

PNG stores it in a ``parameters`` text chunk; JPEG, WebP and AVIF store it as EXIF UserComment
(tag 0x9286) with the 8-byte ``UNICODE\\0`` prefix and UTF-16 big-endian text, which is what A1111
writes through ``piexif.helper.UserComment.dump(text, encoding="unicode")``.
"""

from __future__ import annotations

import io
import json
from enum import StrEnum
from typing import Any

from PIL import ExifTags, Image, PngImagePlugin, UnidentifiedImageError

from imagegenx import __version__
from imagegenx.types import GeneratedImage, Task, UserError

EXIF_USER_COMMENT = 0x9286
_UNICODE_PREFIX = b"UNICODE\x00"
_ASCII_PREFIX = b"ASCII\x00\x00\x00"
_PNG_TEXT_KEY = "parameters"
_DENOISING_TASKS = (Task.IMG2IMG, Task.INPAINT)


class ImageFormat(StrEnum):
    """Output formats. ``ImageFormat("JPG")`` and ``ImageFormat.parse(" .Png ")`` both work."""

    WEBP = "webp"
    PNG = "png"
    JPEG = "jpeg"
    AVIF = "avif"

    @property
    def extension(self) -> str:
        return ".jpg" if self is ImageFormat.JPEG else f".{self.value}"

    @property
    def mime_type(self) -> str:
        return f"image/{self.value}"

    @classmethod
    def parse(cls, name: str | ImageFormat) -> ImageFormat:
        """Parse a user string case-insensitively ("jpg" and a leading dot accepted)."""
        return cls(name)

    @classmethod
    def _missing_(cls, value: object) -> ImageFormat:
        name = str(value).strip().lower().removeprefix(".")
        name = "jpeg" if name == "jpg" else name
        for member in cls:
            if member.value == name:
                return member
        allowed = ", ".join(m.value for m in cls)
        raise UserError(f"unknown image format {value!r}; choose one of: {allowed} (or jpg)")


DEFAULT_FORMAT = ImageFormat.WEBP
DEFAULT_QUALITY = {ImageFormat.JPEG: 95, ImageFormat.WEBP: 90, ImageFormat.AVIF: 80}
# libwebp's effort (0-6; Pillow's default is 4). A 1024² photo at quality 90 on one core: 137 ms at 4,
# 59 ms at 2, for a file 2.4% larger; the encode is on every image's path to the user.
WEBP_METHOD = 2
# zlib's effort for PNG (0-9; Pillow's default is 6). The 512² astronaut photo on one core: 68 ms at
# 6, 27 ms at 3, for a file 8% larger (448 against 414 KiB); still lossless.
PNG_COMPRESS_LEVEL = 3
# libavif's speed (0-10; Pillow's default is 6). The same photo at quality 80: 115 ms at the default,
# 42 ms at 8, for a file 2.5% larger.
AVIF_SPEED = 8
_PIL_FORMAT = {
    ImageFormat.WEBP: "WEBP",
    ImageFormat.PNG: "PNG",
    ImageFormat.JPEG: "JPEG",
    ImageFormat.AVIF: "AVIF",
}


def to_pil(image: GeneratedImage) -> Image.Image:
    """The image as a Pillow RGB image of ``image.width`` × ``image.height``."""
    expected = image.width * image.height * 3
    if len(image.rgb) != expected:
        raise ValueError(
            f"rgb has {len(image.rgb)} bytes, expected {expected} for {image.width}x{image.height} RGB"
        )
    return Image.frombytes("RGB", (image.width, image.height), image.rgb)


def _quote(value: object) -> str:
    """A1111's ``infotext_utils.quote``: JSON-quote values that contain ',', ':' or a newline."""
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _prompt_with_loras(image: GeneratedImage) -> str:
    """The prompt plus one ``<lora:name:weight>`` tag per LoRA, as A1111 prompts carry them."""
    prompt = image.job.prompt
    tags = [
        f"<lora:{lora.name}:{lora.weight:g}>"
        for lora in image.job.loras
        if f"<lora:{lora.name}:" not in prompt  # the user already wrote the tag
    ]
    return ", ".join(part for part in (prompt, *tags) if part)


def a1111_parameters(image: GeneratedImage) -> str:
    """The A1111 "parameters" infotext; field order and omissions follow ``create_infotext``."""
    job = image.job
    fields: dict[str, object | None] = {
        "Steps": job.steps,
        "Sampler": job.scheduler.a1111_name,
        "CFG scale": job.guidance_scale,
        "Seed": job.seed,
        "Size": f"{image.width}x{image.height}",
        "Model": image.model_name,
        "Denoising strength": job.strength if job.task in _DENOISING_TASKS else None,
        "Clip skip": job.clip_skip if job.clip_skip > 1 else None,
    }
    settings = ", ".join(f"{key}: {_quote(value)}" for key, value in fields.items() if value is not None)
    negative = job.effective_negative_prompt
    negative_line = f"\nNegative prompt: {negative}" if negative else ""
    return f"{_prompt_with_loras(image)}{negative_line}\n{settings}".strip()


def image_metadata(image: GeneratedImage) -> dict[str, Any]:
    """A JSON-able description of how the image was made (for API responses and sidecar files)."""
    job = image.job
    timings = image.timings
    record: dict[str, Any] = {
        "prompt": job.prompt,
        "negative_prompt": job.effective_negative_prompt,
        "seed": job.seed,
        "steps": job.steps,
        "guidance_scale": job.guidance_scale,
        "scheduler": job.scheduler.value,
        "sampler": job.scheduler.a1111_name,
        "width": image.width,
        "height": image.height,
        "model": image.model_name,
        "loras": [{"name": lora.name, "weight": lora.weight} for lora in job.loras],
        "clip_skip": job.clip_skip,
        "task": job.task.value,
    }
    if job.task in _DENOISING_TASKS:
        record["strength"] = job.strength
    if job.controls:
        record["controls"] = [{"model": c.model, "strength": c.strength} for c in job.controls]
    if job.decoder != "full":
        record["decoder"] = job.decoder
    record["batch_size"] = image.batch_size
    record["timings"] = {
        "queued_s": round(timings.queued_s, 3),
        "encode_prompt_s": round(timings.encode_prompt_s, 3),
        "denoise_s": round(timings.denoise_s, 3),
        "decode_s": round(timings.decode_s, 3),
        "total_s": round(timings.total_s, 3),
    }
    steps = image.post.get("steps", [])
    record["postprocess"] = [step["name"] for step in steps]
    if steps:
        record["postprocess_seconds"] = {step["name"]: step["seconds"] for step in steps}
    for key in ("hires", "detections", "qc", "refine", "fixed"):  # what the chain recorded
        if key in image.post:
            record[key] = image.post[key]
    record["parameters"] = a1111_parameters(image)
    record["imagegenx_version"] = __version__
    return record


def _user_comment_exif(text: str) -> bytes:
    """EXIF bytes holding ``text`` as UserComment, byte for byte what A1111 writes via piexif."""
    exif = Image.Exif()
    exif.endian = ">"  # big-endian TIFF like piexif, so the UTF-16BE text matches the byte order
    exif.get_ifd(ExifTags.IFD.Exif)[EXIF_USER_COMMENT] = _UNICODE_PREFIX + text.encode("utf-16-be")
    return exif.tobytes()  # bytes, not Exif: Pillow's AVIF writer skips an Exif with an empty IFD0


def encode_image(
    image: GeneratedImage,
    fmt: ImageFormat = DEFAULT_FORMAT,
    *,
    embed_metadata: bool = True,
    quality: int | None = None,
) -> bytes:
    """Encode ``image`` as ``fmt``; ``quality`` (1-100) applies to the lossy formats only.

    Defaults: JPEG 95, WebP 90 (quality 100 means lossless WebP), AVIF 80; PNG is always lossless.
    """
    fmt = ImageFormat.parse(fmt)
    options = _save_options(fmt, quality)
    if embed_metadata and fmt is ImageFormat.PNG:
        info = PngImagePlugin.PngInfo()
        info.add_text(_PNG_TEXT_KEY, a1111_parameters(image))  # tEXt, or iTXt beyond Latin-1
        options["pnginfo"] = info
    elif embed_metadata:
        options["exif"] = _user_comment_exif(a1111_parameters(image))
    return _save(to_pil(image), fmt, options)


def encode_pil(image: Image.Image, fmt: ImageFormat = DEFAULT_FORMAT, *, quality: int | None = None) -> bytes:
    """A Pillow image (a thumbnail, a contact sheet, a peer's output) encoded with the same settings as
    ``encode_image``, without metadata."""
    fmt = ImageFormat.parse(fmt)
    return _save(image, fmt, _save_options(fmt, quality))


def _save_options(fmt: ImageFormat, quality: int | None) -> dict[str, Any]:
    if quality is not None and not 1 <= quality <= 100:
        raise UserError(f"quality must be between 1 and 100, got {quality}")
    if fmt is ImageFormat.PNG:
        return {"compress_level": PNG_COMPRESS_LEVEL}
    options: dict[str, Any] = {"quality": DEFAULT_QUALITY[fmt] if quality is None else quality}
    if fmt is ImageFormat.WEBP:
        options["method"] = WEBP_METHOD
        options["lossless"] = options["quality"] == 100
    if fmt is ImageFormat.AVIF:
        options["speed"] = AVIF_SPEED
    return options


def _save(image: Image.Image, fmt: ImageFormat, options: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=_PIL_FORMAT[fmt], **options)
    return buffer.getvalue()


def _decode_user_comment(value: bytes | str, endian: str | None) -> str:
    """Inverse of ``piexif.helper.UserComment.dump``, tolerant of little-endian writers."""
    if isinstance(value, str):
        return value
    prefix, body = value[:8], value[8:]
    if prefix == _UNICODE_PREFIX:
        return body.decode("utf-16-le" if endian == "<" else "utf-16-be", errors="replace")
    if prefix == _ASCII_PREFIX:
        return body.decode("ascii", errors="replace")
    return value.decode("utf-8", errors="ignore")  # A1111's fallback for unprefixed comments


def read_parameters(data: bytes) -> str | None:
    """The A1111 parameters embedded in an encoded image, or None when there are none."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if isinstance(im, PngImagePlugin.PngImageFile):
                text = im.text.get(_PNG_TEXT_KEY)
                if text is not None:
                    return str(text)
            exif = im.getexif()
            comment = exif.get_ifd(ExifTags.IFD.Exif).get(EXIF_USER_COMMENT)
            return None if comment is None else _decode_user_comment(comment, exif.endian)
    except UnidentifiedImageError as exc:
        raise UserError("not an image in a format Pillow can read") from exc
