"""Built-in style presets (the seed's "20+ 内置风格": 写实, 卡通, 水墨, 科技, 油画, ...).

A style wraps the user's prompt in a template (A1111's ``styles.csv`` convention: ``{prompt}`` marks
where it goes) and brings a negative prompt. Templates stay short: CLIP reads 77 tokens, and the
user's words should keep most of them. Names are ASCII snake_case; Chinese names and a few common
spellings are accepted as aliases (``水墨`` → ``ink_wash``, ``3d`` → ``3d_render``).
"""

from __future__ import annotations

from dataclasses import dataclass

from imagegenx.types import UserError

__all__ = ["ALIASES", "STYLES", "Style", "apply_style", "resolve_style"]


@dataclass(frozen=True)
class Style:
    name: str
    label: str
    prompt: str  # template containing "{prompt}"
    negative: str = ""

    def __post_init__(self) -> None:
        if "{prompt}" not in self.prompt:
            raise ValueError(f"style {self.name!r}: the template must contain {{prompt}}")


_LOW_QUALITY = "lowres, blurry, jpeg artifacts, watermark, text"
_NOT_PHOTO = "photo, photorealistic, realism"
_NOT_DRAWN = "cartoon, anime, illustration, painting, drawing, cgi, 3d render"

_STYLE_LIST = (
    Style(
        "photorealistic",
        "Photorealistic (写实)",
        "photorealistic photo of {prompt}, natural lighting, sharp focus, highly detailed, 8k uhd, dslr",
        f"{_NOT_DRAWN}, {_LOW_QUALITY}, deformed, bad anatomy",
    ),
    Style(
        "anime",
        "Anime (动漫)",
        "anime artwork of {prompt}, anime style, key visual, vibrant colors, studio anime, highly detailed",
        f"{_NOT_PHOTO}, 3d render, {_LOW_QUALITY}, bad anatomy",
    ),
    Style(
        "cartoon",
        "Cartoon (卡通)",
        "cartoon illustration of {prompt}, bold outlines, bright flat colors, playful, clean shapes",
        f"{_NOT_PHOTO}, gritty, dark, {_LOW_QUALITY}",
    ),
    Style(
        "ink_wash",
        "Chinese ink wash (水墨)",
        "traditional chinese ink wash painting of {prompt}, sumi-e, expressive brush strokes, "
        "black ink on rice paper, generous negative space",
        f"{_NOT_PHOTO}, vivid colors, 3d render, {_LOW_QUALITY}",
    ),
    Style(
        "oil_painting",
        "Oil painting (油画)",
        "oil painting of {prompt}, visible impasto brush strokes, rich colors, canvas texture, masterpiece",
        f"{_NOT_PHOTO}, 3d render, flat colors, {_LOW_QUALITY}",
    ),
    Style(
        "tech",
        "Tech (科技)",
        "futuristic high-tech style {prompt}, blue tones, glowing accents, clean sleek surfaces, "
        "sharp details, product launch aesthetic",
        f"rustic, vintage, warm tones, cluttered, {_LOW_QUALITY}",
    ),
    Style(
        "watercolor",
        "Watercolor (水彩)",
        "watercolor painting of {prompt}, soft washes, bleeding pigments, paper texture, delicate",
        f"{_NOT_PHOTO}, 3d render, hard edges, {_LOW_QUALITY}",
    ),
    Style(
        "pixel_art",
        "Pixel art (像素)",
        "pixel art of {prompt}, 16-bit retro game sprite style, limited palette, crisp pixels",
        f"{_NOT_PHOTO}, smooth gradients, blurry, anti-aliasing, 3d render",
    ),
    Style(
        "3d_render",
        "3D render (3D 渲染)",
        "3d render of {prompt}, octane render, global illumination, soft shadows, highly detailed, cgi",
        f"2d, flat, sketch, painting, {_LOW_QUALITY}",
    ),
    Style(
        "cyberpunk",
        "Cyberpunk (赛博朋克)",
        "cyberpunk style {prompt}, neon-lit night city, rain-slick streets, magenta and cyan glow, high tech",
        f"daylight, pastoral, natural, {_LOW_QUALITY}",
    ),
    Style(
        "fantasy_art",
        "Fantasy art (奇幻)",
        "epic fantasy art of {prompt}, magical atmosphere, dramatic lighting, intricate details, concept art",
        f"mundane, modern, {_LOW_QUALITY}, deformed",
    ),
    Style(
        "line_art",
        "Line art (线稿)",
        "clean line art of {prompt}, black ink lines on white, minimal shading, precise contours",
        f"color, shading, gradients, {_NOT_PHOTO}, {_LOW_QUALITY}",
    ),
    Style(
        "product_photo",
        "Product photo, white background (电商白底图)",
        "professional e-commerce product photo of {prompt}, pure white background, studio softbox "
        "lighting, centered, sharp focus, high detail",
        f"cluttered background, props, people, shadows on background, {_NOT_DRAWN}, {_LOW_QUALITY}",
    ),
    Style(
        "cinematic",
        "Cinematic (电影感)",
        "cinematic film still of {prompt}, shallow depth of field, anamorphic lens, dramatic lighting, "
        "color graded, film grain",
        f"{_NOT_DRAWN}, {_LOW_QUALITY}, deformed",
    ),
    Style(
        "vintage_film",
        "Vintage film (复古胶片)",
        "vintage analog film photo of {prompt}, 1970s kodachrome, faded colors, film grain, light leaks",
        f"digital, modern, {_NOT_DRAWN}, {_LOW_QUALITY}",
    ),
    Style(
        "low_poly",
        "Low poly (低多边形)",
        "low poly art of {prompt}, geometric faceted shapes, flat shaded polygons, minimal, clean",
        f"{_NOT_PHOTO}, smooth, noisy, detailed textures, {_LOW_QUALITY}",
    ),
    Style(
        "isometric",
        "Isometric (等距)",
        "isometric illustration of {prompt}, 30-degree isometric view, clean geometry, soft colors, diorama",
        f"perspective distortion, {_NOT_PHOTO}, {_LOW_QUALITY}",
    ),
    Style(
        "comic_book",
        "Comic book (美漫)",
        "comic book art of {prompt}, bold ink lines, halftone shading, dynamic composition, vivid colors",
        f"{_NOT_PHOTO}, 3d render, {_LOW_QUALITY}",
    ),
    Style(
        "flat_illustration",
        "Minimalist flat illustration (扁平插画)",
        "minimalist flat vector illustration of {prompt}, simple shapes, limited color palette, "
        "clean design, no gradients",
        f"{_NOT_PHOTO}, 3d render, textures, clutter, {_LOW_QUALITY}",
    ),
    Style(
        "neon",
        "Neon (霓虹)",
        "neon art of {prompt}, glowing neon lights, dark background, vibrant electric colors, light trails",
        f"daylight, dull colors, {_LOW_QUALITY}",
    ),
    Style(
        "studio_portrait",
        "Studio portrait (影棚人像)",
        "professional studio portrait of {prompt}, soft key light, rim light, 85mm lens, shallow depth "
        "of field, detailed skin texture",
        f"{_NOT_DRAWN}, {_LOW_QUALITY}, deformed, bad anatomy, bad eyes, extra fingers",
    ),
    Style(
        "sketch",
        "Pencil sketch (素描)",
        "pencil sketch of {prompt}, graphite on paper, hatching, hand-drawn, monochrome",
        f"color, {_NOT_PHOTO}, 3d render, {_LOW_QUALITY}",
    ),
    Style(
        "ukiyo_e",
        "Ukiyo-e (浮世绘)",
        "ukiyo-e woodblock print of {prompt}, edo period japanese style, flat colors, bold outlines",
        f"{_NOT_PHOTO}, 3d render, {_LOW_QUALITY}",
    ),
    Style(
        "steampunk",
        "Steampunk (蒸汽朋克)",
        "steampunk style {prompt}, brass and copper gears, victorian machinery, warm sepia lighting",
        f"modern, minimalist, {_LOW_QUALITY}",
    ),
    Style(
        "claymation",
        "Claymation (黏土)",
        "claymation of {prompt}, plasticine clay figures, handmade stop-motion look, soft lighting",
        f"{_NOT_PHOTO}, 2d, flat, {_LOW_QUALITY}",
    ),
    Style(
        "chinese_gongbi",
        "Gongbi painting (工笔画)",
        "chinese gongbi painting of {prompt}, meticulous fine brushwork, mineral pigments on silk, elegant",
        f"{_NOT_PHOTO}, 3d render, rough brush strokes, {_LOW_QUALITY}",
    ),
)

