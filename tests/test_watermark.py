"""Visible and invisible watermarks on a real photograph (scikit-image's astronaut, 512x512)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from skimage import data as skimage_data

from imagegenx.postprocess.watermark import (
    MAGIC,
    Watermark,
    WatermarkParams,
    add_visible,
    check_watermark,
    embed_invisible,
    find_invisible,
    make_payload,
    parse_payload,
    read_invisible,
    watermark_id,
)
from imagegenx.types import UserError


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.fromarray(skimage_data.astronaut())  # 512x512 RGB


def _changed(a: Image.Image, b: Image.Image) -> np.ndarray:
    """Mask of pixels that differ in any channel."""
    return np.any(np.asarray(a.convert("RGB")) != np.asarray(b.convert("RGB")), axis=2)


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


@pytest.mark.parametrize("position", ["top-left", "top-right", "bottom-left", "bottom-right"])
def test_visible_text_changes_only_its_corner(photo, position):
    out = add_visible(photo, text="imagegenx", opacity=0.6, position=position)
    assert out.size == photo.size and out.mode == "RGB"
    changed = _changed(photo, out)
    assert changed.sum() > 100  # the text is really there
    ys, xs = np.nonzero(changed)
    vertical, horizontal = position.split("-")
    # The mark (4% of 512 = 20 px font, 10 px margin) stays inside a 40% x 12% box in its corner.
    if vertical == "top":
        assert ys.max() < 512 * 0.12
    else:
        assert ys.min() > 512 * 0.88
    if horizontal == "left":
        assert xs.max() < 512 * 0.4
    else:
        assert xs.min() > 512 * 0.6
    # Margin respected: nothing touches the edge on the chosen sides.
    assert ys.min() >= 5 and ys.max() <= 506 and xs.min() >= 5 and xs.max() <= 506


def test_visible_center_opacity_and_color(photo):
    out = add_visible(photo, text="X", font_size=120, color=(255, 0, 0), opacity=1.0, position="center")
    ys, xs = np.nonzero(_changed(photo, out))
    assert abs(ys.mean() - 256) < 40 and abs(xs.mean() - 256) < 40
    faint = add_visible(photo, text="X", font_size=120, color=(255, 0, 0), opacity=0.2, position="center")
    base = np.asarray(photo, dtype=float)
    strong_delta = np.abs(np.asarray(out, dtype=float) - base).sum()
    faint_delta = np.abs(np.asarray(faint, dtype=float) - base).sum()
    assert 0 < faint_delta < 0.4 * strong_delta
    # Fully opaque red text: some pixels are pure red.
    assert np.any(np.all(np.asarray(out) == (255, 0, 0), axis=2))
    # opacity 0 draws nothing
    assert not _changed(photo, add_visible(photo, text="X", opacity=0.0)).any()


def test_visible_logo_and_rgba_input(photo):
    logo = Image.new("RGBA", (64, 32), (0, 0, 0, 0))
    logo.paste((0, 255, 0, 255), (8, 8, 56, 24))  # green bar on a transparent background
    out = add_visible(photo, logo=logo, opacity=1.0, position="top-left", margin=0)
    ys, xs = np.nonzero(_changed(photo, out))
    assert ys.max() < 60 and xs.max() < 90  # 15% of 512 = 77 px wide logo at the corner
    assert np.any(np.all(np.asarray(out) == (0, 255, 0), axis=2))
    # Transparent logo pixels leave the photo alone: the logo's top rows (transparent) are unchanged.
    assert not _changed(photo, out)[:3].any()
    # Logo and text together; RGBA in, RGBA out with the alpha kept.
    rgba = photo.convert("RGBA")
    both = add_visible(rgba, text="igx", logo=logo, position="bottom-left")
    assert both.mode == "RGBA" and np.asarray(both)[..., 3].min() == 255


def test_visible_rejects_bad_input(photo):
    with pytest.raises(UserError, match="text or a logo"):
        add_visible(photo)
    with pytest.raises(UserError, match="position"):
        add_visible(photo, text="x", position="middle")
    with pytest.raises(UserError, match="opacity"):
        add_visible(photo, text="x", opacity=1.5)
    with pytest.raises(UserError, match="font"):
        add_visible(photo, text="x", font_path="/nonexistent/font.ttf")


def test_invisible_survives_jpeg_90(photo):
    payload = make_payload(0x0123456789ABCDEF)
    marked = embed_invisible(photo, payload)
    pixels = np.asarray(marked, dtype=float) - np.asarray(photo, dtype=float)
    psnr = 10 * np.log10(255**2 / (pixels**2).mean())
    assert psnr > 42  # invisible
    assert read_invisible(marked, len(payload)) == payload
    assert read_invisible(_jpeg(marked, 90), len(payload)) == payload
    assert find_invisible(_jpeg(marked, 90)) == bytes.fromhex("0123456789abcdef")
    # An unmarked photo (raw and re-encoded) reads as "no watermark".
    assert find_invisible(photo) is None
    assert find_invisible(_jpeg(photo, 90)) is None


def test_payload_format():
    assert make_payload(1) == MAGIC + b"\x00" * 7 + b"\x01"
    assert parse_payload(make_payload(b"abcdefgh")) == b"abcdefgh"
    assert parse_payload(b"XXXX" + b"abcdefgh") is None
    assert watermark_id("0f8fad5b-d9cb-469f-a165-70867728950e") == bytes.fromhex("0f8fad5bd9cb469f")
    assert watermark_id("job-7") == watermark_id("job-7") != watermark_id("job-8")
    with pytest.raises(UserError):
        watermark_id(2**64)
    with pytest.raises(UserError):
        watermark_id(b"short")
    with pytest.raises(UserError, match="256x256"):
        embed_invisible(Image.new("RGB", (128, 128)), make_payload(1))


def test_check_watermark_on_saved_files(photo, tmp_path):
    marked = embed_invisible(photo, make_payload("0f8fad5b-d9cb-469f-a165-70867728950e"))
    path = tmp_path / "marked.jpg"
    marked.save(path, quality=90)
    result = check_watermark(path)
    assert result["found"] is True
    assert result["id"] == "0f8fad5bd9cb469f"
    assert result["payload"] == (MAGIC + bytes.fromhex("0f8fad5bd9cb469f")).hex()

    plain = tmp_path / "plain.png"
    photo.save(plain)
    assert check_watermark(plain) == {"found": False, "payload": None, "id": None, "reason": None}
    small = tmp_path / "small.png"
    photo.resize((64, 64)).save(small)
    assert check_watermark(small)["found"] is False and "256x256" in check_watermark(small)["reason"]
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="cannot read image"):
        check_watermark(tmp_path / "junk.png")


def test_watermark_step(photo):
    step = Watermark()
    out = step.apply([photo, photo.resize((128, 128))], {"text": "igx", "id": 42, "position": "top-right"})
    assert len(out) == 2
    assert find_invisible(_jpeg(out[0], 90)) == (42).to_bytes(8, "big")
    # Visible mark in the top-right corner of the small image; too small for an invisible mark.
    ys, xs = np.nonzero(_changed(photo.resize((128, 128)), out[1]))
    assert ys.max() < 30 and xs.min() > 64
    # Invisible only: no visible change beyond the watermark's tiny amplitude.
    (quiet,) = step.apply([photo], WatermarkParams(id=7))
    assert np.abs(np.asarray(quiet, dtype=int) - np.asarray(photo, dtype=int)).max() <= 12
    assert find_invisible(quiet) == (7).to_bytes(8, "big")
    with pytest.raises(UserError, match="unknown watermark parameter"):
        step.apply([photo], {"txt": "typo"})
