"""Prompt encoding: A1111 syntax, long prompts, and parity with diffusers' own encode_prompt."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy
import importlib.resources
from types import SimpleNamespace

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from imagegenx.pipelines.prompts import (
    BREAK,
    PromptEmbeddings,
    PromptEncoder,
    pack_chunks,
    parse_prompt_attention,
)

PROMPT = "a photo of an astronaut riding a horse on the moon, highly detailed"
WORDS = ["red", "green", "blue", "cat", "dog", "tree", "house", "sky", "sun", "moon"]  # one token each
ATOL = 1e-6


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core box: one intra-op thread is ~20x faster than two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- parser


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("normal text", [("normal text", 1.0)]),
        ("", [("", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("a (very beautiful:1.3) girl", [("a ", 1.0), ("very beautiful", 1.3), (" girl", 1.0)]),
        ("((word))", [("word", 1.1 * 1.1)]),
        ("[b]", [("b", 1 / 1.1)]),
        ("[[b]]", [("b", 1 / 1.1 / 1.1)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("unbalanced) x]", [("unbalanced) x]", 1.0)]),
        ("x:1.2) y", [("x:1.2) y", 1.0)]),
        ("\\(literal\\)", [("(literal)", 1.0)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("\\[x\\] a \\\\ b", [("[x] a \\ b", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        ("(a:1.5) (b:1.5)", [("a", 1.5), (" ", 1.0), ("b", 1.5)]),
        ("a (b [c] d) e", [("a ", 1.0), ("b ", 1.1), ("c", 1.0), (" d", 1.1), (" e", 1.0)]),
        ("((a:2) b)", [("a", 2 * 1.1), (" b", 1.1)]),
        ("(((a:2) b)", [("a", 2 * 1.1 * 1.1), (" b", 1.1 * 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ],
        ),
        ("a cat BREAK a dog", [("a cat", 1.0), BREAK, ("a dog", 1.0)]),
        ("(a BREAK b)", [("a", 1.1), BREAK, ("b", 1.1)]),
        ("a BREAK BREAK b", [("a", 1.0), BREAK, BREAK, ("b", 1.0)]),
        ("BREAKfast and a BREAKING story", [("BREAKfast and a BREAKING story", 1.0)]),
    ],
)
def test_parse_prompt_attention(text, expected):
    assert parse_prompt_attention(text) == expected


def test_pack_chunks_comma_backtrack_and_break():
    comma = 267
    # The comma is within the last 20 tokens: the words after it move to the next chunk.
    chunks = pack_chunks([([1] * 70 + [comma] + [2] * 10, 1.0)], comma)
    assert [len(t) for t, _ in chunks] == [71, 10]
    assert chunks[0][0][-1] == comma and chunks[1][0] == [2] * 10
    # The comma is too early: plain split at 75.
    chunks = pack_chunks([([1] * 40 + [comma] + [2] * 40, 1.0)], comma)
    assert [len(t) for t, _ in chunks] == [75, 6]
    # Weights travel with their tokens across the cut.
    chunks = pack_chunks([([1] * 70 + [comma], 1.0), ([2] * 10, 1.5)], comma)
    assert chunks[1] == ([2] * 10, [1.5] * 10)
    assert pack_chunks([([1, 2], 1.0), None, ([3], 0.5)], comma) == [([1, 2], [1.0, 1.0]), ([3], [0.5])]
    assert pack_chunks([], comma) == [([], [])]
    assert pack_chunks([([1] * 75, 1.0), None], comma) == [([1] * 75, [1.0] * 75)]


# ---------------------------------------------------------------- tiny real components


def _text_config() -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=5,
        max_position_embeddings=77,
        projection_dim=32,
    )


def _tokenizer(**kwargs) -> CLIPTokenizer:
    files = importlib.resources.files("imagegenx.models") / "tokenizers/clip"
    return CLIPTokenizer(str(files / "vocab.json"), str(files / "merges.txt"), model_max_length=77, **kwargs)


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_text_config()).eval()
    torch.manual_seed(0)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config()).eval()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=2,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=2,
    )
    return {
        "tokenizer": _tokenizer(),
        "tokenizer_2": _tokenizer(pad_token="!"),  # real SDXL/SD2 checkpoints pad with "!" (id 0)
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "unet": unet,
        "vae": vae,
        "scheduler": DDIMScheduler(steps_offset=1, clip_sample=False),
    }


@pytest.fixture(scope="module")
def sd15(parts):
    return PromptEncoder([parts["tokenizer"]], [parts["text_encoder"]], "sd15")


@pytest.fixture(scope="module")
def sdxl(parts):
    p = parts
    return PromptEncoder([p["tokenizer"], p["tokenizer_2"]], [p["text_encoder"], p["text_encoder_2"]], "sdxl")


def _sd_pipe(parts, tokenizer):
    return StableDiffusionPipeline(
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=tokenizer,
        unet=parts["unet"],
        scheduler=parts["scheduler"],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# ---------------------------------------------------------------- parity with diffusers


@pytest.mark.parametrize(
    ("family", "tokenizer", "clip_skip", "prompt"),
    [
        ("sd15", "tokenizer", 1, PROMPT),
        ("sd15", "tokenizer", 2, PROMPT),
        ("sd21", "tokenizer_2", 1, PROMPT),  # SD2-style tokenizer: pads with "!" instead of EOS
        ("sd21", "tokenizer_2", 2, PROMPT),
        ("sd21", "tokenizer_2", 1, ""),
    ],
)
def test_sd_matches_diffusers(parts, family, tokenizer, clip_skip, prompt, monkeypatch):
    tok = parts[tokenizer]
    encoder = parts["text_encoder"]
    if not hasattr(encoder, "text_model"):
        # diffusers' clip_skip path still calls `text_encoder.text_model.final_layer_norm`, which
        # transformers >= 5.6 removed (diffusers issue #14124); give it the attribute it expects.
        monkeypatch.setattr(
            encoder, "text_model", SimpleNamespace(final_layer_norm=encoder.final_layer_norm), raising=False
        )
    ours = PromptEncoder([tok], [encoder], family).encode(prompt, clip_skip=clip_skip)
    theirs, _ = _sd_pipe(parts, tok).encode_prompt(
        prompt, "cpu", 1, False, clip_skip=None if clip_skip == 1 else clip_skip - 1
    )
    assert ours.hidden.shape == theirs.shape == (1, 77, 32)
    assert ours.pooled is None
    torch.testing.assert_close(ours.hidden, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("clip_skip", "prompt"), [(1, PROMPT), (2, PROMPT), (1, "")])
def test_sdxl_matches_diffusers(parts, sdxl, clip_skip, prompt):
    pipe = StableDiffusionXLPipeline(**parts)
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt,
        device="cpu",
        do_classifier_free_guidance=False,
        clip_skip=None if clip_skip == 1 else clip_skip - 1,
    )
    ours = sdxl.encode(prompt, clip_skip=clip_skip)
    assert ours.hidden.shape == embeds.shape == (1, 77, 64)
    assert ours.pooled.shape == pooled.shape == (1, 32)
    torch.testing.assert_close(ours.hidden, embeds, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.pooled, pooled, atol=ATOL, rtol=0)


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_sdxl_refiner_matches_diffusers(parts, clip_skip):
    pipe = StableDiffusionXLImg2ImgPipeline(**{**parts, "text_encoder": None, "tokenizer": None})
    embeds, _, pooled, _ = pipe.encode_prompt(
        PROMPT,
        device="cpu",
        do_classifier_free_guidance=False,
        clip_skip=None if clip_skip == 1 else clip_skip - 1,
    )
    encoder = PromptEncoder([parts["tokenizer_2"]], [parts["text_encoder_2"]], "sdxl-refiner")
    ours = encoder.encode(PROMPT, clip_skip=clip_skip)
    assert ours.hidden.shape == embeds.shape == (1, 77, 32)
    torch.testing.assert_close(ours.hidden, embeds, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.pooled, pooled, atol=ATOL, rtol=0)


# ---------------------------------------------------------------- long prompts and BREAK


def _words(start: int, n: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(start, start + n))


def test_long_prompt_is_chunked(sd15):
    prompt = _words(0, 200)
    assert sd15.token_count(prompt) == 200
    hidden = sd15.encode(prompt).hidden
    assert hidden.shape == (1, 231, 32)
    torch.testing.assert_close(hidden[:, :77], sd15.encode(_words(0, 75)).hidden, atol=ATOL, rtol=0)
    torch.testing.assert_close(hidden[:, 77:154], sd15.encode(_words(75, 75)).hidden, atol=ATOL, rtol=0)
    torch.testing.assert_close(hidden[:, 154:], sd15.encode(_words(150, 50)).hidden, atol=ATOL, rtol=0)


def test_long_prompt_sdxl_pooled_from_first_chunk(sdxl):
    long, first = sdxl.encode(_words(0, 200)), sdxl.encode(_words(0, 75))
    assert long.hidden.shape == (1, 231, 64)
    torch.testing.assert_close(long.hidden[:, :77], first.hidden, atol=ATOL, rtol=0)
    torch.testing.assert_close(long.pooled, first.pooled, atol=ATOL, rtol=0)


def test_long_prompt_moves_words_after_late_comma(sd15):
    hidden = sd15.encode(_words(0, 70) + ", " + _words(70, 10)).hidden
    assert hidden.shape == (1, 154, 32)
    torch.testing.assert_close(hidden[:, :77], sd15.encode(_words(0, 70) + ",").hidden, atol=ATOL, rtol=0)
    torch.testing.assert_close(hidden[:, 77:], sd15.encode(_words(70, 10)).hidden, atol=ATOL, rtol=0)


def test_break_starts_new_chunk(sd15):
    hidden = sd15.encode("a cat BREAK a dog").hidden
    assert hidden.shape == (1, 154, 32)
    torch.testing.assert_close(hidden[:, :77], sd15.encode("a cat").hidden, atol=ATOL, rtol=0)
    torch.testing.assert_close(hidden[:, 77:], sd15.encode("a dog").hidden, atol=ATOL, rtol=0)
    assert sd15.token_count("a cat BREAK a dog") == 4


# ---------------------------------------------------------------- weights


def test_weight_scales_token_and_keeps_chunk_mean(sd15):
    plain = sd15.encode("a cat on a mat").hidden
    weighted = sd15.encode("a (cat:1.5) on a mat").hidden
    assert not torch.allclose(weighted, plain, atol=1e-3)
    torch.testing.assert_close(weighted.mean(), plain.mean(), atol=ATOL, rtol=0)
    # Position 2 is "cat" (after BOS and "a"): scaled 1.5x relative to every other token.
    ratio = weighted[0] / plain[0]
    rescale = ratio[1].mean()
    torch.testing.assert_close(ratio[2], torch.full_like(ratio[2], 1.5 * rescale), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ratio[3:], torch.full_like(ratio[3:], rescale), atol=1e-5, rtol=1e-5)
    assert torch.equal(sd15.encode("a (cat:1.0) on a mat").hidden, plain)


def test_weight_sdxl_keeps_pooled_and_mean(sdxl):
    plain, weighted = sdxl.encode("a cat on a mat"), sdxl.encode("a [cat] on a (mat:1.4)")
    assert not torch.allclose(weighted.hidden, plain.hidden, atol=1e-3)
    for half in (slice(0, 32), slice(32, 64)):  # each encoder's features keep their own mean
        torch.testing.assert_close(
            weighted.hidden[..., half].mean(), plain.hidden[..., half].mean(), atol=ATOL, rtol=0
        )
    assert torch.equal(weighted.pooled, plain.pooled)


def test_encoder_dtype_is_kept(parts):
    encoder = copy.deepcopy(parts["text_encoder"]).to(torch.bfloat16)
    out = PromptEncoder([parts["tokenizer"]], [encoder], "sd15").encode("a (cat:1.3)")
    assert out.hidden.dtype == torch.bfloat16 and out.hidden.shape == (1, 77, 32)
    assert torch.isfinite(out.hidden.float()).all()


# ---------------------------------------------------------------- cache and validation


def test_cache_returns_same_tensors_and_clears(parts):
    encoder = PromptEncoder([parts["tokenizer"]], [parts["text_encoder"]], "sd15", cache_size=2)
    first = encoder.encode("a cat")
    assert isinstance(first, PromptEmbeddings)
    assert encoder.encode("a cat") is first
    assert encoder.encode("a cat", clip_skip=2) is not first
    encoder.clear_cache()
    again = encoder.encode("a cat")
    assert again is not first and torch.equal(again.hidden, first.hidden)
    # LRU: touching "a cat" keeps it; "a dog" is the oldest when "a bird" arrives.
    dog = encoder.encode("a dog")
    assert encoder.encode("a cat") is again
    encoder.encode("a bird")
    assert encoder.encode("a cat") is again
    assert encoder.encode("a dog") is not dog


def test_validation(parts):
    with pytest.raises(ValueError, match="family"):
        PromptEncoder([parts["tokenizer"]], [parts["text_encoder"]], "flux")
    with pytest.raises(ValueError, match="sdxl needs 2"):
        PromptEncoder([parts["tokenizer"]], [parts["text_encoder"]], "sdxl")
    encoder = PromptEncoder([parts["tokenizer"]], [parts["text_encoder"]], "sd15")
    for bad in (0, 6):
        with pytest.raises(ValueError, match="clip_skip"):
            encoder.encode("a cat", clip_skip=bad)


def test_encode_many_matches_each_alone_sdxl(sdxl):
    """Prompts of one, two and one chunks with weights, encoded in one call per text encoder: each
    gets its own rows back (hidden states, emphasis, pooled from its own first chunk)."""
    prompts = ["a cat on a (mat:1.4)", _words(0, 120), "[a dog] BREAK in the rain"]
    sdxl.clear_cache()
    together = sdxl.encode_many([(p, 1) for p in prompts] + [(prompts[0], 2)])
    assert len(together) == 4
    sdxl.clear_cache()
    for prompt in prompts:
        alone = sdxl.encode(prompt)
        ours = together[(prompt, 1)]
        assert ours.hidden.shape == alone.hidden.shape
        torch.testing.assert_close(ours.hidden, alone.hidden, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.pooled, alone.pooled, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(together[(prompts[0], 2)].hidden, together[(prompts[0], 1)].hidden)
