"""Output encoding: formats, pixels, and A1111-compatible metadata round trips."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import ExifTags, Image

import imagegenx
from imagegenx.postprocess.encode import (
    DEFAULT_FORMAT,
    EXIF_USER_COMMENT,
    ImageFormat,
    a1111_parameters,
    encode_image,
    image_metadata,
    read_parameters,
    to_pil,
)
from imagegenx.types import (
    DEFAULT_NEGATIVE_PROMPT,
    GeneratedImage,
    JobSpec,
    LoraRef,
    SchedulerName,
    Task,
    Timings,
    UserError,
)

WIDTH, HEIGHT = 64, 48  # not square, so a width/height swap shows


def _gradient() -> np.ndarray:
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    return np.stack([x * 255 // (WIDTH - 1), y * 255 // (HEIGHT - 1), (x + y) * 2], axis=-1).astype(np.uint8)


def _image(**job_fields) -> GeneratedImage:
    fields = {
        "prompt": "a cat in a hat",
        "model": "sdxl-base",
        "negative_prompt": "blurry, lowres",
        "width": WIDTH,
        "height": HEIGHT,
        "steps": 30,
        "guidance_scale": 7.0,
        "scheduler": SchedulerName.DPMPP_2M_KARRAS,
        "seed": 7,
        "clip_skip": 2,
        "task": Task.IMG2IMG,
        "strength": 0.6,
        "loras": (LoraRef("film_grain", 0.8), LoraRef("pixel-art", 1.0)),
    }
    fields.update(job_fields)
    job = JobSpec(**fields)
    return GeneratedImage(
        job=job,
        width=job.width,
        height=job.height,
        rgb=_gradient().tobytes(),
        model_name=job.model,
        batch_size=4,
        timings=Timings(queued_s=0.01234, encode_prompt_s=0.1, denoise_s=2.5, decode_s=0.3),
    )


EXPECTED_IMG2IMG = (
    "a cat in a hat, <lora:film_grain:0.8>, <lora:pixel-art:1>\n"
    "Negative prompt: blurry, lowres\n"
    "Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7.0, Seed: 7, Size: 64x48, Model: sdxl-base, "
    "Denoising strength: 0.6, Clip skip: 2"
)


def test_to_pil_keeps_width_and_height() -> None:
    pil = to_pil(_image())
    assert pil.mode == "RGB"
    assert pil.size == (WIDTH, HEIGHT)
    np.testing.assert_array_equal(np.asarray(pil), _gradient())


def test_infotext_matches_a1111_layout_for_img2img() -> None:
    assert a1111_parameters(_image()) == EXPECTED_IMG2IMG


def test_infotext_for_txt2img_has_no_denoising_strength_or_clip_skip() -> None:
    image = _image(task=Task.TEXT2IMG, clip_skip=1, loras=(), negative_prompt=None)
    text = a1111_parameters(image)
    lines = text.split("\n")
    assert lines == [
        "a cat in a hat",
        f"Negative prompt: {DEFAULT_NEGATIVE_PROMPT}",
        "Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7.0, Seed: 7, Size: 64x48, Model: sdxl-base",
    ]
    assert "Denoising strength" not in text
    assert "Clip skip" not in text


def test_infotext_quotes_values_like_a1111_and_keeps_user_lora_tags() -> None:
    image = _image(model="models:v1,final", prompt="a dog <lora:film_grain:0.5>", negative_prompt="")
    text = a1111_parameters(image)
    assert text.startswith("a dog <lora:film_grain:0.5>, <lora:pixel-art:1>\nSteps: 30,")
    assert 'Model: "models:v1,final"' in text
    assert "Negative prompt" not in text


def test_metadata_is_json_serialisable_and_complete() -> None:
    meta = json.loads(json.dumps(image_metadata(_image())))
    assert meta["sampler"] == "DPM++ 2M Karras"
    assert meta["scheduler"] == "dpmpp_2m_karras"
    assert (meta["width"], meta["height"]) == (WIDTH, HEIGHT)
    assert meta["loras"] == [{"name": "film_grain", "weight": 0.8}, {"name": "pixel-art", "weight": 1.0}]
    assert meta["strength"] == 0.6
    assert meta["task"] == "img2img"
    assert meta["clip_skip"] == 2
    assert meta["batch_size"] == 4
    assert meta["timings"]["queued_s"] == 0.012
    assert meta["timings"]["total_s"] == 2.912
    assert meta["parameters"] == EXPECTED_IMG2IMG
    assert meta["imagegenx_version"] == imagegenx.__version__
    assert "strength" not in image_metadata(_image(task=Task.TEXT2IMG))


@pytest.mark.parametrize(
    ("fmt", "pil_format", "max_mean_error"),
    [
        (ImageFormat.PNG, "PNG", 0.0),
        (ImageFormat.JPEG, "JPEG", 2.0),
        (ImageFormat.WEBP, "WEBP", 3.0),
        (ImageFormat.AVIF, "AVIF", 3.0),
    ],
)
def test_encode_round_trip(fmt: ImageFormat, pil_format: str, max_mean_error: float) -> None:
    image = _image()
    data = encode_image(image, fmt)
    with Image.open(io.BytesIO(data)) as decoded:
        assert decoded.format == pil_format
        assert decoded.size == (WIDTH, HEIGHT)
        pixels = np.asarray(decoded.convert("RGB"), dtype=np.int16)
    error = np.abs(pixels - _gradient().astype(np.int16)).mean()
    assert error <= max_mean_error
    assert read_parameters(data) == a1111_parameters(image)


@pytest.mark.parametrize("fmt", list(ImageFormat))
def test_embed_metadata_false_embeds_nothing(fmt: ImageFormat) -> None:
    data = encode_image(_image(), fmt, embed_metadata=False)
    assert read_parameters(data) is None
    with Image.open(io.BytesIO(data)) as decoded:
        assert "parameters" not in decoded.info
        assert len(decoded.getexif().get_ifd(ExifTags.IFD.Exif)) == 0
    assert b"Steps: 30" not in data


@pytest.mark.parametrize("fmt", [ImageFormat.JPEG, ImageFormat.WEBP, ImageFormat.AVIF])
def test_exif_user_comment_is_what_piexif_writes(fmt: ImageFormat) -> None:
    image = _image(prompt="ein Kätzchen 猫")
    with Image.open(io.BytesIO(encode_image(image, fmt))) as decoded:
        comment = decoded.getexif().get_ifd(ExifTags.IFD.Exif)[EXIF_USER_COMMENT]
    assert comment == b"UNICODE\x00" + a1111_parameters(image).encode("utf-16-be")


def test_png_non_latin1_prompt_round_trips() -> None:
    image = _image(prompt="ein Kätzchen 猫")
    assert read_parameters(encode_image(image, ImageFormat.PNG)) == a1111_parameters(image)


def test_quality_changes_lossy_output_and_webp_100_is_lossless() -> None:
    image = _image()
    assert len(encode_image(image, ImageFormat.JPEG, quality=30)) < len(encode_image(image, ImageFormat.JPEG))
    lossless = encode_image(image, ImageFormat.WEBP, quality=100)
    with Image.open(io.BytesIO(lossless)) as decoded:
        np.testing.assert_array_equal(np.asarray(decoded.convert("RGB")), _gradient())
    with pytest.raises(UserError, match="quality"):
        encode_image(image, ImageFormat.JPEG, quality=0)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("webp", ImageFormat.WEBP),
        ("PNG", ImageFormat.PNG),
        ("jpg", ImageFormat.JPEG),
        ("JPEG", ImageFormat.JPEG),
        (".Avif", ImageFormat.AVIF),
    ],
)
def test_format_parsing(name: str, expected: ImageFormat) -> None:
    assert ImageFormat.parse(name) is expected
    assert ImageFormat(name) is expected


def test_format_extensions_and_default() -> None:
    assert [f.extension for f in ImageFormat] == [".webp", ".png", ".jpg", ".avif"]
    assert DEFAULT_FORMAT is ImageFormat.WEBP
    with Image.open(io.BytesIO(encode_image(_image()))) as decoded:
        assert decoded.format == "WEBP"


@pytest.mark.parametrize("name", ["gif", "", "tiff", "jpgg"])
def test_bad_format_names_raise_user_error(name: str) -> None:
    with pytest.raises(UserError, match="webp, png, jpeg, avif"):
        ImageFormat.parse(name)


def test_read_parameters_rejects_non_images() -> None:
    with pytest.raises(UserError):
        read_parameters(b"definitely not an image")
