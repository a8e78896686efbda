"""LoRAs by name: loaded once per pipeline, switched per batch, never reloading the base model."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from imagegenx.models.lora import LoraLibrary, LoraSet
from imagegenx.models.lora_files import write_kohya_lora, write_peft_lora
from imagegenx.models.lora_fused import FusedLoraSet
from imagegenx.types import LoraRef, UserError

TOKENIZER_DIR = resources.files("imagegenx.models") / "tokenizers/clip"


def _tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"))


def _text_config() -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        projection_dim=32,
        vocab_size=49408,
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
    )


def sd_components() -> dict:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )
    vae = _vae()
    text_encoder = CLIPTextModel(_text_config())
    return {
        "unet": unet,
        "scheduler": EulerDiscreteScheduler(steps_offset=1),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": _tokenizer(),
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }


def sdxl_components() -> dict:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 * 8 + 32
        cross_attention_dim=64,
    )
    vae = _vae()
    return {
        "unet": unet,
        "scheduler": EulerDiscreteScheduler(steps_offset=1),
        "vae": vae,
        "text_encoder": CLIPTextModel(_text_config()),
        "text_encoder_2": CLIPTextModelWithProjection(_text_config()),
        "tokenizer": _tokenizer(),
        "tokenizer_2": _tokenizer(),
        "image_encoder": None,
        "feature_extractor": None,
    }


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """style (diffusers/peft, UNet + CLIP), detail (diffusers/peft, UNet only), kohya (kohya, UNet + te1)."""
    folder = tmp_path_factory.mktemp("loras")
    parts = sd_components()
    write_peft_lora(folder / "style.safetensors", StableDiffusionPipeline, parts, seed=0)
    write_peft_lora(folder / "detail.safetensors", StableDiffusionPipeline, parts, text_encoders=(), seed=1)
    write_kohya_lora(folder / "kohya_film.safetensors", parts, seed=2)
    xl = sdxl_components()
    write_peft_lora(
        folder / "xl_style.safetensors",
        StableDiffusionXLPipeline,
        xl,
        text_encoders=("text_encoder", "text_encoder_2"),
        seed=3,
        hub_layout=False,  # text encoder keys as the installed transformers names its modules
    )
    te_prefixes = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    write_kohya_lora(folder / "xl_kohya_te.safetensors", xl, unet_targets=(), text_prefixes=te_prefixes)
    # UNet + text_encoder keys like an SD 1.5 LoRA, but shaped for the SDXL UNet.
    write_peft_lora(folder / "xl_unet.safetensors", StableDiffusionXLPipeline, xl, seed=4)
    # The UNet half fits an SD 1.5 model, the text encoder half does not.
    tensors = load_file(folder / "style.safetensors")
    bad_key = next(k for k in tensors if k.startswith("text_encoder.") and ".lora_A." in k)
    tensors[bad_key] = torch.zeros(4, 16)
    save_file(tensors, str(folder / "half_fit.safetensors"))
    (folder / "evil.ckpt").write_bytes(b"not really a pickle")
    return folder


LORA_MODES = {"adapters": LoraSet, "fused": FusedLoraSet}


@pytest.fixture(params=sorted(LORA_MODES))
def sd(lora_dir, request):
    """An SD pipeline and its LoRAs, once as PEFT adapters and once merged into the weights."""
    pipe = StableDiffusionPipeline(**sd_components(), requires_safety_checker=False)
    return pipe, LORA_MODES[request.param](pipe, LoraLibrary(lora_dir))


@pytest.fixture
def sd_adapters(lora_dir):
    pipe = StableDiffusionPipeline(**sd_components(), requires_safety_checker=False)
    return pipe, LoraSet(pipe, LoraLibrary(lora_dir))


def unet_out(pipe, cross_dim: int = 32, **kwargs) -> torch.Tensor:
    gen = torch.Generator().manual_seed(42)
    sample = torch.randn(1, 4, 8, 8, generator=gen)
    context = torch.randn(1, 7, cross_dim, generator=gen)
    with torch.no_grad():
        return pipe.unet(sample, 10, encoder_hidden_states=context, **kwargs).sample


def text_out(pipe, encoder: str = "text_encoder") -> torch.Tensor:
    ids = pipe.tokenizer("a cat in a hat", return_tensors="pt").input_ids
    with torch.no_grad():
        return getattr(pipe, encoder)(ids)[0]


def refs(*pairs) -> tuple[LoraRef, ...]:
    return tuple(LoraRef(name, weight) for name, weight in pairs)


def test_lora_changes_unet_and_empty_set_restores_base_bit_identically(sd):
    pipe, loras = sd
    base_unet, base_text = unet_out(pipe), text_out(pipe)
    assert loras.activate(refs(("style", 1.0))) is True
    assert loras.active() == refs(("style", 1.0))
    assert not torch.allclose(unet_out(pipe), base_unet, atol=1e-4)
    assert not torch.allclose(text_out(pipe), base_text, atol=1e-4)
    assert loras.activate(()) is True
    assert loras.active() == ()
    assert torch.equal(unet_out(pipe), base_unet)
    assert torch.equal(text_out(pipe), base_text)
    assert loras.activate(()) is False


def test_weights_and_combinations_change_the_output(sd):
    pipe, loras = sd
    loras.activate(refs(("style", 1.0)))
    style_full = unet_out(pipe)
    assert loras.activate(refs(("style", 1.0))) is False  # same set, same weights: nothing to redo
    assert loras.activate(refs(("style", 0.5))) is True
    style_half = unet_out(pipe)
    loras.activate(refs(("detail", 1.0)))
    detail = unet_out(pipe)
    loras.activate(refs(("style", 1.0), ("detail", 1.0)))
    both = unet_out(pipe)
    for a, b in [(style_full, style_half), (both, style_full), (both, detail), (style_full, detail)]:
        assert not torch.allclose(a, b, atol=1e-4)
    loras.activate(refs(("style", 1.0)))
    assert torch.equal(unet_out(pipe), style_full)  # switching back gives the same output again
    assert loras.loads == 2


def test_switching_loads_each_file_once_and_never_reloads_the_base(sd, monkeypatch):
    pipe, loras = sd
    unet, text_encoder = pipe.unet, pipe.text_encoder
    base_ptrs = {n: p.data_ptr() for n, p in unet.named_parameters()}
    base_out = unet_out(pipe)

    def forbidden(*args, **kwargs):
        raise AssertionError("the base model must not be loaded again")

    for cls in (StableDiffusionPipeline, UNet2DConditionModel, CLIPTextModel):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(forbidden))
    reads = []
    real_load = pipe.load_lora_weights
    monkeypatch.setattr(
        pipe, "load_lora_weights", lambda path, **kw: reads.append(path) or real_load(path, **kw)
    )

    a, b = refs(("style", 1.0)), refs(("kohya_film", 0.8))
    outputs = {}
    for _ in range(3):
        for lora_set in (a, b, a, ()):
            loras.activate(lora_set)
            out = unet_out(pipe), text_out(pipe)
            first = outputs.setdefault(lora_set, out)
            assert torch.equal(first[0], out[0]) and torch.equal(first[1], out[1]), lora_set
    assert len({o[0].sum().item() for o in outputs.values()}) == 3  # A, B and base all differ
    assert loras.loads == 2
    assert sorted(os.path.basename(p) for p in reads) == ["kohya_film.safetensors", "style.safetensors"]
    assert pipe.unet is unet and pipe.text_encoder is text_encoder
    after = {
        n.replace(".base_layer", ""): p.data_ptr() for n, p in unet.named_parameters() if "lora_" not in n
    }
    assert after == base_ptrs
    assert torch.equal(outputs[()][0], base_out)


def test_kohya_and_diffusers_formats_change_unet_and_text_encoder(sd):
    pipe, loras = sd
    base_unet, base_text = unet_out(pipe), text_out(pipe)
    base_weights = {n: p.clone() for n, p in pipe.unet.named_parameters()}
    for name in ("kohya_film", "style"):
        loras.activate(refs((name, 1.0)))
        assert not torch.allclose(unet_out(pipe), base_unet, atol=1e-4), name
        assert not torch.allclose(text_out(pipe), base_text, atol=1e-4), name
        # Conv, feed-forward and projection layers were loaded too, not only attention (LCM-LoRA-like):
        # they hold adapters, or (fused) their weights changed.
        with_lora = {
            n for n, m in pipe.unet.named_modules() if any(name in k for k in getattr(m, "lora_A", {}))
        } | {
            n.removesuffix(".weight")
            for n, p in pipe.unet.named_parameters()
            if n in base_weights and not torch.equal(p, base_weights[n])
        }
        for suffix in ("resnets.0.conv1", "ff.net.2", "attn2.to_k", "proj_in", "time_emb_proj"):
            assert any(n.endswith(suffix) for n in with_lora), (name, suffix)
    loras.activate(refs(("kohya_film", 1.0)))
    kohya_full = unet_out(pipe)
    loras.activate(refs(("kohya_film", 0.0)))  # weight 0 is the base output (up to rounding)
    assert torch.allclose(unet_out(pipe), base_unet, atol=1e-6)
    assert not torch.allclose(kohya_full, base_unet, atol=1e-4)


@pytest.mark.parametrize("mode", sorted(LORA_MODES))
def test_sdxl_loras_in_both_formats_reach_both_text_encoders(lora_dir, sd_adapters, mode):
    sd = sd_adapters
    pipe = StableDiffusionXLPipeline(**sdxl_components())
    loras = LORA_MODES[mode](pipe, LoraLibrary(lora_dir))
    added = {"text_embeds": torch.zeros(1, 32), "time_ids": torch.zeros(1, 6)}

    def outputs():
        unet = unet_out(pipe, 64, added_cond_kwargs=added)
        return unet, text_out(pipe, "text_encoder"), text_out(pipe, "text_encoder_2")

    base = outputs()
    assert loras.activate(refs(("xl_style", 1.5))) is True
    for out, ref in zip(outputs(), base, strict=True):
        assert not torch.allclose(out, ref, atol=1e-4)
    assert loras.activate(refs(("xl_kohya_te", 1.0))) is True  # lora_te1_ / lora_te2_ keys only
    kohya = outputs()
    assert torch.equal(kohya[0], base[0])
    assert not torch.allclose(kohya[1], base[1], atol=1e-4)
    assert not torch.allclose(kohya[2], base[2], atol=1e-4)
    loras.activate(())
    for out, ref in zip(outputs(), base, strict=True):
        assert torch.equal(out, ref)
    with pytest.raises(UserError, match="the model has no text_encoder_2"):  # SDXL LoRA, SD 1.5 model
        sd[1].activate(refs(("xl_style", 1.0)))
    assert sd[1].loads == 0


@pytest.mark.parametrize(
    ("loras", "message"),
    [
        (refs(("style", 2.5)), "outside 0..2"),
        (refs(("style", -0.1)), "outside 0..2"),
        (refs(("style", float("nan"))), "must be a number"),
        (refs(("style", 1.0), ("style", 0.5)), "given twice"),
        (
            refs(("nope", 1.0)),
            "available LoRAs: detail, half_fit, kohya_film, style, xl_kohya_te, xl_style, xl_unet",
        ),
    ],
)
def test_activate_refuses_bad_sets_without_changing_anything(sd, loras, message):
    _pipe, lora_set = sd
    lora_set.activate(refs(("detail", 1.0)))
    with pytest.raises(UserError, match=message):
        lora_set.activate(loras)
    assert lora_set.active() == refs(("detail", 1.0))
    assert lora_set.loads == 1


def test_a_lora_that_does_not_fit_is_refused_and_leaves_the_pipeline_as_it_was(sd):
    pipe, loras = sd
    loras.activate(refs(("detail", 1.0)))
    detail = unet_out(pipe), text_out(pipe)
    with pytest.raises(UserError, match=r"^LoRA 'xl_unet' does not fit this model .*size mismatch") as err:
        loras.activate(refs(("style", 1.0), ("xl_unet", 1.0)))  # style loads, xl_unet fails
    assert "\n" not in str(err.value)
    assert loras.active() == refs(("detail", 1.0)) and loras.loads == 2
    assert torch.equal(unet_out(pipe), detail[0]) and torch.equal(text_out(pipe), detail[1])
    assert "lora_xl_unet" not in str(pipe.get_list_adapters())
    with pytest.raises(UserError, match="LoRA 'half_fit' does not fit"):
        loras.activate(refs(("half_fit", 1.0)))  # loads into the UNet, then fails in the text encoder
    assert "half_fit" not in str(pipe.get_list_adapters())  # the UNet half was removed again
    assert torch.equal(unet_out(pipe), detail[0]) and torch.equal(text_out(pipe), detail[1])
    if isinstance(loras, FusedLoraSet):  # nothing of the failed loads stays in the module tree
        assert not any("lora" in name for name, _ in pipe.unet.named_modules())
        assert not any("lora" in name for name, _ in pipe.text_encoder.named_modules())
    loras.activate(())
    assert loras.activate(refs(("style", 1.0))) is True  # the pipeline still works


def test_library_names_and_refusals(lora_dir):
    lib = LoraLibrary(lora_dir)
    assert lib.names() == ["detail", "half_fit", "kohya_film", "style", "xl_kohya_te", "xl_style", "xl_unet"]
    assert lib.path_for("style") == lora_dir / "style.safetensors"
    with pytest.raises(UserError, match=r"without \.safetensors: 'style'"):
        lib.path_for("style.safetensors")
    for bad in ("../x", "/abs", "a/b", "a\\b", "..", ""):
        with pytest.raises(UserError, match=r"not a plain name|empty LoRA name"):
            lib.path_for(bad)
    for pickle_name in ("evil", "evil.ckpt", "other.pt"):
        with pytest.raises(UserError, match="refusing to load a pickle checkpoint"):
            lib.path_for(pickle_name)
    with pytest.raises(
        UserError, match=r"'missing' not found .*available LoRAs: detail, half_fit, kohya_film"
    ):
        lib.path_for("missing")
    assert LoraLibrary(lora_dir / "absent").names() == []


def test_describe_reads_format_and_targets_from_the_header(lora_dir):
    lib = LoraLibrary(lora_dir)
    assert lib.describe("kohya_film") == {
        "name": "kohya_film",
        "format": "kohya",
        "targets": ["text_encoder", "unet"],
    }
    assert lib.describe("style") == {"name": "style", "format": "peft", "targets": ["text_encoder", "unet"]}
    assert lib.describe("detail")["targets"] == ["unet"]
    assert lib.describe("xl_style")["targets"] == ["text_encoder", "text_encoder_2", "unet"]


def test_a_compiled_model_says_once_that_lora_changes_compile_again(lora_dir, caplog):
    pipe = StableDiffusionPipeline(**sd_components(), requires_safety_checker=False)
    loras = LoraSet(pipe, LoraLibrary(lora_dir), compiled=True)
    with caplog.at_level("WARNING", logger="imagegenx.models.lora"):
        loras.activate(refs(("style", 1.0)))
        loras.activate(refs(("detail", 0.5)))
    warnings = [r for r in caplog.records if "compiles the UNet again" in r.getMessage()]
    assert len(warnings) == 1
    assert loras.active() == refs(("detail", 0.5))  # the switch itself happens as on any model


@pytest.mark.parametrize(
    "lora_set",
    [refs(("style", 1.0)), refs(("style", 0.5), ("detail", 1.0)), refs(("kohya_film", 0.8)), ()],
)
def test_fused_loras_give_the_adapters_output(lora_dir, lora_set):
    outputs = []
    for mode in ("adapters", "fused"):
        pipe = StableDiffusionPipeline(**sd_components(), requires_safety_checker=False)
        loras = LORA_MODES[mode](pipe, LoraLibrary(lora_dir))
        loras.activate(refs(("detail", 1.0)))  # a set before: the switch must undo it
        loras.activate(lora_set)
        outputs.append((unet_out(pipe), text_out(pipe)))
    (unet_a, text_a), (unet_f, text_f) = outputs
    assert torch.allclose(unet_a, unet_f, atol=1e-5)
    assert torch.allclose(text_a, text_f, atol=1e-5)


def test_fused_switches_keep_a_compiled_unet_without_recompiling(lora_dir):
    pipe = StableDiffusionPipeline(**sd_components(), requires_safety_checker=False)
    eager = {}
    loras = FusedLoraSet(pipe, LoraLibrary(lora_dir))
    sets = [(), refs(("style", 1.0)), refs(("kohya_film", 0.8)), refs(("style", 0.3), ("detail", 1.0)), ()]
    for lora_set in sets:
        loras.activate(lora_set)
        eager[lora_set] = unet_out(pipe)
    compiles = []

    def counting_backend(graph, example_inputs):
        compiles.append(graph)
        return graph.forward

    pipe.unet.forward = torch.compile(pipe.unet.forward, backend=counting_backend, dynamic=False)
    for lora_set in sets + sets[::-1]:
        loras.activate(lora_set)
        assert torch.allclose(unet_out(pipe), eager[lora_set], atol=1e-6), lora_set
    assert len(compiles) == 1  # one graph for every set: the module tree never changed
    assert not any("lora" in name for name, _ in pipe.unet.named_modules())
    assert len({out.sum().item() for out in eager.values()}) == 4  # the sets differ from each other
    assert loras.original_bytes() > 0


def test_merged_loras_reach_fused_qkv_projections(lora_dir):
    """With fused QKV the attention reads to_qkv (and to_kv in cross-attention), not the to_q, to_k
    and to_v that LoRA files name: merged sets are copied into the fused projections, so a fused
    model gives the unfused model's output for every set, and the base again after them."""
    outputs = {}
    sets = [refs(("style", 1.0)), refs(("kohya_film", 0.8)), refs(("style", 0.3), ("detail", 1.0)), ()]
    for fused in (False, True):
        pipe = StableDiffusionPipeline(**sd_components(), requires_safety_checker=False)
        if fused:
            pipe.unet.fuse_qkv_projections()
        base = unet_out(pipe)
        loras = FusedLoraSet(pipe, LoraLibrary(lora_dir))
        outputs[fused] = [base] + [loras.activate(lora_set) and unet_out(pipe) for lora_set in sets]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(outputs[False], outputs[True], strict=True))
    assert torch.equal(outputs[True][-1], outputs[True][0])  # () restores the fused model exactly
    assert not torch.allclose(outputs[True][1], outputs[True][0], atol=1e-4)  # a LoRA changes it


def test_lora_mode_follows_the_settings_and_compile():
    from types import SimpleNamespace

    from imagegenx.config import ModelSettings
    from imagegenx.models.cache import lora_set_for

    pipe = StableDiffusionPipeline(**sd_components(), requires_safety_checker=False)
    library = LoraLibrary(Path("/nonexistent"))
    for mode, speedups, expected in [
        ("auto", {}, LoraSet),
        ("auto", {"compile": "default"}, FusedLoraSet),
        ("fused", {}, FusedLoraSet),
        ("adapters", {"compile": "default"}, LoraSet),
    ]:
        model = SimpleNamespace(pipe=pipe, speedups=speedups)
        chosen = lora_set_for(model, library, ModelSettings(lora_mode=mode))
        assert type(chosen) is expected, (mode, speedups)
    fused_qkv = SimpleNamespace(pipe=pipe, speedups={"fuse_qkv": True})
    refusing = lora_set_for(fused_qkv, library, ModelSettings())  # adapters would be ignored
    with pytest.raises(UserError, match=r"fused QKV.*LORA_MODE=fused"):
        refusing.activate(refs(("style", 1.0)))
    assert lora_set_for(fused_qkv, library, ModelSettings(lora_mode="fused")).refusal == ""
