"""Plain data that crosses room boundaries: job specs, batch keys, events, results.

No torch, no I/O: everything here is a frozen dataclass or an enum so that the scheduler, the
queue, the API and the CLI can share it without pulling in heavy dependencies.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

# The negative prompt from the SDXL upgrade plan (seed 004), used when a request gives none.
DEFAULT_NEGATIVE_PROMPT = (
    "blurry, deformed, bad eyes, low quality, bad anatomy, extra limbs, disfigured, lowres, jpeg artifacts"
)


class UserError(ValueError):
    """A mistake in what the user asked for: reported as one clear line, never a traceback."""


class Task(enum.StrEnum):
    TEXT2IMG = "text2img"
    IMG2IMG = "img2img"
    INPAINT = "inpaint"


class Priority(enum.IntEnum):
    """Lanes from the ImageGenX seed: P0 urgent, P1 paid, P2 normal, P3 test traffic."""

    P0 = 0
    P1 = 1
    P2 = 2
    P3 = 3


class SchedulerName(enum.StrEnum):
    """Samplers a request may ask for (A1111 names in ``a1111_name``)."""

    EULER = "euler"
    EULER_A = "euler_a"
    DPMPP_2M = "dpmpp_2m"
    DPMPP_2M_KARRAS = "dpmpp_2m_karras"
    DDIM = "ddim"
    UNIPC = "unipc"
    LCM = "lcm"

    @property
    def a1111_name(self) -> str:
        return _A1111_SAMPLER_NAMES[self]


_A1111_SAMPLER_NAMES = {
    SchedulerName.EULER: "Euler",
    SchedulerName.EULER_A: "Euler a",
    SchedulerName.DPMPP_2M: "DPM++ 2M",
    SchedulerName.DPMPP_2M_KARRAS: "DPM++ 2M Karras",
    SchedulerName.DDIM: "DDIM",
    SchedulerName.UNIPC: "UniPC",
    SchedulerName.LCM: "LCM",
}

# Families whose transformers sample with diffusers' flow-matching Euler only (pipelines/flow.py).
FLOW_FAMILIES = frozenset({"sd3", "flux"})


def default_sampler(family: str) -> SchedulerName:
    """A model's own sampler, for a request that names none: flow-matching Euler for SD 3.5 and
    Flux, DPM++ 2M Karras for the UNet families."""
    return SchedulerName.EULER if family in FLOW_FAMILIES else SchedulerName.DPMPP_2M_KARRAS


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


@dataclass(frozen=True)
class LoraRef:
    """A LoRA by name (file stem in the LoRA folder) and its weight, 0-2."""

    name: str
    weight: float = 1.0


@dataclass(frozen=True)
class ControlRef:
    """A ControlNet, its control image (a pose skeleton, edges, a depth map; encoded) and strength 0-2."""

    model: str
    image: bytes
    strength: float = 1.0


@dataclass(frozen=True)
class IdentityRef:
    """InstantID: a face identity to keep. ``adapter`` names the InstantID weights (IP-Adapter image
    projection and attention; ``random:instantid`` for tests); ``embedding`` is the face embedding
    (ArcFace 512-d for real InstantID weights); ``scale`` the identity strength (0.9-1.1, seed 000).
    IdentityNet, the ControlNet that follows the face-keypoint image, is given in the job's
    ``controls`` like any ControlNet."""

    adapter: str
    embedding: tuple[float, ...]
    scale: float = 1.0
    identitynet: str | None = None  # which of the job's ControlNets is IdentityNet (it reads identity tokens)


@dataclass(frozen=True)
class BatchKey:
    """Jobs with equal keys can share one denoising batch.

    Prompts, seeds, negative prompts, guidance scales, step counts and samplers may differ inside a
    batch (each sample keeps its own scheduler state); what changes the weights or tensor shapes may not.
    """

    model: str
    width: int
    height: int
    task: Task
    loras: tuple[LoraRef, ...] = ()
    controls: tuple[str, ...] = ()  # ControlNet models: every job of a batch runs the same ones
    identity: tuple[str, float] | None = None  # InstantID adapter and scale: shared by a batch


@dataclass(frozen=True)
class JobSpec:
    """One image to generate. ``images_per_prompt`` is expanded into one JobSpec per image."""

    prompt: str
    model: str
    negative_prompt: str | None = None  # None: DEFAULT_NEGATIVE_PROMPT
    width: int = 1024
    height: int = 1024
    steps: int = 30
    guidance_scale: float = 7.0
    scheduler: SchedulerName = SchedulerName.DPMPP_2M_KARRAS
    seed: int = 0
    clip_skip: int = 1  # A1111 convention: 1 = last CLIP layer, 2 = the one before it
    task: Task = Task.TEXT2IMG
    strength: float = 0.75  # img2img / inpaint: how much of the input image is re-noised
    init_image: bytes | None = None  # encoded image (PNG/JPEG/WebP) for img2img and inpaint
    mask_image: bytes | None = None  # white = repaint, black = keep
    loras: tuple[LoraRef, ...] = ()
    priority: Priority = Priority.P2
    job_id: str = ""
    controls: tuple[ControlRef, ...] = ()
    identity: IdentityRef | None = None
    # "full": the model's VAE; "tiny": its family's tiny decoder (ModelSettings.tiny_decoders). Not part
    # of the batch key: the UNet batch is shared, only the last call differs.
    decoder: str = "full"

    @property
    def batch_key(self) -> BatchKey:
        controls = tuple(control.model for control in self.controls)
        identity = (self.identity.adapter, self.identity.scale) if self.identity else None
        return BatchKey(self.model, self.width, self.height, self.task, self.loras, controls, identity)

    @property
    def effective_negative_prompt(self) -> str:
        return DEFAULT_NEGATIVE_PROMPT if self.negative_prompt is None else self.negative_prompt


@dataclass(frozen=True)
class ProgressEvent:
    """Step ``step`` of ``total`` finished for a job, or the job changed status."""

    job_id: str
    status: JobStatus
    step: int = 0
    total: int = 0
    message: str = ""
    preview: bytes | None = None  # a small JPEG of the latents a step or two before (pipelines/preview.py)


@dataclass(frozen=True)
class Timings:
    queued_s: float = 0.0
    encode_prompt_s: float = 0.0
    denoise_s: float = 0.0
    decode_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.queued_s + self.encode_prompt_s + self.denoise_s + self.decode_s


@dataclass(frozen=True)
class GeneratedImage:
    """A finished image: RGB pixels as PNG-free raw bytes plus everything needed to describe it."""

    job: JobSpec
    width: int
    height: int
    rgb: bytes  # width * height * 3 bytes, row-major
    model_name: str
    batch_size: int
    timings: Timings = field(default_factory=Timings)
    # What post-processing recorded: steps run with their seconds, QC scores and rank, regions
    # fixed, or "error" when a gate withheld the image (JSON-able; goes into the image's metadata).
    post: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ModelInfo:
    """One entry of the model registry, as listed by ``imagegenx models``."""

    name: str
    source: str  # "random", "diffusers-folder", "single-file", "hub"
    family: str  # sd15, sd21, sdxl, sdxl-refiner, sd3, flux
    location: str
    note: str = ""
    tiny_decoder: bool = False  # the server names a tiny decoder for its family (decoder "tiny" works)


class TaskStatus(enum.StrEnum):
    """A task's life in the service (the ImageGenX API's vocabulary)."""

    QUEUED = "queued"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    EXPIRED = "expired"

    @property
    def final(self) -> bool:
        return self in {TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELED, TaskStatus.EXPIRED}


class Tier(enum.StrEnum):
    """Free: up to 1024x1024. Paid: up to 2048x2048, 4x upscale and LoRA upload."""

    FREE = "free"
    PAID = "paid"


@dataclass(frozen=True)
class TaskRecord:
    """One task row as the service sees it. ``params`` is the JSON form of the request."""

    task_id: str
    user_id: str
    task_type: str  # generate, img2img, inpaint
    status: TaskStatus
    priority: int
    params: dict
    created_at: float  # unix seconds
    batch_id: str | None = None
    model: str = ""
    width: int = 0
    height: int = 0
    style: str | None = None
    progress: int = 0  # 0-100
    attempts: int = 0
    error: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    results: dict = field(default_factory=dict)  # {"original": blob key, "512": ..., "256": ...}
    metadata: dict = field(default_factory=dict)
    callback_url: str | None = None
    cancel_requested: bool = False


@dataclass(frozen=True)
class ApiKey:
    """An API key as stored: only the hash of its secret is kept."""

    key_id: str
    name: str
    tier: Tier
    rate_limit_per_s: float
    queue_quota: int
    created_at: float
    revoked_at: float | None = None
