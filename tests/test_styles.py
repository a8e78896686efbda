"""Style presets: enough of them, well-formed templates, and apply_style's prompt/negative rules."""

import pytest

from imagegenx.api.styles import ALIASES, STYLES, Style, apply_style, resolve_style
from imagegenx.types import UserError


def test_at_least_twenty_styles_from_the_seed():
    assert len(STYLES) >= 20
    for name in ["photorealistic", "anime", "cartoon", "ink_wash", "oil_painting", "tech", "watercolor"]:
        assert name in STYLES
    for name in ["pixel_art", "3d_render", "cyberpunk", "fantasy_art", "line_art", "product_photo"]:
        assert name in STYLES
    for name in ["cinematic", "vintage_film", "low_poly", "isometric", "comic_book", "neon"]:
        assert name in STYLES
    assert {"flat_illustration", "studio_portrait"} <= STYLES.keys()


@pytest.mark.parametrize("style", STYLES.values(), ids=list(STYLES))
def test_every_style_is_well_formed(style):
    assert style.name in STYLES and STYLES[style.name] is style
    assert style.prompt.count("{prompt}") == 1
    assert style.label and style.negative
    assert len(style.prompt.split()) < 40  # leaves most of CLIP's 77 tokens to the user


def test_aliases_point_at_styles():
    assert all(target in STYLES for target in ALIASES.values())
    assert resolve_style("水墨") is STYLES["ink_wash"]
    assert resolve_style("科技") is STYLES["tech"]
    assert resolve_style("Oil Painting") is STYLES["oil_painting"]
    assert resolve_style("pixel-art") is STYLES["pixel_art"]
    assert resolve_style("3D") is STYLES["3d_render"]


def test_template_needs_a_prompt_slot():
    with pytest.raises(ValueError, match="prompt"):
        Style("broken", "Broken", "no slot here")


def test_no_style_leaves_everything_unchanged():
    assert apply_style(None, "a red dress", None) == ("a red dress", None)
    assert apply_style(None, "a red dress", "blurry") == ("a red dress", "blurry")
    assert apply_style("none", "a cat", "") == ("a cat", "")


def test_apply_wraps_the_prompt_and_combines_negatives():
    style = STYLES["ink_wash"]
    prompt, negative = apply_style("ink_wash", "  mountains at dawn ", None)
    assert prompt == style.prompt.replace("{prompt}", "mountains at dawn")
    assert prompt.startswith("traditional chinese ink wash painting of mountains at dawn,")
    assert negative == style.negative

    _, negative = apply_style("水墨", "mountains", "people, boats")
    assert negative == f"people, boats, {style.negative}"
    _, negative = apply_style("ink_wash", "mountains", "   ")
    assert negative == style.negative


def test_braces_in_the_prompt_are_literal():
    prompt, _ = apply_style("anime", "a {weird} prompt {0}", None)
    assert "a {weird} prompt {0}" in prompt


def test_unknown_style_lists_the_names():
    with pytest.raises(UserError, match="unknown style 'vaporwave'") as info:
        apply_style("vaporwave", "a city", None)
    assert "photorealistic" in str(info.value) and "ink_wash" in str(info.value)
