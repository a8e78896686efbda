"""The declared post-processing chain, applied to a finished image in a fixed order:

1. upscale (Real-ESRGAN ×2/×4, blended with Lanczos by ``network_strength``, then unsharp mask);
2. visible watermark (text);
3. invisible watermark (DWT-DCT; carries the task or image id, read back by ``watermark-check``).

Each step is one of the stateless ``apply(images, params)`` steps; the chain only decides order
and turns the result back into a ``GeneratedImage`` (metadata lists the steps that ran).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from imagegenx.postprocess.encode import to_pil
from imagegenx.types import GeneratedImage, UserError


@dataclass(frozen=True)
class PostprocessSpec:
    upscale: int = 1  # 1 (off), 2 or 4
    network_strength: float = 0.35  # seed 000: 0.35 of the network, the rest Lanczos
    unsharp: bool = True  # radius 2, amount 120% after upscaling (seed 000)
    watermark_text: str | None = None
    invisible_watermark: bool = False

    def __post_init__(self) -> None:
        if self.upscale not in (1, 2, 4):
            raise UserError(f"upscale must be 1, 2 or 4, not {self.upscale}")
        if not 0 <= self.network_strength <= 1:
            raise UserError(f"network_strength {self.network_strength} is outside 0-1")

    @property
    def steps(self) -> list[str]:
        names = [f"upscale x{self.upscale}"] if self.upscale > 1 else []
        names += ["watermark"] if self.watermark_text else []
        names += ["invisible watermark"] if self.invisible_watermark else []
        return names

    @classmethod
    def from_params(cls, params: dict) -> PostprocessSpec:
        values = params.get("postprocess") or {}
        return cls(**{k: v for k, v in values.items() if k in cls.__dataclass_fields__})


def apply_chain(image: GeneratedImage, spec: PostprocessSpec) -> GeneratedImage:
    if not spec.steps:
        return image
    pil = to_pil(image)
    # 1. Upscale.
    if spec.upscale > 1:
        from imagegenx.postprocess.upscale import Upscale

        params = {"scale": spec.upscale, "network_strength": spec.network_strength, "unsharp": spec.unsharp}
        pil = Upscale().apply([pil], params)[0]
    # 2-3. Watermarks: visible first, so the invisible mark is computed on the final pixels.
    if spec.watermark_text or spec.invisible_watermark:
        from imagegenx.postprocess.watermark import Watermark

        mark_id = image.job.job_id or image.job.seed if spec.invisible_watermark else None
        pil = Watermark().apply([pil], {"text": spec.watermark_text, "id": mark_id})[0]
    pil = pil.convert("RGB")
    return replace(image, width=pil.width, height=pil.height, rgb=pil.tobytes())
