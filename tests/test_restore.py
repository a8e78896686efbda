"""GFPGAN face restoration: our GFPGANv1Clean against the official layout, and the step on real photos.

No GFPGAN weights can be had here (WEIGHTS.md), so the network is built with random weights
(``torch.manual_seed(0)``) and saved as ``.safetensors``, as a user's converted ``GFPGANv1.4.pth`` would be.
Photos are scikit-image's astronaut and cameraman, with faces from the real MediapipeDetector. One forward
of the 512 model takes about 5 s on one CPU thread, so the step runs once (two images, a face each, one
batch) and the tests share its result; shape checks run on the meta device, which computes nothing.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from skimage.data import astronaut, camera
from torch.nn import functional as F

from imagegenx.postprocess.gfpgan_arch import GFPGANv1Clean, ModulatedConv2d
from imagegenx.postprocess.restore import (
    FACE_SIZE,
    TEMPLATE,
    FaceRestore,
    align_face,
    face_points,
    get_restorer,
    load_gfpgan,
    paste_face,
    warp_back,
)
from imagegenx.types import UserError
from imagegenx.vision.detect import MediapipeDetector

# Read off TencentARC/GFPGAN's gfpganv1_clean_arch.py and stylegan2_clean_arch.py with the v1.3/v1.4
# arguments (out_size 512, channel_multiplier 2, narrow 1, sft_half, different_w): decoder channels
# 512 (4-64 px), 256, 128, 64; U-Net channels half of those; 16 W+ latents of 512.
OFFICIAL_SHAPES = {
    "conv_body_first.weight": (32, 3, 1, 1),
    "conv_body_down.0.conv1.weight": (32, 32, 3, 3),
    "conv_body_down.0.conv2.weight": (64, 32, 3, 3),
    "conv_body_down.6.skip.weight": (256, 256, 1, 1),
    "final_conv.weight": (256, 256, 3, 3),
    "conv_body_up.6.conv2.weight": (32, 64, 3, 3),
    "toRGB.0.weight": (3, 256, 1, 1),
    "toRGB.6.weight": (3, 32, 1, 1),
    "final_linear.weight": (8192, 4096),
    "stylegan_decoder.style_mlp.1.weight": (512, 512),
    "stylegan_decoder.style_mlp.15.bias": (512,),
    "stylegan_decoder.constant_input.weight": (1, 512, 4, 4),
    "stylegan_decoder.style_conv1.modulated_conv.weight": (1, 512, 512, 3, 3),
    "stylegan_decoder.style_conv1.modulated_conv.modulation.weight": (512, 512),
    "stylegan_decoder.style_conv1.weight": (1,),
    "stylegan_decoder.style_conv1.bias": (1, 512, 1, 1),
    "stylegan_decoder.to_rgb1.modulated_conv.weight": (1, 3, 512, 1, 1),
    "stylegan_decoder.style_convs.12.modulated_conv.weight": (1, 64, 128, 3, 3),
    "stylegan_decoder.style_convs.13.modulated_conv.modulation.bias": (64,),
    "stylegan_decoder.to_rgbs.6.bias": (1, 3, 1, 1),
    "stylegan_decoder.noises.noise0": (1, 1, 4, 4),
    "stylegan_decoder.noises.noise14": (1, 1, 512, 512),
    "condition_scale.0.0.weight": (256, 256, 3, 3),
    "condition_scale.6.2.weight": (32, 32, 3, 3),
    "condition_shift.6.2.bias": (32,),
}
OFFICIAL_KEYS = 285  # 270 parameters + 15 noise buffers
# Summed by hand from the reference's constructors: encoder 6_197_280, decoder ResBlocks 6_187_680,
# toRGB 3_765, final_linear 33_562_624, SFT branches 10_216_320, StyleGAN2 generator 30_276_583.
# 86_444_252 fp32 parameters + 699_024 noise values ≈ 348.6 MB, the size of the published .pth files.
OFFICIAL_PARAMETERS = 86_444_252
OFFICIAL_NOISE_VALUES = 699_024


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gfpgan") / "GFPGANv1.4.safetensors"
    save_file(GFPGANv1Clean().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [Image.fromarray(astronaut()), Image.fromarray(camera()).convert("RGB")]


@pytest.fixture(scope="module")
def detections(photos):
    found = MediapipeDetector().detect_batch(photos)
    assert [sum(d.kind == "face" for d in dets) for dets in found] == [1, 1]
    return found


@pytest.fixture(scope="module")
def restored(model_path, photos, detections):
    """The step once over both photos (default weight 0.5), with every network forward recorded."""
    calls = []
    net = get_restorer(model_path, "cpu").net
    hook = net.register_forward_hook(lambda _m, args, out: calls.append((args[0].shape, out[0].shape)))
    try:
        out = FaceRestore(model_path, device="cpu").apply(photos, detections)
    finally:
        hook.remove()
    return out, calls


def _face(detections, image: int):
    return next(d for d in detections[image] if d.kind == "face")


def test_state_dict_matches_the_official_layout():
    with torch.device("meta"):
        model = GFPGANv1Clean()
    state = model.state_dict()
    assert len(state) == OFFICIAL_KEYS
    for key, shape in OFFICIAL_SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMETERS
    assert sum(b.numel() for b in model.buffers()) == OFFICIAL_NOISE_VALUES
    assert sum(k.startswith("stylegan_decoder.noises.") for k in state) == 15
    assert not any(k.startswith("stylegan_decoder.style_mlp.0.") for k in state)  # NormStyleCode has none


def test_forward_shape():
    with torch.device("meta"):
        image, rgbs = GFPGANv1Clean()(torch.empty(1, 3, 512, 512), return_rgb=True)
    assert image.shape == (1, 3, 512, 512)
    assert [r.shape[-1] for r in rgbs] == [8, 16, 32, 64, 128, 256, 512]


def test_modulated_conv_equals_the_reference_grouped_form():
    """Reference: per-sample weights W·s, demodulated, one grouped conv; ours scales activations."""
    torch.manual_seed(1)
    conv = ModulatedConv2d(16, 8, 3, num_style_feat=32, upsample=True)
    x, style = torch.randn(3, 16, 10, 10), torch.randn(3, 32)
    weight = conv.weight * conv.modulation(style).view(3, 1, 16, 1, 1)
    weight = weight * torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + 1e-8).view(3, 8, 1, 1, 1)
    up = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    ref = F.conv2d(up.reshape(1, 48, 20, 20), weight.view(24, 16, 3, 3), padding=1, groups=3)
    torch.testing.assert_close(conv(x, style), ref.view(3, 8, 20, 20), atol=1e-5, rtol=1e-5)


def test_all_faces_of_the_batch_run_as_one_forward(restored):
    _, calls = restored
    assert calls == [((2, 3, FACE_SIZE, FACE_SIZE), (2, 3, FACE_SIZE, FACE_SIZE))]


def test_face_changes_and_far_pixels_do_not(restored, photos, detections):
    out, _ = restored
    for i, (before, after) in enumerate(zip(photos, out, strict=True)):
        a, b = np.asarray(before).astype(int), np.asarray(after).astype(int)
        assert a.shape == b.shape
        left, top, right, bottom = _face(detections, i).box
        assert np.abs(a - b)[top:bottom, left:right].mean() > 5
        # Outside the bounding box of the aligned square (warped back) nothing changes.
        matrix, crop = align_face(np.asarray(before), _face(detections, i).keypoints)
        (x0, y0, x1, y1), _, _ = warp_back(matrix, crop, a.shape)
        outside = np.ones(a.shape[:2], bool)
        outside[y0:y1, x0:x1] = False
        assert outside.mean() > 0.5
        assert np.array_equal(a[outside], b[outside])


def test_weight_zero_gives_the_input_back(model_path, photos, detections):
    out = FaceRestore(model_path, device="cpu").apply(photos, detections, {"weight": 0.0})
    for before, after in zip(photos, out, strict=True):
        assert np.array_equal(np.asarray(before), np.asarray(after))
    image = np.asarray(photos[0])
    matrix, crop = align_face(image, _face(detections, 0).keypoints)
    assert np.array_equal(paste_face(image, matrix, 255 - crop, 0.0), image)


def test_align_then_warp_back_reproduces_the_face(photos, detections):
    image = np.asarray(photos[0])
    matrix, crop = align_face(image, _face(detections, 0).keypoints)
    assert crop.shape == (FACE_SIZE, FACE_SIZE, 3)
    # BlazeFace's eyes, nose tip and mouth centre land near the FFHQ template's points.
    moved = face_points(_face(detections, 0).keypoints) @ matrix[:, :2].T + matrix[:, 2]
    assert np.abs(moved - TEMPLATE).max() < 20
    (x0, y0, x1, y1), face, mask = warp_back(matrix, crop, image.shape)
    inside = mask > 0.99
    assert inside.sum() > 10_000
    assert psnr(face[inside], image[y0:y1, x0:x1][inside]) > 30
    pasted = paste_face(image, matrix, crop, 1.0)
    assert psnr(pasted[y0:y1, x0:x1][inside], image[y0:y1, x0:x1][inside]) > 30


def test_cache_returns_the_same_model(model_path, restored):
    assert get_restorer(model_path, "cpu") is get_restorer(str(model_path), torch.device("cpu"))


def test_pickle_checkpoints_are_refused(tmp_path):
    path = tmp_path / "GFPGANv1.4.pth"
    path.write_bytes(b"not loaded")
    with pytest.raises(UserError, match="pickle"):
        FaceRestore(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(UserError, match=r"not found: .*nowhere\.safetensors"):
        FaceRestore(tmp_path / "nowhere.safetensors")


def test_mismatched_state_dict_is_refused(tmp_path):
    torch.manual_seed(0)
    narrow = tmp_path / "narrow.safetensors"
    save_file(GFPGANv1Clean(narrow=0.125).state_dict(), narrow)
    with pytest.raises(UserError, match=r"not a GFPGANv1Clean \(GFPGAN v1.3/v1.4\) model: wrong shape"):
        load_gfpgan(narrow)
    other = tmp_path / "esrgan.safetensors"
    save_file({"conv_first.weight": torch.zeros(64, 3, 3, 3)}, other)
    with pytest.raises(UserError, match=r"missing \(285\).*unexpected \(1\): conv_first.weight"):
        load_gfpgan(other)


def test_chain_restores_faces_found_by_its_detection_pass(model_path, photos, restored):
    """``face_restore`` in the chain: the one detection pass feeds it; the result is the step's."""
    from imagegenx.postprocess.chain import PostprocessSpec, apply_chain
    from imagegenx.types import GeneratedImage, JobSpec

    photo = photos[0]
    job = JobSpec("a portrait", "random:tiny-sdxl", width=512, height=512)
    image = GeneratedImage(job, 512, 512, photo.tobytes(), "random:tiny-sdxl", 1)
    [out] = apply_chain([image], PostprocessSpec(face_restore=str(model_path)))
    assert [step["name"] for step in out.post["steps"]] == ["detect", "face restore"]
    assert [d["kind"] for d in out.post["detections"]] == ["face"]
    ours = np.frombuffer(out.rgb, np.uint8).astype(int)
    step = np.asarray(restored[0][0], dtype=int).ravel()  # the step alone, batched with another photo
    assert np.abs(ours - step).max() <= 2 and np.abs(ours - np.asarray(photo, dtype=int).ravel()).max() > 20
