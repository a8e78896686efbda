"""The upscaler's finish in torch (used on GPUs) against Pillow's (used on the CPU), on a real photo."""

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from imagegenx.postprocess.finish import finish, lanczos_matrix, resize_lanczos, unsharp_mask
from imagegenx.postprocess.upscale import _finish_with_pillow, lanczos, unsharp
from imagegenx.vision.quality import tenengrad


@pytest.fixture(scope="module")
def crop() -> Image.Image:
    return Image.fromarray(data.astronaut()[40:136, 150:278])  # 128 x 96, the face


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float()


def _pixels(tensor: torch.Tensor) -> np.ndarray:
    return tensor.permute(1, 2, 0).numpy().astype(np.int16)


@pytest.mark.parametrize("size", [(512, 384), (64, 48), (200, 150)])
def test_lanczos_matches_pillow(crop, size):
    ours = _pixels(resize_lanczos(_tensor(crop), size))
    pillow = np.asarray(lanczos(crop, size), np.int16)
    assert ours.shape == pillow.shape
    assert np.abs(ours - pillow).max() <= 1  # Pillow rounds fixed-point coefficients
    assert (ours != pillow).mean() < 0.02


def test_lanczos_rows_are_normalised():
    weights = lanczos_matrix(96, 384, torch.device("cpu"))
    assert weights.shape == (384, 96)
    assert torch.allclose(weights.sum(dim=1), torch.ones(384))


def test_unsharp_mask_is_close_to_pillow_and_sharpens(crop):
    big = lanczos(crop, (512, 384))
    ours = _pixels(unsharp_mask(_tensor(big)))
    pillow = np.asarray(unsharp(big), np.int16)
    assert np.abs(ours - pillow).mean() < 1.0  # Pillow approximates the Gaussian with box blurs
    assert tenengrad(ours.astype(np.uint8)) > tenengrad(np.asarray(big))


def test_finish_matches_the_pillow_finish(crop):
    # A stand-in for the network's x4 output that differs from a plain Lanczos upscale.
    network = np.asarray(unsharp(lanczos(crop, (512, 384)), radius=3, amount=2.0))
    for size, strength, sharpen in [
        ((512, 384), 0.35, True),
        ((256, 192), 0.35, False),
        ((512, 384), 1.0, False),
    ]:
        ours = finish(torch.from_numpy(network), torch.from_numpy(np.asarray(crop)), size, strength, sharpen)
        pillow = _finish_with_pillow(crop, torch.from_numpy(network), size, strength, sharpen)
        assert ours.dtype == torch.uint8 and tuple(ours.shape) == (size[1], size[0], 3)
        diff = np.abs(ours.numpy().astype(np.int16) - np.asarray(pillow, np.int16))
        assert diff.mean() < 1.0 and diff.max() <= 12
