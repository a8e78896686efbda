"""The one decoder for untrusted images: caps, format allow-list, bombs and truncation, and a fuzzer."""

import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

from imagegenx.types import UserError
from imagegenx.vision.imagefile import MAX_PIXELS, ImageRejected, decode_image

HERE = Path(__file__).parent


def _encoded(fmt: str, size=(32, 24), mode="RGB", **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128 if mode in ("L", "I;16") else (200, 40, 10)).save(buf, fmt, **kwargs)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(side: int) -> bytes:
    """A real grey PNG of side² zero pixels: a few hundred kB that decode to side² bytes."""
    packer = zlib.compressobj(9)
    row = b"\0" * (side + 1)  # filter byte + pixels
    body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_allowed_formats_decode(fmt):
    image = decode_image(_encoded(fmt), "the image")
    assert image.size == (32, 24) and image.mode == "RGB"


def test_modes_are_kept_when_asked_and_exif_turns_photos_upright():
    depth = decode_image(_encoded("PNG", mode="I;16"), "depth", mode=None)
    assert depth.mode.startswith("I")  # 16-bit depth keeps its precision
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90°
    photo = _encoded("JPEG", size=(40, 20), exif=exif.tobytes())
    assert decode_image(photo, "selfie").size == (40, 20)
    assert decode_image(photo, "selfie", exif_transpose=True).size == (20, 40)


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "ICO", "PPM"])
def test_other_formats_are_refused(fmt):
    with pytest.raises(ImageRejected, match="not a readable image"):
        decode_image(_encoded(fmt, size=(16, 16)), "the image")


def test_the_engines_own_raw_images_round_trip_and_stay_out_of_uploads():
    """The passes hand the engine raw PPM/PGM (encode_in_process): lossless, read where the engine
    reads a job's images (IN_PROCESS_FORMATS), and still refused where uploads are checked."""
    import numpy as np

    from imagegenx.pipelines.sample import decode_input_image
    from imagegenx.vision.imagefile import encode_in_process

    pixels = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    for image, mode in ((Image.fromarray(pixels), "RGB"), (Image.fromarray(pixels[..., 0]), "L")):
        data = encode_in_process(image)
        assert data[:2] in (b"P6", b"P5")
        back = decode_input_image(data, "the input image", mode=mode)
        assert back.mode == mode and np.array_equal(np.asarray(back), np.asarray(image))
        with pytest.raises(ImageRejected, match="not a readable image"):
            decode_image(data, "an upload")
    with pytest.raises(ImageRejected, match=r"larger than|too large"):  # the caps hold for them too
        decode_input_image(encode_in_process(Image.new("RGB", (4097, 4097))), "the input image")


def test_truncated_and_corrupt_files_are_refused():
    png, jpeg = _encoded("PNG", size=(256, 256)), _encoded("JPEG", size=(256, 256))
    noisy = io.BytesIO()
    Image.effect_noise((256, 256), 60).save(noisy, "PNG")
    noisy = noisy.getvalue()
    for bad in [png[:60], noisy[: len(noisy) // 2], jpeg[: len(jpeg) // 3], b"\x89PNG\r\n\x1a\n", b"junk"]:
        with pytest.raises(ImageRejected, match="not a readable image"):
            decode_image(bad, "the image")
    flipped = bytearray(noisy)
    flipped[len(flipped) // 2] ^= 0xFF  # a corrupt deflate stream or a bad CRC
    with pytest.raises(UserError):
        decode_image(bytes(flipped), "the image")


def test_size_caps_come_before_decoding():
    with pytest.raises(ImageRejected, match="empty"):
        decode_image(b"", "the image")
    with pytest.raises(ImageRejected, match="larger than 50 bytes"):
        decode_image(_encoded("PNG"), "the image", max_bytes=50)
    # 100000² claimed in a 60-byte file: refused from the header, nothing allocated
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    claim = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IEND", b"")
    with pytest.raises(ImageRejected, match=r"too large \(at most 16777216 pixels"):
        decode_image(claim, "the image")
    with pytest.raises(ImageRejected) as refused:
        decode_image(_encoded("PNG", size=(300, 300)), "the mask", max_pixels=256 * 256)
    assert str(refused.value).startswith("the mask is too large") and refused.value.reason.startswith("too")


def test_a_decompression_bomb_is_refused_without_memory_growth():
    """12000² grey pixels in ~140 kB: Pillow alone only warns (144 M < 2 × 89 M) and would allocate
    144 MB; the cap refuses it from the header. Measured in a fresh process: peak RSS stays flat."""
    bomb = png_bomb(12_000)
    assert len(bomb) < 1_000_000 and MAX_PIXELS < 12_000**2
    script = (
        "import resource, sys\n"
        "from imagegenx.vision.imagefile import decode_image, ImageRejected\n"
        "data = sys.stdin.buffer.read()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n    decode_image(data, 'bomb')\nexcept ImageRejected as exc:\n    print(exc)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], input=bomb, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    message, grown_kb = proc.stdout.decode().splitlines()
    assert "too large (12000x12000" in message
    assert int(grown_kb) < 20_000  # kB: nowhere near the 144 MB the pixels would take


def test_atheris_finds_nothing_in_20_seconds(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    seeds = {
        "a.png": _encoded("PNG", size=(16, 12)),
        "b.jpg": _encoded("JPEG", size=(16, 12)),
        "c.webp": _encoded("WEBP", size=(16, 12)),
        "d.png": _encoded("PNG", size=(9, 9), mode="RGBA"),
        "e.png": _encoded("PNG", size=(8, 8), mode="I;16"),
    }
    for name, data in seeds.items():
        (corpus / name).write_bytes(data)
    # Through a shell that forks the fuzzer (no exec of its last command): a child forked straight from
    # pytest inherits pytest's peak RSS as its own (Linux keeps the high-water mark across fork and
    # exec), and late in the suite that alone passed libFuzzer's 1 GB limit (CI: "out-of-memory" at a
    # steady 1.4 GB from the first input).
    proc = subprocess.run(
        [
            *("/bin/sh", "-c", '"$@"; exit $?', "sh"),
            sys.executable,
            str(HERE / "support" / "fuzz_decode.py"),
            "-max_total_time=20",
            "-rss_limit_mb=1024",  # a decode that blows up memory is a finding
            "-timeout=10",  # so is one input taking 10 s
            "-seed=20261129",
            f"-artifact_prefix={tmp_path}/",
            str(corpus),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log
    assert "Done" in proc.stderr and not list(tmp_path.glob("crash-*")), log
    runs = int(proc.stderr.rsplit("Done ", 1)[1].split()[0])
    assert runs > 10_000, log  # it really ran
