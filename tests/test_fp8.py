"""fp8 denoiser layers (torchao float8, per-row scales): the setting, the layers it picks, its errors,
and its numbers on the CPU.

torchao refuses float8 unless a GPU of compute capability 8.9+ is there, but the matmul it calls
(``torch._scaled_mm`` on float8_e4m3fn) runs on the CPU in this torch. The ``cpu_float8`` fixture
lifts both refusals (torchao's and ours) so the real quantized layers run here; nothing is mocked
in the computation.
"""

import copy

import numpy as np
import pytest
import torch

from conftest import make_settings
from imagegenx.config import Settings
from imagegenx.engine.engine import Engine
from imagegenx.models import speed
from imagegenx.models.loader import _build_random
from imagegenx.models.speed import check_fp8_supported, is_fp8_linear, lora_refusal
from imagegenx.types import JobSpec, LoraRef, SchedulerName, UserError

CPU = torch.device("cpu")
JOBS = [JobSpec(f"a red fox {i}", "random:tiny-sdxl", width=64, height=64, steps=3, seed=i) for i in range(2)]
needs_fp8_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
    reason="needs a CUDA GPU of compute capability 8.9+",
)


def _denoiser(arch: str, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    pipe = _build_random(arch, CPU, dtype)
    return getattr(pipe, "unet", None) or pipe.transformer


def _settings(tmp_path, **models) -> Settings:
    settings = make_settings(tmp_path)
    return settings.model_copy(update={"models": settings.models.model_copy(update=models)})


@pytest.fixture
def cpu_float8(monkeypatch):
    pytest.importorskip("torchao")
    monkeypatch.setattr("torchao.quantization.quant_api._check_hardware_support", lambda granularity: None)
    monkeypatch.setattr(speed, "_has_float8_matmuls", lambda device: True)


def test_the_setting_parses_from_the_environment(monkeypatch):
    assert Settings().models.fp8 is False
    monkeypatch.setenv("IMAGEGENX_MODELS__FP8", "true")
    assert Settings().models.fp8 is True


def test_the_filter_picks_projections_and_leaves_per_image_embeddings():
    unet = _denoiser("tiny-sdxl")
    picked = {name for name, module in unet.named_modules() if is_fp8_linear(module, name)}
    attention = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
    assert {f"{attention}.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")} <= picked
    assert "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj" in picked
    assert "down_blocks.1.attentions.0.proj_in" in picked
    for skipped in (
        "time_embedding.linear_1",
        "time_embedding.linear_2",
        "add_embedding.linear_1",
        "down_blocks.0.resnets.0.time_emb_proj",
    ):
        assert skipped not in picked
    linears = {name for name, module in unet.named_modules() if isinstance(module, torch.nn.Linear)}
    assert len(picked) == 88 and len(linears) == 100  # 12 per-image layers stay in bf16


