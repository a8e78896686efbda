"""Portrait jobs (seed 000): 1-3 selfies → N drafts → QC shortlist → refine, fix, upscale → files.

``run_portrait(engine, selfies, spec, progress)`` runs, as numbered steps:

1. selfies (``vision.selfie``): decode (EXIF rotation applied), detect with dlib; exactly one face
   of at least 64 px each, or one ``SelfieError`` listing every bad file with its reason; each face
   is cut out aligned (eyes level, the ArcFace template scaled into the middle half of a 512² crop);
2. drafts: N text-to-image jobs with the base model (``spec.model`` or the settings' default model),
   seeds ``seed .. seed+N-1``, LCM 4 steps at CFG 6.5 (``lcm2``: 2 steps, CFG 0.5 lower; SD 3.5 and
   Flux use their flow-matching Euler instead of LCM), submitted together so the engine batches
   them; with InstantID (adapter, IdentityNet and an ArcFace model all given) each carries the
   identity and the first selfie's keypoint image (``vision.selfie.instantid_refs``);
3. QC and shortlist (``postprocess.shortlist``), overlapped with step 2: from 16 1024² drafts,
   each draft is scored on a process pool as soon as it is made (``postprocess.qc_pool``, one
   worker per core but one; the same scores as in one thread); the chain's QC scores (sharpness,
   NSFW, faces, SSIM against the first selfie's aligned crop resized to the draft size) with
   identity as dlib's cosine to the mean embedding of all selfies, which the chain (one reference
   image) cannot do; the best 15 by the chain's combined score that pass its SSIM gate (τ 0.75).
   When fewer pass, the report says how many and, unless ``strict_ssim``, the best of the rest
   fill the shortlist (marked ``passed_ssim_gate: false``); drafts without a face score identity
   0.0 (``faces`` 0);
4. the chain on the shortlist: the top 10 refined (img2img, ~10 steps at strength 0.3 with the
   ``refiner`` model, or the base model itself when none is given), then face fix where faces are
   found, then Real-ESRGAN ×``upscale`` (network strength 0.35, unsharp); refine and fix run
   without InstantID (low-strength passes keep the draft's face);
5. write: each final encoded (WebP, or JPEG 95; A1111 parameters embedded) on a thread as soon as it
   is upscaled, overlapping step 4's upscale of the next, with a .json sidecar of its metadata and
   scores, ``report.json`` and ``contact_sheet.webp`` (``portrait_report``), all held in memory in
   ``PortraitResult.files`` (the CLI writes them to a folder, the API to blob storage).

``progress(stage, done, total)`` is called for every stage of ``STAGES``, in order, at least once, on
the caller's thread; an exception it raises ends the run (drafts still queued are cancelled).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, ThreadPoolExecutor, as_completed
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from imagegenx.engine.portrait_report import draft_entries, draft_sheet
from imagegenx.engine.portrait_steps import plain, stage, upscaled
from imagegenx.postprocess.chain import PostprocessSpec
from imagegenx.postprocess.encode import ImageFormat, encode_image, encode_pil, image_metadata, to_pil
from imagegenx.postprocess.qc_pool import QcPool
from imagegenx.postprocess.shortlist import draft_pool, score_drafts
from imagegenx.types import FLOW_FAMILIES, GeneratedImage, JobSpec, LoraRef, SchedulerName, UserError
from imagegenx.vision.identity import DlibIdentity, mean_embedding
from imagegenx.vision.selfie import SelfieError, instantid_refs, read_selfie

if TYPE_CHECKING:
    from imagegenx.engine.engine import Engine

Progress = Callable[[str, int, int], None]
STAGES = ("selfies", "drafts", "qc", "refine", "fix", "upscale", "write")
MAX_SELFIES = 3
_SIZE_BY_FAMILY = {"sd15": 512, "sd21": 768}  # others: 1024; random:tiny-* models: 64
_POOL_MIN_PIXELS = 16 * 1024 * 1024  # drafts' pixels in all (16 at 1024²) from which QC runs on a pool


@dataclass(frozen=True)
class PortraitSpec:
    """What a portrait run makes; defaults are seed 000's (``UserError`` for a bad combination)."""

    prompt: str
    n: int = 100
    seed: int = 0
    model: str | None = None  # None: the settings' default model (seed 000 §6: one setting)
    negative_prompt: str | None = None
    width: int | None = None  # None: 64 for random:tiny-*, else by family (1024 for SDXL)
    height: int | None = None
    steps: int = 4
    cfg: float = 6.5
    lcm2: bool = False  # seed 000 §6: 2 LCM steps, CFG 0.5 lower
    loras: tuple[LoraRef, ...] = ()  # e.g. the LCM-LoRA of a base model that is not LCM-distilled
    shortlist: int = 15
    refine_top: int = 10
    refiner: str | None = None  # None: the base model as its own refiner
    refiner_steps: int = 10
    refiner_strength: float = 0.3
    face_fix: bool = True
    upscale: int = 4
    image_format: str = "webp"
    ssim_tau: float = 0.75
    strict_ssim: bool = False  # True: shortlist only drafts that pass the SSIM gate
    nsfw_max: float | None = None
    instantid: str | None = None  # InstantID adapter; needs identitynet and arcface too
    identitynet: str | None = None  # IdentityNet ControlNet
    identity_scale: float = 1.0  # identity attention scale and IdentityNet strength
    arcface: str | None = None  # InsightFace-format ONNX: InstantID's 512-d embedding (never downloaded)
    # "tiny": the drafts decoded by the family's tiny decoder (an 18th of the VAE's work); the refined
    # ones are made again by the refine pass, shortlisted drafts beyond refine_top keep its detail
    draft_decoder: str = "full"

    def __post_init__(self) -> None:
        if not self.prompt.strip():
            raise UserError("the prompt is empty")
        if not 1 <= self.n <= 1000:
            raise UserError(f"the number of drafts must be 1-1000, not {self.n}")
        if self.shortlist < 1 or not 0 <= self.refine_top <= self.shortlist:
            raise UserError("shortlist must be 1 or more and refine_top 0 to shortlist")
        if self.upscale not in (1, 2, 4):
            raise UserError(f"upscale must be 1, 2 or 4, not {self.upscale}")
        if (self.instantid is None) != (self.identitynet is None):
            raise UserError("InstantID needs both its adapter (--instantid) and IdentityNet (--identitynet)")
        if self.instantid and not self.arcface:
            raise UserError(
                "InstantID needs a 512-d ArcFace face embedding: give --arcface MODEL.onnx (an "
                "InsightFace-format recognition model; none is downloaded); dlib's 128-d one does not fit"
            )
        ImageFormat.parse(self.image_format)
        if self.draft_decoder not in ("full", "tiny"):
            raise UserError(f"draft decoder must be full or tiny, not {self.draft_decoder!r}")

    @property
    def draft_steps(self) -> int:
        return 2 if self.lcm2 else self.steps

    @property
    def draft_cfg(self) -> float:
        return max(0.0, self.cfg - 0.5) if self.lcm2 else self.cfg


