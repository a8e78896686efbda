"""The LDM-layout exporter used to make tiny single-file checkpoints: diffusers must read them back exactly.

Each test builds a tiny random pipeline, saves its diffusers config folder (the ``config=`` that our
loader passes to ``from_single_file``), writes the weights as one original-layout ``.safetensors``
file and loads that back with diffusers' own single-file loader, offline (conftest sets HF_HUB_OFFLINE).
"""

from __future__ import annotations

from importlib import resources
from itertools import chain
from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from imagegenx.models.ldm_export import UNET_PREFIX, save_ldm_checkpoint, to_ldm_state_dict, unet_to_ldm

CLIP_L_HIDDEN = 32
# diffusers tells SDXL's two text encoders apart in a checkpoint by their width (768 vs 1280 in the
# real models): with equal widths it would load CLIP-L's weights into text_encoder_2. So the tiny
# "bigG" is wider than the tiny CLIP-L, as the real one is.
BIG_G_HIDDEN = 64
PROJECTION_DIM = 32
ADDITION_TIME_EMBED_DIM = 8
WEIGHTED = ("unet", "vae", "text_encoder", "text_encoder_2")


def _tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    root = resources.files("imagegenx.models") / "tokenizers/clip"
    return CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), pad_token=pad_token)


def _clip_config(hidden: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=5,
        num_attention_heads=4,
        projection_dim=PROJECTION_DIM,
        layer_norm_eps=1e-5,
        hidden_act="gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def _vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(32, 32, 64, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=64,
    )


def _sd15() -> StableDiffusionPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        # SD 1.5's shape: attention everywhere but in the last down / first up block.
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CLIP_L_HIDDEN,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    vae = _vae()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_clip_config(CLIP_L_HIDDEN))
    return StableDiffusionPipeline(
        unet=unet,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_tokenizer(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def _sdxl() -> StableDiffusionXLPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        # SDXL's shape: no attention in the first down / last up block.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * ADDITION_TIME_EMBED_DIM + PROJECTION_DIM,
        cross_attention_dim=CLIP_L_HIDDEN + BIG_G_HIDDEN,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    vae = _vae()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_clip_config(CLIP_L_HIDDEN))
    torch.manual_seed(0)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(BIG_G_HIDDEN))
    return StableDiffusionXLPipeline(
        unet=unet,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=_tokenizer(),
        tokenizer_2=_tokenizer(pad_token="!"),
        image_encoder=None,
        feature_extractor=None,
    )


def _config_folder(pipe, folder: Path) -> str:
    """The diffusers folder with configs and tokenizers only: every weight must come from the checkpoint."""
    pipe.save_pretrained(folder)
    for weights in chain(folder.rglob("*.safetensors"), folder.rglob("*.bin")):
        weights.unlink()
    return str(folder)


def _public(config) -> dict:
    return {key: value for key, value in config.items() if not key.startswith("_")}


def _assert_same_pipeline(original, loaded) -> None:
    assert type(loaded) is type(original)
    for name in WEIGHTED:
        if getattr(original, name, None) is None:
            continue
        want, got = getattr(original, name).state_dict(), getattr(loaded, name).state_dict()
        assert got.keys() == want.keys(), name
        differ = [
            key
            for key in want
            if got[key].device != want[key].device
            or got[key].dtype != want[key].dtype
            or got[key].shape != want[key].shape
            or not torch.equal(got[key], want[key])
        ]
        assert not differ, f"{name}: {len(differ)} tensor(s) differ, e.g. {differ[:3]}"
        module = getattr(loaded, name)
        on_meta = [n for n, t in chain(module.named_parameters(), module.named_buffers()) if t.is_meta]
        assert not on_meta, f"{name}: left uninitialised: {on_meta[:3]}"
    assert type(loaded.scheduler) is type(original.scheduler)
    assert _public(loaded.scheduler.config) == _public(original.scheduler.config)
    for name in ("tokenizer", "tokenizer_2"):
        if getattr(original, name, None) is not None:
            assert getattr(loaded, name).get_vocab() == getattr(original, name).get_vocab()


def test_sd15_checkpoint_round_trips_through_from_single_file(tmp_path):
    pipe = _sd15()
    state = to_ldm_state_dict(pipe)

    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(key.startswith(prefixes) for key in state)
    for key in (
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.time_embed.0.weight",
        "model.diffusion_model.input_blocks.1.0.in_layers.0.weight",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.middle_block.2.emb_layers.1.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",  # no attention: upsampler at .1
        "model.diffusion_model.output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.encoder.down.0.block.1.conv2.weight",
        "first_stage_model.encoder.down.2.block.0.nin_shortcut.weight",
        "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight",
        "first_stage_model.encoder.down.2.downsample.conv.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.decoder.up.0.block.2.conv1.weight",
        "first_stage_model.decoder.norm_out.weight",
        "first_stage_model.post_quant_conv.weight",
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.4.mlp.fc2.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ):
        assert key in state, key
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in state
    assert not any(".input_blocks.3.1." in key for key in state)  # no attention beside a downsampler
    for name in ("q", "k", "v", "proj_out"):
        assert state[f"first_stage_model.encoder.mid.attn_1.{name}.weight"].shape == (64, 64, 1, 1)
    assert state["first_stage_model.decoder.mid.attn_1.norm.weight"].shape == (64,)

    ckpt = save_ldm_checkpoint(pipe, tmp_path / "tiny-sd15.safetensors")
    assert load_file(ckpt).keys() == state.keys()
    loaded = StableDiffusionPipeline.from_single_file(
        str(ckpt), config=_config_folder(pipe, tmp_path / "config"), local_files_only=True
    )
    _assert_same_pipeline(pipe, loaded)