def test_the_filter_leaves_the_transformers_adaln_modulation():
    flux = _denoiser("tiny-flux")
    picked = {name for name, module in flux.named_modules() if is_fp8_linear(module, name)}
    assert {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_q_proj", "x_embedder"} <= picked
    assert "single_transformer_blocks.0.proj_mlp" in picked
    assert not any("time_text_embed" in name for name in picked)
    for skipped in (
        "transformer_blocks.0.norm1.linear",
        "single_transformer_blocks.0.norm.linear",
        "norm_out.linear",
    ):
        assert skipped not in picked


def test_the_filter_skips_dimensions_float8_matmuls_cannot_take():
    assert is_fp8_linear(torch.nn.Linear(32, 48), "proj")
    assert not is_fp8_linear(torch.nn.Linear(24, 32), "proj")  # in_features not a multiple of 16
    assert not is_fp8_linear(torch.nn.Linear(32, 40), "proj")
    assert not is_fp8_linear(torch.nn.Conv2d(32, 32, 1), "conv")


def test_fp8_on_the_cpu_fails_at_model_load_saying_what_it_needs(tmp_path):
    with Engine(_settings(tmp_path, fp8=True)) as engine:
        with pytest.raises(UserError, match=r"compute capability 8\.9 or newer .* not cpu"):
            engine.models.get("random:tiny-sdxl")
        (result,) = engine.run(JOBS[:1])
    assert isinstance(result, Exception) and "IMAGEGENX_MODELS__FP8" in str(result)


def test_fp8_needs_bfloat16_weights(cpu_float8):
    with pytest.raises(UserError, match="IMAGEGENX_MODELS__DTYPE=bfloat16"):
        check_fp8_supported(_denoiser("tiny-sd15", torch.float32), CPU)


@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_the_fp8_unet_stays_close_to_the_bf16_unet(cpu_float8, granularity):
    """Relative L2 error of one UNet call under 10%. float8 e4m3 keeps 3 mantissa bits: rounding is
    up to 2^-4 (6%) of each activation and weight, about 4% RMS, partly averaging out in the dot
    products (measured: 4.2% on this model; bf16 itself is 1.2% off float32). A wrong scale or a
    per-tensor overflow errs by 100%; the lower bound proves the layers really changed."""
    from torchao.quantization import Float8Tensor

    unet = _denoiser("tiny-sdxl")
    quantized = copy.deepcopy(unet)
    assert speed.quantize_fp8(quantized, granularity=granularity) == 88
    # torchao's own default would have switched Inductor's slow coordinate-descent tuning on
    assert not torch._inductor.config.coordinate_descent_tuning
    float8 = [m for m in quantized.modules() if isinstance(getattr(m, "weight", None), Float8Tensor)]
    assert len(float8) == 88
    # one weight scale per output row, or one for the whole tensor
    assert {m.weight.scale.numel() == 1 for m in float8} == {granularity == "tensor"}
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=g).bfloat16()
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g).bfloat16()
    added = {
        "text_embeds": torch.randn(2, 32, generator=g).bfloat16(),
        "time_ids": torch.rand(2, 6, generator=g).bfloat16(),
    }
    with torch.inference_mode():
        reference = unet(latents, 500, text, added_cond_kwargs=added).sample.float()
        ours = quantized(latents, 500, text, added_cond_kwargs=added).sample.float()
    error = ((ours - reference).norm() / reference.norm()).item()
    assert 1e-3 < error < 0.1


def _engine_images(tmp_path, fp8: bool) -> tuple[list[np.ndarray], Exception]:
    """The two jobs' pixels and what a job with a LoRA came to, on a bf16 engine with or without fp8."""
    lora_job = JobSpec("a fox", "random:tiny-sdxl", width=64, height=64, steps=2, loras=(LoraRef("style"),))
    with Engine(_settings(tmp_path, dtype="bfloat16", fp8=fp8)) as engine:
        assert engine.models.get("random:tiny-sdxl").speedups.get("fp8") == (88 if fp8 else None)
        *results, lora_result = engine.run([*JOBS, lora_job])
    return [np.frombuffer(r.rgb, np.uint8).astype(int) for r in results], lora_result


def test_an_fp8_engine_makes_close_images_and_refuses_loras(tmp_path_factory, cpu_float8):
    """End to end through the engine's loop: the same seeds give images close to the bf16 ones, and
    a job with a LoRA fails with the reason instead of making an image without the LoRA.

    Bound: mean difference under 6 of 255. Measured 3.4; bf16 is 0.9 off float32 here, and fp8's
    layers are 3.5x further from bf16 than bf16 is from float32 (the UNet test). These tiny random
    models' pixels spread by 40 levels, so an image the fp8 layers broke would differ by about that."""
    reference, _ = _engine_images(tmp_path_factory.mktemp("bf16"), fp8=False)
    ours, lora_result = _engine_images(tmp_path_factory.mktemp("fp8"), fp8=True)
    assert isinstance(lora_result, Exception) and "not supported on an fp8 model" in str(lora_result)
    for image, ref in zip(ours, reference, strict=True):
        assert 0 < np.abs(image - ref).mean() < 6


def test_lora_refusal_names_the_speedup():
    assert lora_refusal({}) == lora_refusal({"channels_last": True}) == ""
    assert "fp8" in lora_refusal({"fp8": 88, "fuse_qkv": True})
    assert "IMAGEGENX_MODELS__FUSE_QKV" in lora_refusal({"fuse_qkv": True})