@dataclass
class PortraitResult:
    finals: list[GeneratedImage]  # shortlist order, refined, fixed and upscaled
    report: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)  # file name → bytes, report and sheet included
    warnings: list[str] = field(default_factory=list)

    def save(self, out: Path) -> list[Path]:
        out.mkdir(parents=True, exist_ok=True)
        for name, data in self.files.items():
            (out / name).write_bytes(data)
        return [out / name for name in self.files]


def run_portrait(
    engine: Engine, selfies: Sequence[tuple[str, bytes]], spec: PortraitSpec, progress: Progress | None = None
) -> PortraitResult:
    tell = progress or (lambda stage, done, total: None)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        timings[stage] = round(time.perf_counter() - clock, 3)
        clock = time.perf_counter()

    # 1. Selfies: one clear face each, or every problem at once.
    if not 1 <= len(selfies) <= MAX_SELFIES:
        raise UserError(f"give 1 to {MAX_SELFIES} selfies, not {len(selfies)}")
    detector, faces, problems = DlibIdentity(upsample=1), [], []
    tell("selfies", 0, len(selfies))
    for done, (name, data) in enumerate(selfies, start=1):
        try:
            faces.append(read_selfie(name, data, detector))
        except UserError as exc:
            problems.append((name, str(exc)))
        tell("selfies", done, len(selfies))
    if problems:
        raise SelfieError(problems)
    embedding = mean_embedding([s.embedding for s in faces])
    lap("selfies")

    # 2. Drafts, submitted together so the engine batches them; progress per finished draft.
    from imagegenx.engine.engine import JobFailed

    model = spec.model or engine.settings.models.default_model
    family = engine.models.source(model).family
    default = 64 if model.startswith("random:tiny-") else _SIZE_BY_FAMILY.get(family, 1024)
    width, height = spec.width or default, spec.height or default
    # LCM is the UNet families' fast mode; SD 3.5 and Flux sample with their own flow-matching Euler.
    scheduler = SchedulerName.EULER if family in FLOW_FAMILIES else SchedulerName.LCM
    identity: dict[str, Any] = {}
    if spec.instantid and spec.identitynet:
        ref, control = instantid_refs(
            faces, spec.arcface or "", spec.instantid, spec.identitynet, spec.identity_scale, (width, height)
        )
        identity = {"identity": ref, "controls": (control,)}
    run_id = uuid.uuid4().hex[:8]
    jobs = [
        JobSpec(
            prompt=spec.prompt,
            model=model,
            negative_prompt=spec.negative_prompt,
            width=width,
            height=height,
            steps=spec.draft_steps,
            guidance_scale=spec.draft_cfg,
            scheduler=scheduler,
            seed=spec.seed + i,
            loras=spec.loras,
            job_id=f"portrait-{run_id}-{i:04d}",
            decoder=spec.draft_decoder,
            **identity,
        )
        for i in range(spec.n)
    ]
    tell("drafts", 0, spec.n)
    futures = {engine.submit(job): i for i, job in enumerate(jobs)}
    results: list[GeneratedImage | Exception] = [JobFailed("not run")] * spec.n
    # QC overlaps the drafting: each draft goes to a pool of QC processes as soon as it is made (the
    # pool starts once the drafts are queued, so the GPU does not wait for it).
    with _qc_pool(spec.n, width, height, faces[0].crop, embedding) as pool:
        try:
            for done, future in enumerate(as_completed(futures), start=1):
                i = futures[future]
                try:
                    results[i] = future.result()
                except (JobFailed, CancelledError) as exc:
                    results[i] = exc if isinstance(exc, JobFailed) else JobFailed("canceled")
                if pool is not None:
                    draft = results[i]
                    pool.add(i, np.asarray(to_pil(draft)) if isinstance(draft, GeneratedImage) else None)
                tell("drafts", done, spec.n)
        except BaseException:  # the caller gave up (progress raised, Ctrl-C): the engine drops the rest
            for job in jobs:
                engine.cancel(job.job_id)
            raise
        ok = [i for i, r in enumerate(results) if isinstance(r, GeneratedImage)]
        if not ok:
            raise UserError(f"every draft failed: {results[0]}")
        lap("drafts")

        # 3. QC and the shortlist (indices into ``results``): what the pool has not finished yet.
        tell("qc", 0, len(ok))
        scored, order, passed = score_drafts(
            [results[i] for i in ok],
            faces[0].crop,
            embedding,
            k=spec.shortlist,
            ssim_tau=spec.ssim_tau,
            nsfw_max=spec.nsfw_max,
            fill=not spec.strict_ssim,
            scores=pool.scores() if pool is not None else None,
        )
    for i, image in zip(ok, scored, strict=True):
        results[i] = image
    shortlist = [ok[j] for j in order]
    tell("qc", len(ok), len(ok))
    warnings = []
    if passed < min(spec.shortlist, len(ok)):
        fill = "" if spec.strict_ssim else "; the shortlist is filled up with the best of the other drafts"
        warnings.append(f"{passed} of {len(ok)} drafts passed the SSIM gate (τ {spec.ssim_tau:g}){fill}")
    lap("qc")

    # 4. Refine the top, fix faces, upscale: the chain, one step per call so progress follows it.
    finals = [plain(results[i]) for i in shortlist]
    top = min(spec.refine_top, len(finals))
    refine = PostprocessSpec(
        refiner=spec.refiner or model,
        refiner_steps=spec.refiner_steps,
        refiner_strength=spec.refiner_strength,
    )
    finals[:top] = stage("refine", finals[:top], refine, engine, tell, on=top > 0)
    lap("refine")
    finals = stage("fix", finals, PostprocessSpec(face_fix=True), engine, tell, on=spec.face_fix)
    lap("fix")
    upscale = PostprocessSpec(upscale=spec.upscale, network_strength=0.35, unsharp=True)
    fmt = ImageFormat.parse(spec.image_format)
    # Encoding a 4096² final takes about a second and Pillow's encoders release the GIL: each final
    # goes to an encoder thread as soon as it is upscaled, so the CPU encodes while the GPU upscales
    # the next ones (``upscaled``: two at a time).
    upscaling = len(finals) if spec.upscale > 1 else 0
    with ThreadPoolExecutor(max_workers=min(len(finals), os.cpu_count() or 1) or 1) as pool:
        encoded = []
        tell("upscale", 0, upscaling)
        done = upscaled(list(finals), upscale, engine) if upscaling else iter(list(finals))
        for n, (i, final) in enumerate(zip(shortlist, done, strict=True)):
            # The metadata describes the draft each final came from; the refined ones were decoded
            # anew by the full VAE (the refine pass's own job).
            finals[n] = replace(
                final, job=replace(results[i].job, decoder="full") if n < top else results[i].job
            )
            encoded.append(None if "error" in finals[n].post else pool.submit(encode_image, finals[n], fmt))
            if n + 1 < upscaling:
                tell("upscale", n + 1, upscaling)
        tell("upscale", upscaling, upscaling)
        lap("upscale")

        # 5. Write: the finals' files with their metadata, the contact sheet and the report.
        total = len(finals) + 2
        tell("write", 0, total)
        sheet = encode_pil(
            draft_sheet(results, shortlist), ImageFormat.WEBP
        )  # drawn while the last ones encode
    files, listed = {}, []
    for position, (image, i) in enumerate(zip(finals, shortlist, strict=True), start=1):
        entry = {"position": position, "seed": image.job.seed, "draft": i}
        entry["passed_ssim_gate"] = image.post["qc"]["passed_ssim_gate"]
        if "error" in image.post:
            listed.append(entry | {"error": image.post["error"]})
            continue
        stem = f"{position:02d}-seed{image.job.seed}"
        files[stem + fmt.extension] = encoded[position - 1].result()
        meta = image_metadata(image) | {"file": stem + fmt.extension} | entry
        files[stem + ".json"] = json.dumps(meta, indent=2).encode()
        listed.append({k: meta[k] for k in ("file", *entry, "qc", "postprocess_seconds") if k in meta})
        tell("write", position, total)
    files["contact_sheet.webp"] = sheet
    tell("write", total - 1, total)
    lap("write")
    timings["total"] = round(sum(timings.values()), 3)
    report = {
        "prompt": spec.prompt,
        "model": model,
        "size": [width, height],
        "steps": spec.draft_steps,
        "cfg": spec.draft_cfg,
        "scheduler": scheduler.value,
        "draft_decoder": spec.draft_decoder,
        "instantid": {
            "adapter": spec.instantid,
            "identitynet": spec.identitynet,
            "scale": spec.identity_scale,
        }
        if spec.instantid
        else None,
        "selfies": [s.status() for s in faces],
        "reference": {"ssim": f"aligned face crop of {faces[0].name}", "identity": "mean dlib embedding"},
        "ssim_gate": {"tau": spec.ssim_tau, "passed": passed, "of": len(ok), "strict": spec.strict_ssim},
        "drafts": draft_entries(results, shortlist, spec.seed),
        "shortlist": listed,
        "timings_s": timings,
        "warnings": warnings,
    }
    files["report.json"] = json.dumps(report, indent=2).encode()
    tell("write", total, total)
    return PortraitResult(finals, report, files, warnings)


def _qc_pool(
    n: int, width: int, height: int, reference: Image.Image, embedding: np.ndarray
) -> AbstractContextManager[QcPool | None]:
    """A QC pool for drafts of this size, or None (QC after the drafts, in this process) when the
    work is too small to pay for starting worker processes (imports and face models: about 4 s on a
    busy 2-core machine; hidden behind the drafting when there are enough drafts)."""
    if n * width * height < _POOL_MIN_PIXELS:
        return nullcontext()
    return draft_pool(reference, embedding, width, height)