def test_sdxl_checkpoint_round_trips_through_from_single_file(tmp_path):
    pipe = _sdxl()
    state = to_ldm_state_dict(pipe)

    prefixes = (
        "model.diffusion_model.",
        "first_stage_model.",
        "conditioner.embedders.0.transformer.text_model.",
        "conditioner.embedders.1.model.",
    )
    assert all(key.startswith(prefixes) for key in state)
    for key in (
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.label_emb.0.0.weight",
        "model.diffusion_model.label_emb.0.2.bias",
        "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
        "model.diffusion_model.middle_block.1.transformer_blocks.1.ff.net.2.weight",
        "model.diffusion_model.output_blocks.2.2.conv.weight",  # after the attention: upsampler at .2
        "model.diffusion_model.output_blocks.5.0.skip_connection.weight",
        "first_stage_model.encoder.mid.attn_1.q.weight",
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
        "conditioner.embedders.1.model.token_embedding.weight",
        "conditioner.embedders.1.model.ln_final.bias",
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.out_proj.weight",
        "conditioner.embedders.1.model.transformer.resblocks.0.ln_1.weight",
        "conditioner.embedders.1.model.transformer.resblocks.0.ln_2.bias",
        "conditioner.embedders.1.model.transformer.resblocks.4.mlp.c_fc.weight",
        "conditioner.embedders.1.model.transformer.resblocks.4.mlp.c_proj.bias",
    ):
        assert key in state, key
    assert not any(".input_blocks.1.1." in key or ".output_blocks.5.1." in key for key in state)

    big_g = "conditioner.embedders.1.model."
    layer = pipe.text_encoder_2.text_model.encoder.layers[0].self_attn
    in_proj = state[big_g + "transformer.resblocks.0.attn.in_proj_weight"]
    assert in_proj.shape == (3 * BIG_G_HIDDEN, BIG_G_HIDDEN)
    assert torch.equal(in_proj, torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight]))
    assert state[big_g + "transformer.resblocks.0.attn.in_proj_bias"].shape == (3 * BIG_G_HIDDEN,)
    assert state[big_g + "positional_embedding"].shape == (77, BIG_G_HIDDEN)
    text_projection = state[big_g + "text_projection"]
    assert text_projection.shape == (BIG_G_HIDDEN, PROJECTION_DIM)
    assert torch.equal(text_projection, pipe.text_encoder_2.text_projection.weight.T)

    ckpt = save_ldm_checkpoint(pipe, tmp_path / "tiny-sdxl.safetensors")
    loaded = StableDiffusionXLPipeline.from_single_file(
        str(ckpt), config=_config_folder(pipe, tmp_path / "config"), local_files_only=True
    )
    _assert_same_pipeline(pipe, loaded)


_CROSS_DOWN, _CROSS_UP = "CrossAttnDownBlock2D", "CrossAttnUpBlock2D"


@pytest.mark.parametrize(
    ("layers_per_block", "down_block_types", "up_block_types"),
    [
        (1, ("DownBlock2D", _CROSS_DOWN, _CROSS_DOWN), (_CROSS_UP, _CROSS_UP, "UpBlock2D")),
        (3, (_CROSS_DOWN, _CROSS_DOWN, "DownBlock2D"), ("UpBlock2D", _CROSS_UP, _CROSS_UP)),
    ],
    ids=["sdxl-like-1-layer", "sd15-like-3-layers"],
)
def test_unet_block_numbering_follows_the_config(layers_per_block, down_block_types, up_block_types):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 32, 64),
        layers_per_block=layers_per_block,
        down_block_types=down_block_types,
        up_block_types=up_block_types,
        cross_attention_dim=32,
        sample_size=16,
    )
    state = unet_to_ldm(unet)

    def indices(kind: str) -> set[int]:
        return {int(key.split(".")[1]) for key in state if key.startswith(kind + ".")}

    # conv_in, layers_per_block entries per level, a downsampler between levels
    assert indices("input_blocks") == set(range(1 + 3 * layers_per_block + 2))
    assert indices("output_blocks") == set(range(3 * (layers_per_block + 1)))
    assert f"input_blocks.{layers_per_block + 1}.0.op.weight" in state

    # diffusers' own reader of the layout gives back exactly the original weights
    want = unet.state_dict()
    got = convert_ldm_unet_checkpoint(_prefixed_unet(state), dict(unet.config))
    assert got.keys() == want.keys()
    assert all(torch.equal(got[key], want[key]) for key in want)


def _prefixed_unet(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {UNET_PREFIX + key: tensor for key, tensor in state.items()}


def test_unmapped_weights_are_refused():
    pipe = _sd15()
    pipe.unet.register_buffer("stray", torch.zeros(1))
    with pytest.raises(KeyError, match="stray"):
        to_ldm_state_dict(pipe)