@needs_fp8_gpu
def test_fp8_on_a_hopper_gpu_quantizes_the_unet(tmp_path):
    pytest.importorskip("torchao")
    settings = _settings(tmp_path, device="cuda", dtype="bfloat16", fp8=True)
    with Engine(settings) as engine:
        assert engine.models.get("random:tiny-sdxl").speedups["fp8"] == 88
        results = engine.run(JOBS)
    assert all(not isinstance(r, Exception) for r in results)


def test_fp8_with_regional_compilation_makes_the_eager_fp8_image(tmp_path_factory, cpu_float8):
    """The configuration the GPU's fp8 run uses (fp8 layers, then Flux's two kinds of transformer
    block compiled, Inductor's CPU backend here): it compiles, names what it applied, and its image
    matches the same fp8 model's eager image. Bound: mean difference under 2 of 255 (the fused
    kernels round in another order; a broken graph would differ by tens)."""
    job = JobSpec(
        "a red fox", "random:tiny-flux", width=64, height=64, steps=2, guidance_scale=3.5,
        scheduler=SchedulerName.EULER, seed=3,
    )  # fmt: skip
    images, applied = [], []
    for compile_mode in ("off", "default"):
        settings = _settings(
            tmp_path_factory.mktemp(compile_mode),
            dtype="bfloat16",
            fp8=True,
            compile=compile_mode,
            compile_regional=True,
            compile_vae=False,
        )
        with Engine(settings) as engine:
            (result,) = engine.run([job])
            assert not isinstance(result, Exception), result
            applied.append(engine.models.get("random:tiny-flux").speedups)
        images.append(np.frombuffer(result.rgb, np.uint8).astype(int))
    assert applied[1]["fp8"] == applied[0]["fp8"] > 0
    assert applied[1]["compile_regional"] == ["FluxTransformerBlock", "FluxSingleTransformerBlock"]
    assert np.abs(images[1] - images[0]).mean() < 2


def test_fp8_tunes_inductor_only_under_max_autotune(cpu_float8):
    import torch._inductor.config as inductor

    saved = inductor.get_config_copy()
    try:
        speed.quantize_fp8(_denoiser("tiny-sdxl"), tune=True)
        assert inductor.coordinate_descent_tuning and inductor.coordinate_descent_check_all_directions
    finally:
        inductor.load_config(saved)


def test_the_bench_counts_an_fp8_unets_flops_as_the_bf16_ones(cpu_float8):
    """The bench's TFLOP/s of an fp8 run: the same work as bf16 (the FLOP counter sees torchao's
    scaled matmuls as the matmuls they replace), so the figure compares across runs."""
    from imagegenx.bench.measure import count_tflop
    from imagegenx.models.fastload import example_unet_inputs

    unet = _denoiser("tiny-sdxl")
    args, kwargs = example_unet_inputs(unet, 2, 16, "sdxl")
    bf16 = count_tflop(lambda: unet(*args, **kwargs))
    speed.quantize_fp8(unet)
    assert count_tflop(lambda: unet(*args, **kwargs)) == pytest.approx(bf16, rel=1e-6)


def test_an_fp8_engine_quantizes_its_controlnets_too(tmp_path, cpu_float8):
    """A ControlNet (InstantID's IdentityNet among them) is about a third of its step's work: an fp8
    model's ControlNets get float8 layers too, and a controlled job still makes its image."""
    import io

    from PIL import Image
    from skimage import data
    from torchao.quantization import Float8Tensor

    from imagegenx.models.controlnet import RANDOM_CONTROLNET
    from imagegenx.types import ControlRef

    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((64, 64)).save(buffer, "PNG")
    control = ControlRef(RANDOM_CONTROLNET, buffer.getvalue(), 0.8)
    job = JobSpec("a fox", "random:tiny-sdxl", width=64, height=64, steps=2, seed=1, controls=(control,))
    with Engine(_settings(tmp_path, dtype="bfloat16", fp8=True)) as engine:
        (result,) = engine.run([job])
        net = engine.models.get("random:tiny-sdxl").extras["controlnets"][RANDOM_CONTROLNET]
    assert not isinstance(result, Exception), result
    float8 = [m for m in net.modules() if isinstance(getattr(m, "weight", None), Float8Tensor)]
    assert float8 and len(float8) == sum(speed.is_fp8_linear(m, name) for name, m in net.named_modules())
