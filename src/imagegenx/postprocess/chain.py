"""The declared post-processing chain, run in a fixed order over all the images of a batch:

1. hires fix: upscale, then img2img at low strength at the larger size (A1111's "hires fix");
2. detect faces and hands once (mediapipe's models); later steps reuse the detections;
3. quality control: sharpness, NSFW, faces, SSIM and identity against a reference, optional BRISQUE;
   a combined score ranks the batch; an image over the NSFW limit is withheld;
4. refiner pass (img2img with a refiner model) on every image, or only on the top-k by QC rank;
5. face and hand fix, ADetailer style: regenerate padded crops at low denoise, paste back feathered;
   optionally GFPGAN face restoration with user-supplied weights (``face_restore``) after it;
6. upscale (Real-ESRGAN ×2/×4, blended with Lanczos by ``network_strength``, then unsharp mask);
7. visible watermark, then the invisible one (so it is computed on the final pixels).

Steps that denoise (1, 4, 5) do it through a ``Denoiser``, in practice the engine: their jobs are
submitted together so the engine batches them (all crops of a batch form one UNet batch).
Each step's seconds, the QC scores and rank, and the regions fixed go into ``GeneratedImage.post``,
which ends up in the image's metadata. An image a step could not produce keeps ``post["error"]``
and skips the remaining steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from PIL import Image

from imagegenx.postprocess.encode import to_pil
from imagegenx.types import GeneratedImage, JobSpec, UserError

ImageResult = GeneratedImage | Exception


class Denoiser(Protocol):
    """Runs generation jobs together and returns, in order, an image or the exception per job."""

    def run(self, jobs: Sequence[JobSpec]) -> list[ImageResult]: ...


@dataclass(frozen=True)
class PostprocessSpec:
    # 1. hires fix (seed 004): the request's size is the first pass; the result is `hires_scale` times larger
    hires_scale: float = 1.0  # 1: off
    hires_strength: float = 0.35
    hires_steps: int | None = None  # steps actually run in the second pass; None: the request's steps
    hires_upscaler: str = "lanczos"  # or "realesrgan"
    # 3. quality control
    qc: bool = False
    brisque: bool = False
    nsfw_max: float | None = None  # set by the service from the key's tier: above it, the image is withheld
    # 4. refiner (seed 000: ~10 steps on the top-k of the batch only)
    refiner: str | None = None  # refiner model reference; None: off
    refiner_steps: int = 10
    refiner_strength: float = 0.3
    refine_top_k: int | None = None  # None: refine every image
    # 5. face and hand fix
    face_fix: bool = False
    hand_fix: bool = False
    fix_strength: float = 0.4
    fix_prompt: str | None = None  # None: the image's own prompt
    face_restore: str | None = None  # a GFPGAN v1.3/v1.4 .safetensors file (user-supplied); None: off
    face_restore_weight: float = 0.5  # blend of the restored face with the image
    # 6. upscale
    upscale: int = 1  # 1 (off), 2 or 4
    network_strength: float = 0.35  # seed 000: 0.35 of the network, the rest Lanczos
    unsharp: bool = True  # radius 2, amount 120% after upscaling (seed 000)
    # 7. watermarks
    watermark_text: str | None = None
    invisible_watermark: bool = False

    def __post_init__(self) -> None:
        if self.upscale not in (1, 2, 4):
            raise UserError(f"upscale must be 1, 2 or 4, not {self.upscale}")
        names = (
            "network_strength",
            "hires_strength",
            "refiner_strength",
            "fix_strength",
            "face_restore_weight",
        )
        for name in names:
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"{name} {getattr(self, name)} is outside 0-1")
        if not 1 <= self.hires_scale <= 4:
            raise UserError(f"hires_scale {self.hires_scale} is outside 1-4")
        if self.hires_upscaler not in ("lanczos", "realesrgan"):
            raise UserError(f"hires_upscaler must be lanczos or realesrgan, not {self.hires_upscaler!r}")
        if self.refine_top_k is not None and (self.refine_top_k < 0 or not self.qc):
            raise UserError("refine_top_k must be 0 or more and needs qc (it ranks by the QC score)")
        if self.nsfw_max is not None and not self.qc:
            raise UserError("the NSFW gate needs qc")

    @property
    def detects(self) -> bool:
        return self.face_fix or self.hand_fix or self.face_restore is not None

    @property
    def needs_denoiser(self) -> bool:
        return self.hires_scale > 1 or self.refiner is not None or self.face_fix or self.hand_fix

    @property
    def fix_step(self) -> str | None:
        """One step fixes faces and hands together (their crops share a batch)."""
        kinds = [kind for kind, on in (("face", self.face_fix), ("hand", self.hand_fix)) if on]
        return f"{' and '.join(kinds)} fix" if kinds else None

    @property
    def steps(self) -> list[str]:
        """The names of the steps this spec runs, in order."""
        names = [f"hires x{self.hires_scale:g}"] if self.hires_scale > 1 else []
        names += ["detect"] if self.detects else []
        names += ["qc"] if self.qc else []
        names += ["refine"] if self.refiner else []
        names += [self.fix_step] if self.fix_step else []
        names += ["face restore"] if self.face_restore else []
        names += [f"upscale x{self.upscale}"] if self.upscale > 1 else []
        names += ["watermark"] if self.watermark_text else []
        names += ["invisible watermark"] if self.invisible_watermark else []
        return names

    @classmethod
    def from_params(cls, params: dict) -> PostprocessSpec:
        values = params.get("postprocess") or {}
        try:
            return cls(**{k: v for k, v in values.items() if k in cls.__dataclass_fields__})
        except TypeError as exc:
            raise UserError(f"invalid postprocess parameters: {exc}") from None


def apply_chain(
    images: Sequence[GeneratedImage],
    spec: PostprocessSpec,
    denoiser: Denoiser | None = None,
    reference: Image.Image | None = None,
) -> list[GeneratedImage]:
    """Run ``spec``'s steps over ``images`` (one batch); ``reference`` feeds SSIM and identity in QC."""
    if spec.needs_denoiser and denoiser is None:
        raise UserError("hires fix, refiner and face/hand fix need the engine (a denoiser)")
    out = [_with_post(image, {"steps": []}) for image in images]
    detections: list[list[Any]] = [[] for _ in out]

    def run(name: str, step: Callable[[list[int]], None]) -> None:
        """Time ``step`` over the images still alive; record its seconds per image on each of them."""
        alive = [i for i, image in enumerate(out) if "error" not in image.post]
        if not alive:
            return
        started = time.perf_counter()
        step(alive)
        seconds = round((time.perf_counter() - started) / len(alive), 4)
        for i in alive:
            out[i].post["steps"].append({"name": name, "seconds": seconds})

    # 1. Hires fix.
    if spec.hires_scale > 1:
        from imagegenx.postprocess.hires import hires_fix

        run(
            spec.steps[0],
            lambda alive: _replace_at(out, alive, hires_fix([out[i] for i in alive], spec, denoiser)),
        )
    # 2. One detection pass for faces and hands.
    if spec.detects:
        from imagegenx.vision.detect import MediapipeDetector

        def detect(alive: list[int]) -> None:
            found = MediapipeDetector().detect_batch([to_pil(out[i]) for i in alive])  # models load once
            for i, dets in zip(alive, found, strict=True):
                detections[i] = dets
                out[i].post["detections"] = [
                    {"kind": d.kind, "box": list(d.box), "score": round(d.score, 3)} for d in dets
                ]

        run("detect", detect)
    # 3. Quality control, and the batch's ranking.
    if spec.qc:
        from imagegenx.postprocess.qc import score_batch

        run(
            "qc",
            lambda alive: score_batch(
                [out[i] for i in alive], spec, reference, [detections[i] for i in alive]
            ),
        )
    # 4. Refiner pass.
    if spec.refiner:
        from imagegenx.postprocess.hires import refine

        run("refine", lambda alive: _replace_at(out, alive, refine([out[i] for i in alive], spec, denoiser)))
    # 5. Face and hand fix.
    kinds = {"face"} if spec.face_fix else set()
    kinds |= {"hand"} if spec.hand_fix else set()
    if kinds:
        from imagegenx.postprocess.facefix import fix_regions

        def fix(alive: list[int]) -> None:
            fixed = fix_regions(
                [out[i] for i in alive], [detections[i] for i in alive], kinds, spec, denoiser
            )
            _replace_at(out, alive, fixed)

        run(spec.fix_step, fix)
    if spec.face_restore:
        from imagegenx.postprocess.restore import FaceRestore

        def restore(alive: list[int]) -> None:
            step = FaceRestore(spec.face_restore)
            pils = step.apply(
                [to_pil(out[i]) for i in alive],
                [detections[i] for i in alive],
                {"weight": spec.face_restore_weight},
            )
            for i, pil in zip(alive, pils, strict=True):
                out[i] = with_pixels(out[i], pil)

        run("face restore", restore)
    # 6. Upscale.
    if spec.upscale > 1:
        from imagegenx.postprocess.upscale import Upscale, upscaler_options

        params = {"scale": spec.upscale, "network_strength": spec.network_strength, "unsharp": spec.unsharp}
        step = Upscale(**upscaler_options(denoiser))
        run(
            f"upscale x{spec.upscale}",
            lambda alive: _map_pixels(out, alive, lambda pils: step.apply(pils, params)),
        )
    # 7. Watermarks: visible first, so the invisible mark is computed on the final pixels.
    if spec.watermark_text or spec.invisible_watermark:
        from imagegenx.postprocess.watermark import Watermark

        def visible(pil: Image.Image, image: GeneratedImage) -> Image.Image:
            return Watermark().apply([pil], {"text": spec.watermark_text})[0]

        def invisible(pil: Image.Image, image: GeneratedImage) -> Image.Image:
            return Watermark().apply([pil], {"id": image.job.job_id or image.job.seed})[0]

        if spec.watermark_text:
            run("watermark", lambda alive: _map_each(out, alive, visible))
        if spec.invisible_watermark:
            run("invisible watermark", lambda alive: _map_each(out, alive, invisible))
    return out


def with_pixels(image: GeneratedImage, pil: Image.Image) -> GeneratedImage:
    """``image`` with new pixels (and size), keeping its job, timings and post record."""
    pil = pil.convert("RGB")
    return replace(image, width=pil.width, height=pil.height, rgb=pil.tobytes())


def _with_post(image: GeneratedImage, post: dict) -> GeneratedImage:
    return replace(image, post={**image.post, **post})


def _replace_at(out: list[GeneratedImage], alive: list[int], results: list[GeneratedImage]) -> None:
    for i, image in zip(alive, results, strict=True):
        out[i] = image


def _map_each(
    out: list[GeneratedImage],
    alive: list[int],
    fn: Callable[[Image.Image, GeneratedImage], Image.Image],
) -> None:
    for i in alive:
        out[i] = with_pixels(out[i], fn(to_pil(out[i]), out[i]))


def _map_pixels(
    out: list[GeneratedImage], alive: list[int], fn: Callable[[list[Image.Image]], list[Image.Image]]
) -> None:
    pils = fn([to_pil(out[i]) for i in alive])
    for i, pil in zip(alive, pils, strict=True):
        out[i] = with_pixels(out[i], pil)
