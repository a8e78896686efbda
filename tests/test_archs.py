"""Architecture configs shipped in ``imagegenx/models/archs``.

Full-size archs must be exactly the published models (they are the ``config=`` for diffusers'
``from_single_file`` and the shape of the random-weight benchmark models), so their components are
built on the meta device and their parameter counts checked against the released checkpoints.
Tiny archs must run their diffusers pipeline end to end on CPU, fed by the shipped CLIP tokenizer.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffusers
import numpy as np
import pytest
import torch
import transformers

import imagegenx

MODELS = Path(imagegenx.__file__).parent / "models"
ARCHS = MODELS / "archs"
CLIP_TOKENIZER = MODELS / "tokenizers" / "clip"

# tiny arch -> full-size sibling
TINY = {
    "tiny-sd15": "sd15",
    "tiny-sd21": "sd21",
    "tiny-sdxl": "sdxl",
    "tiny-sdxl-refiner": "sdxl-refiner",
    "tiny-sd3": "sd35-medium",
    "tiny-flux": "flux-dev",
}
FULL_SIZE = tuple(TINY.values())

# Published parameter counts of the released checkpoints (exact tensor counts; the rounded figure is
# the one on the model card / paper, and the checkpoint file sizes agree with the exact counts).
CLIP_L = 123_060_480  # openai/clip-vit-large-patch14 text tower (SD1.5, SDXL, SD3, Flux): "123M"
CLIP_L_PROJ = 123_650_304  # the same plus its 768x768 text_projection (SD3's CLIPTextModelWithProjection)
CLIP_BIGG_PROJ = 694_659_840  # OpenCLIP ViT-bigG/14 text tower + projection (SDXL text_encoder_2): "694.7M"
CLIP_H_23 = 340_387_840  # OpenCLIP ViT-H/14 text tower, 23 of 24 layers as shipped with SD 2.x: "340M"
T5_XXL_ENCODER = 4_762_310_656  # google/t5-v1_1-xxl encoder: "4.7B"; t5xxl_fp16.safetensors = 9.79 GB
#   (9.79 GB = 2 bytes x (4.762B + the tied 32128x4096 embedding stored a second time))
SD_VAE = 83_653_863  # SD/SDXL AutoencoderKL with quant convs: "84M" (SDXL paper)
FLOW_VAE = 83_819_683  # 16-channel SD3 / Flux AutoencoderKL (no quant convs)
EXPECTED_PARAMS: dict[tuple[str, str], int] = {
    ("sd15", "unet"): 859_520_964,  # SD v1 model card: "860M UNet"
    ("sd15", "vae"): SD_VAE,
    ("sd15", "text_encoder"): CLIP_L,
    ("sd21", "unet"): 865_910_724,  # SD 2 model card: "865M UNet"
    ("sd21", "vae"): SD_VAE,
    ("sd21", "text_encoder"): CLIP_H_23,
    ("sdxl", "unet"): 2_567_463_684,  # SDXL paper: "2.6B UNet"; sd_xl_base_1.0.safetensors = 6.94 GB fp16
    ("sdxl", "vae"): SD_VAE,
    ("sdxl", "text_encoder"): CLIP_L,
    ("sdxl", "text_encoder_2"): CLIP_BIGG_PROJ,
    # SDXL refiner: sgm's sd_xl_refiner.yaml (model_channels 384, channel_mult [1,2,4,4], attention at
    # levels 1 and 2 with transformer_depth 4). sd_xl_refiner_1.0.safetensors is 6.08 GB in fp16 =
    # 2 bytes x (2.2595B UNet + 0.6947B bigG + 0.0837B VAE), i.e. the UNet is 2.26B, not 2.52B.
    ("sdxl-refiner", "unet"): 2_259_526_660,
    ("sdxl-refiner", "vae"): SD_VAE,
    ("sdxl-refiner", "text_encoder_2"): CLIP_BIGG_PROJ,
    # SD3.5 Medium (MMDiT-X) card: "2.5B". diffusers keeps the 384x384x1536 pos_embed (226,492,416) as a
    # buffer, not a parameter: 2,243,171,520 + 226,492,416 = 2.47B, which is the published "2.5B" and
    # matches sd3.5_medium.safetensors (5.11 GB fp16 with the VAE).
    ("sd35-medium", "transformer"): 2_243_171_520,
    ("sd35-medium", "vae"): FLOW_VAE,
    ("sd35-medium", "text_encoder"): CLIP_L_PROJ,
    ("sd35-medium", "text_encoder_2"): CLIP_BIGG_PROJ,
    ("sd35-medium", "text_encoder_3"): T5_XXL_ENCODER,
    ("flux-dev", "transformer"): 11_901_408_320,  # FLUX.1 card: "12B"; flux1-dev.safetensors 23.8 GB bf16
    ("flux-dev", "vae"): FLOW_VAE,
    ("flux-dev", "text_encoder"): CLIP_L,
    ("flux-dev", "text_encoder_2"): T5_XXL_ENCODER,
}
SD35_POS_EMBED = 384 * 384 * 1536


def _index(arch: str) -> dict[str, Any]:
    return json.loads((ARCHS / arch / "model_index.json").read_text())


def _components(arch: str) -> dict[str, tuple[str | None, str | None]]:
    """Component name -> (library, class) from model_index.json."""
    return {k: tuple(v) for k, v in _index(arch).items() if not k.startswith("_") and isinstance(v, list)}


def _pipeline_kwargs(arch: str) -> dict[str, Any]:
    """Non-component entries of model_index.json (requires_safety_checker, ...)."""
    return {k: v for k, v in _index(arch).items() if not k.startswith("_") and not isinstance(v, list)}


def _weighted(arch: str) -> list[str]:
    return [
        name
        for name, (lib, _) in _components(arch).items()
        if lib is not None and not name.startswith("tokenizer") and name != "scheduler"
    ]


def _build(arch: str, name: str) -> torch.nn.Module:
    lib, cls_name = _components(arch)[name]
    folder = ARCHS / arch / name
    if lib == "diffusers":
        cls = getattr(diffusers, cls_name)
        return cls.from_config(cls.load_config(folder))
    cls = getattr(transformers, cls_name)
    return cls(cls.config_class.from_pretrained(folder)).eval()


def _scheduler_config(arch: str) -> dict[str, Any]:
    cfg = json.loads((ARCHS / arch / "scheduler" / "scheduler_config.json").read_text())
    cfg.pop("_diffusers_version")
    return cfg


def _clip_tokenizer() -> transformers.CLIPTokenizer:
    return transformers.CLIPTokenizer(
        vocab_file=str(CLIP_TOKENIZER / "vocab.json"),
        merges_file=str(CLIP_TOKENIZER / "merges.txt"),
        model_max_length=77,
        pad_token="<|endoftext|>",
    )


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer() -> transformers.CLIPTokenizer:
    return _clip_tokenizer()


# ------------------------------------------------------------------------------------------ layout


@pytest.mark.parametrize("arch", [*FULL_SIZE, *TINY])
def test_folder_layout(arch: str) -> None:
    index = _index(arch)
    assert hasattr(diffusers, index["_class_name"])
    assert index["_diffusers_version"]
    files = {p.relative_to(ARCHS / arch).as_posix() for p in (ARCHS / arch).rglob("*") if p.is_file()}
    expected = {"model_index.json"}
    for name, (lib, cls_name) in _components(arch).items():
        if lib is None or name.startswith("tokenizer"):
            assert not (ARCHS / arch / name).exists(), f"{arch}/{name} must not be shipped"
            continue
        if name == "scheduler":
            cfg = json.loads((ARCHS / arch / name / "scheduler_config.json").read_text())
            assert cfg["_class_name"] == cls_name
            expected.add(f"{name}/scheduler_config.json")
            continue
        cfg = json.loads((ARCHS / arch / name / "config.json").read_text())
        if lib == "diffusers":
            assert cfg["_class_name"] == cls_name
        else:
            assert cfg["architectures"] == [cls_name]
        expected.add(f"{name}/config.json")
    assert files == expected  # configs only: no weights, no tokenizer files


# -------------------------------------------------------------------------------------- full size


@pytest.mark.parametrize(("arch", "name"), sorted(EXPECTED_PARAMS))
def test_full_size_param_count(arch: str, name: str) -> None:
    with torch.device("meta"):
        model = _build(arch, name)
    count = sum(p.numel() for p in model.parameters())
    assert count == pytest.approx(EXPECTED_PARAMS[arch, name], rel=0.005), f"{arch}/{name}: {count:,}"
    if arch == "sd35-medium" and name == "transformer":
        assert sum(b.numel() for b in model.buffers()) == SD35_POS_EMBED


@pytest.mark.parametrize("arch", FULL_SIZE)
def test_every_full_size_component_is_counted(arch: str) -> None:
    assert {name for a, name in EXPECTED_PARAMS if a == arch} == set(_weighted(arch))


# ------------------------------------------------------------------------------------------- tiny


@pytest.mark.parametrize(("tiny", "full"), sorted(TINY.items()))
def test_tiny_mirrors_full_size(tiny: str, full: str) -> None:
    assert _index(tiny)["_class_name"] == _index(full)["_class_name"]
    assert _components(tiny) == _components(full)
    assert _pipeline_kwargs(tiny) == _pipeline_kwargs(full)
    assert _scheduler_config(tiny) == _scheduler_config(full)
    vae = json.loads((ARCHS / tiny / "vae" / "config.json").read_text())
    full_vae = json.loads((ARCHS / full / "vae" / "config.json").read_text())
    assert 2 ** (len(vae["block_out_channels"]) - 1) == 8  # 64x64 image -> 8x8 latent, like the real VAE
    for key in ("latent_channels", "scaling_factor", "shift_factor", "force_upcast", "use_quant_conv"):
        assert vae.get(key) == full_vae.get(key), key
    for name in _weighted(tiny):
        cfg = json.loads((ARCHS / tiny / name / "config.json").read_text())
        if cfg.get("model_type") in ("clip_text_model", "t5"):
            assert cfg["vocab_size"] == 49408  # fed by the shipped CLIP tokenizer
        if cfg.get("model_type") == "clip_text_model":
            assert cfg["max_position_embeddings"] == 77


@pytest.mark.parametrize("arch", sorted(TINY))
def test_tiny_pipeline_runs(arch: str, tokenizer: transformers.CLIPTokenizer, one_thread: None) -> None:
    torch.manual_seed(0)
    components: dict[str, Any] = {}
    for name, (lib, _) in _components(arch).items():
        if lib is None:
            components[name] = None
        elif name.startswith("tokenizer"):
            components[name] = tokenizer
        elif name == "scheduler":
            cls = getattr(diffusers, _components(arch)[name][1])
            components[name] = cls.from_config(cls.load_config(ARCHS / arch / name))
        else:
            components[name] = _build(arch, name)
    pipe = getattr(diffusers, _index(arch)["_class_name"])(**components, **_pipeline_kwargs(arch))
    pipe.set_progress_bar_config(disable=True)

    kwargs: dict[str, Any] = {"prompt": "a photo of a cat", "num_inference_steps": 2, "output_type": "np"}
    if arch == "tiny-sdxl-refiner":  # img2img: the image sets the size
        image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        kwargs.update(image=image, strength=1.0)
    else:
        kwargs.update(height=64, width=64)
    images = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all()

    if arch in ("tiny-sd15", "tiny-sdxl"):  # cheap enough to stand in for the real thing in CPU tests
        start = time.perf_counter()
        pipe(**{**kwargs, "num_inference_steps": 4}, generator=torch.Generator().manual_seed(0))
        assert time.perf_counter() - start < 1.0