STYLES: dict[str, Style] = {style.name: style for style in _STYLE_LIST}

# Other names a request may use for a style (matched after lower-casing; ' ' and '-' read as '_').
ALIASES: dict[str, str] = {
    "realistic": "photorealistic",
    "photo": "photorealistic",
    "写实": "photorealistic",
    "动漫": "anime",
    "二次元": "anime",
    "卡通": "cartoon",
    "ink": "ink_wash",
    "chinese_ink": "ink_wash",
    "sumi_e": "ink_wash",
    "水墨": "ink_wash",
    "水墨画": "ink_wash",
    "油画": "oil_painting",
    "科技": "tech",
    "科技风": "tech",
    "水彩": "watercolor",
    "像素": "pixel_art",
    "pixel": "pixel_art",
    "3d": "3d_render",
    "render_3d": "3d_render",
    "3d渲染": "3d_render",
    "赛博朋克": "cyberpunk",
    "fantasy": "fantasy_art",
    "奇幻": "fantasy_art",
    "线稿": "line_art",
    "product": "product_photo",
    "ecommerce": "product_photo",
    "e_commerce": "product_photo",
    "white_background": "product_photo",
    "电商": "product_photo",
    "白底图": "product_photo",
    "电商白底图": "product_photo",
    "电影": "cinematic",
    "电影感": "cinematic",
    "vintage": "vintage_film",
    "复古": "vintage_film",
    "低多边形": "low_poly",
    "等距": "isometric",
    "comic": "comic_book",
    "漫画": "comic_book",
    "flat": "flat_illustration",
    "minimalist": "flat_illustration",
    "扁平": "flat_illustration",
    "霓虹": "neon",
    "portrait": "studio_portrait",
    "人像": "studio_portrait",
    "素描": "sketch",
    "浮世绘": "ukiyo_e",
    "蒸汽朋克": "steampunk",
    "clay": "claymation",
    "黏土": "claymation",
    "工笔": "chinese_gongbi",
    "工笔画": "chinese_gongbi",
}

_NO_STYLE = frozenset({"", "none"})


def resolve_style(name: str | None) -> Style | None:
    """The style called ``name`` (a name or an alias); None for no style; ``UserError`` if unknown."""
    if name is None:
        return None
    key = name.strip().lower().replace(" ", "_").replace("-", "_")
    if key in _NO_STYLE:
        return None
    key = ALIASES.get(key, key)
    style = STYLES.get(key)
    if style is None:
        raise UserError(f"unknown style {name!r}; choose one of: {', '.join(STYLES)}")
    return style


def apply_style(name: str | None, prompt: str, negative: str | None) -> tuple[str, str | None]:
    """(prompt, negative) with style ``name`` applied; unchanged when ``name`` is None.

    The style's negative is appended to the user's, or used alone when the user gave none (None or
    blank). The prompt is substituted literally, so braces in it are harmless.
    """
    style = resolve_style(name)
    if style is None:
        return prompt, negative
    styled = style.prompt.replace("{prompt}", prompt.strip())
    if not style.negative:
        return styled, negative
    if negative is None or not negative.strip():
        return styled, style.negative
    return styled, f"{negative.strip()}, {style.negative}"
