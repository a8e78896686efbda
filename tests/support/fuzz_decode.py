"""An atheris (libFuzzer) target for ``decode_image``: run as a script, arguments go to libFuzzer.

Only ``ImageRejected`` may come out; any other exception, a crash in a C decoder, a hang past
``-timeout`` or memory past ``-rss_limit_mb`` stops the fuzzer with a non-zero exit status.
"""

import sys
import warnings

import atheris

with atheris.instrument_imports():
    from PIL import Image

    from imagegenx.vision.imagefile import ImageRejected, decode_image

LIMIT = 1024 * 1024  # pixels: small, so that inputs claiming more are refused before decoding


def one_input(data: bytes) -> None:
    try:
        image = decode_image(data, "fuzz", mode=None, max_pixels=LIMIT)
    except ImageRejected:
        return
    assert isinstance(image, Image.Image) and image.width * image.height <= LIMIT, image


if __name__ == "__main__":
    warnings.simplefilter("ignore")  # Pillow warns about huge headers; the cap refuses them anyway
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
