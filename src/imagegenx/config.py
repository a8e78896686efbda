"""Settings, one frozen slice per area, read from ``IMAGEGENX_*`` environment variables.

Nothing here is instantiated at import time: the CLI and app factories call ``Settings()`` once and
hand each room only its slice.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _data_home() -> Path:
    return Path.home() / ".local" / "share" / "imagegenx"


class ModelSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    model_dir: Path = Field(default_factory=lambda: _data_home() / "models")
    lora_dir: Path = Field(default_factory=lambda: _data_home() / "loras")
    default_model: str = "random:tiny-sdxl"
    # Hub ids are fetched only when this is true and HF_HUB_OFFLINE is not set.
    allow_downloads: bool = True
    device: str = "auto"  # auto: cuda if available, else cpu
    dtype: str = "auto"  # auto: float16 on cuda, float32 on cpu; or float16 / bfloat16 / float32
    max_resident_models: int = 2  # least recently used models beyond this are unloaded
    # Speed-ups (models/speed.py): None = on for CUDA; fused QKV takes LoRAs only merged (lora_mode
    # fused, the default when compiled); compile: off, default, reduce-overhead or max-autotune (the
    # UNet, on padded batch buckets)
    channels_last: bool | None = None
    fuse_qkv: bool = False
    # The VAE in channels_last too: slower eager on an H200 (its GroupNorms copy NHWC activations back
    # and forth); diffusers' recipe compiles it so, and compiled it is still to be measured
    vae_channels_last: bool = False
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = "off"
    compile_vae: bool = True  # with compile on, the VAE decode too (padded to the same buckets)
    # With compile on, only the denoiser's repeated blocks (diffusers' regional compilation: SDXL's
    # transformer blocks, Flux's double and single blocks), one graph per kind of block reused by
    # every copy: compiles in a fraction of the time, the rest of the denoiser runs eager. Where a
    # denoiser names no repeated blocks (SD 3.5), the whole of it is compiled as without this.
    # None: by blocks for the transformer denoisers (Flux: 4.18 s a 1024² image on an H200, compiled
    # in a minute, where a whole-Flux compile never finished in a 10-minute call), whole for UNets.
    compile_regional: bool | None = None
    # With compile on, Dynamo's automatic dynamic shapes instead of static ones: the second batch size
    # (or resolution) a graph sees compiles it once more, general in that size, and every later size
    # reuses it: two compiles where static shapes take one per padded size (CUDA graphs still record
    # one per size). Generated kernels may be a little slower in general shapes (measure on and off).
    compile_dynamic: bool = False
    # Inductor flags set before compiling (torch._inductor.config, process-wide), e.g.
    # IMAGEGENX_MODELS__INDUCTOR_FLAGS='{"conv_1x1_as_mm": true, "epilogue_fusion": false}' (two of
    # diffusers' fast recipe's): each measured against the defaults before it becomes one
    inductor_flags: dict[str, bool | int | float | str] = Field(default_factory=dict)
    compile_upscaler: bool = True  # with compile on, Real-ESRGAN too (its tile batches padded likewise)
    # Real-ESRGAN's dense blocks as fewer, wider convolutions, the same numbers (postprocess/rrdbnet.py).
    # None: on where measured faster, which is everywhere measured so far (the CPU, an H200).
    upscaler_fused_blocks: bool | None = None
    # Inductor's on-disk cache (compiled kernels, autotuning) when compile is on, unless
    # TORCHINDUCTOR_CACHE_DIR is set: here it outlives reboots and /tmp cleaners, so a restarted
    # service finds its graphs compiled (an SDXL UNet and VAE take minutes from scratch).
    compile_cache_dir: Path = Field(default_factory=lambda: _data_home() / "compile-cache")
    # One portable file of compiled artifacts (models/compile_artifacts.py): loaded before the first
    # compile, written after the warm-up and at shutdown; copy it to machines with the same GPU,
    # torch and Triton and they skip the compiles. None: off.
    compile_artifacts: Path | None = None
    # How LoRAs apply (models/lora.py): adapters (PEFT layers, switch in ms, every step slower),
    # fused (merged into the weights on a switch: steps at full speed, no recompile under compile);
    # auto: fused when compile is on, else adapters
    lora_mode: Literal["auto", "adapters", "fused"] = "auto"
    # float8 weights and activations for the denoiser's linear layers (torchao, the fp8 extra): needs a
    # GPU of compute capability 8.9+ (Ada, Hopper) and dtype bfloat16; excludes LoRAs
    fp8: bool = False
    # fp8 scales: one per row of activations and weights ("row": the more accurate, and the faster
    # on Flux, 3.00 s against 3.12 on an H200) or one per tensor ("tensor": the activation's scale
    # needs a reduction over the whole tensor before it is cast)
    fp8_granularity: Literal["row", "tensor"] = "row"
    # cuDNN times its convolution algorithms on the first call of each shape and keeps the fastest
    # (torch.backends.cudnn.benchmark, process-wide; CUDA only): for the VAE, ControlNets and
    # Real-ESRGAN's fixed tiles. Off by default until measured: each new shape pays the trial once.
    cudnn_benchmark: bool = False
    # The attention kernel scaled_dot_product_attention may pick on CUDA (process-wide flags, like
    # cudnn_benchmark; the math kernel stays as the fallback for shapes a kernel refuses): "auto"
    # leaves PyTorch's choice (cuDNN's flash kernel on an H200), the others measure one against it.
    attention: Literal["auto", "cudnn", "flash", "efficient"] = "auto"
    # Tiny latent decoders (TAESD's kind, models/tiny_decoder.py) that requests pick with
    # decoder="tiny": model family (sd15, sd21, sdxl, sdxl-refiner, sd3, flux; sd15's serves SD 2.x
    # and sdxl's the refiner unless named) -> a diffusers AutoencoderTiny folder, or "random" (noise,
    # for tests and speed measurements). E.g.
    # IMAGEGENX_MODELS__TINY_DECODERS='{"sdxl": "/models/taesdxl"}'
    tiny_decoders: dict[str, str] = Field(default_factory=dict)

    @property
    def upscaler_compile(self) -> str:
        """The compile mode of Real-ESRGAN: ``compile`` when ``compile_upscaler`` is on, else off."""
        return self.compile if self.compile_upscaler else "off"

    def tiny_decoder_for(self, family: str) -> str:
        """Where ``family``'s tiny decoder comes from ("": none). TAESD decodes SD 1.5's and SD 2.x's
        latents, taesdxl the SDXL base's and its refiner's: sd15's serves sd21, sdxl's the refiner."""
        same_latents = {"sd21": "sd15", "sdxl-refiner": "sdxl"}.get(family, "")
        return self.tiny_decoders.get(family) or self.tiny_decoders.get(same_latents, "")


class EngineSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    # How long a lone job waits for others of its key before its batch starts. Short: jobs of more
    # than one step join a running batch at any step boundary, and under load the queue fills while
    # the GPU works; the window only groups a burst that reaches an idle engine (it was 50 ms, 3% of an
    # SDXL 30-step request's latency).
    batch_window_ms: float = 10.0
    aging_s: float = 2.0
    max_batch: int = 16
    max_pixels_per_batch: int = 8 * 1024 * 1024
    # Continuous batching: compatible jobs that arrive while a batch runs join it at the next step
    # boundary. Off, a batch keeps the jobs it started with and the others wait for it to finish
    # (to measure what joining buys: scripts/continuous_batching.py).
    continuous_batching: bool = True
    min_size: int = 256
    max_size: int = 2048
    max_steps: int = 150
    # An image that comes out NaN/infinite: "fail" it with the reason, or "retry" it with a new seed
    # (at most nan_retries times) and fail only if it stays non-finite.
    nan_policy: Literal["fail", "retry"] = "fail"
    nan_retries: int = 2
    # Progress events carry a small latent-to-RGB JPEG about 8 times per job (a device-to-host copy
    # of one image's latents each time); off: progress numbers only.
    step_previews: bool = True
    # How previews are made: "latent" (a fixed latent-to-RGB projection, no decode) or "tiny" (the
    # model family's tiny decoder where ModelSettings.tiny_decoders names one: a real picture at 128
    # pixels, one small decode per preview; elsewhere the projection)
    preview_decoder: Literal["latent", "tiny"] = "latent"
    # Fault injection for tests: a UNet call with more rows than this raises CUDA out-of-memory, as a
    # small GPU would, so the batch-split path runs end to end on a CPU (0: off).
    fault_oom_above_rows: int = 0
    # Likewise, a full-VAE decode of more pixels than this at once, untiled, raises CUDA out-of-memory
    # (0: off): the decode's fallbacks (one image at a time, then tiled) run on a CPU.
    fault_oom_decode_above_pixels: int = 0
    # Resolutions whose every batch shape the service builds before it says ready (engine/warmup.py):
    # with compile on, each padded batch size is a compile, better paid at startup than by a request.
    # E.g. IMAGEGENX_ENGINE__WARMUP_SIZES='["1024x1024", "512x512"]'; empty: one small image only.
    warmup_sizes: list[str] = Field(default_factory=list)
    # How long a thread of a process running an engine keeps the GIL while others wait for it
    # (sys.setswitchinterval; Python's default is 5 ms). The engine thread runs Python between kernel
    # launches; a store or lease thread that gives the GIL up for each SQLite call waits up to this
    # long to get it back, holding the database's write lock meanwhile, which every other process
    # waits for (applied by `imagegenx serve` and `imagegenx worker`; 0: Python's default).
    gil_switch_interval_ms: float = Field(default=1.0, ge=0)

    @field_validator("warmup_sizes")
    @classmethod
    def _sizes_are_width_x_height(cls, sizes: list[str]) -> list[str]:
        for size in sizes:
            if not re.fullmatch(r"[1-9][0-9]*x[1-9][0-9]*", size):
                raise ValueError(f"warm-up size {size!r} is not WIDTHxHEIGHT (e.g. 1024x1024)")
        return sizes

    @property
    def warmup_dims(self) -> list[tuple[int, int]]:
        """``warmup_sizes`` as (width, height) pairs."""
        return [(int(w), int(h)) for w, h in (size.split("x") for size in self.warmup_sizes)]


class StorageSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    database_url: str = Field(default_factory=lambda: f"sqlite:///{_data_home() / 'imagegenx.db'}")
    # PostgreSQL connections per process: kept open, and extra under load (storage/database.py sizes them)
    db_pool_size: int = Field(default=5, ge=1)
    db_max_overflow: int = Field(default=10, ge=0)
    # A local folder, or s3://bucket/prefix (S3-compatible; the s3_* fields below reach it)
    blob_url: str = Field(default_factory=lambda: str(_data_home() / "blobs"))
    s3_endpoint: str = ""  # e.g. http://127.0.0.1:8333 for SeaweedFS/MinIO; empty: AWS
    s3_region: str = "us-east-1"
    s3_access_key_id: str = ""
    s3_secret_access_key: str = ""
    # Results served by a presigned URL (redirect) instead of proxied through the API node
    s3_presign: bool = False
    spool_dir: Path = Field(default_factory=lambda: _data_home() / "spool")
    history_days: int = 90


class QueueSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    # Empty: the embedded queue (rows in the task database). nats://host:4222: NATS JetStream.
    url: str = ""
    stream: str = "imagegenx"  # JetStream stream (and subject prefix) name


class ServiceSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    host: str = "127.0.0.1"
    port: int = 8000
    # A worker's Prometheus /metrics port (it has no other HTTP); 0: none. With --gpus all, the worker
    # for the i-th GPU of its list (0, 1, ...) listens on metrics_port + i, and so does the i-th child
    # of `serve --worker-processes N`. API nodes and `serve` itself: /metrics on `port`.
    metrics_port: int = 0
    public_url: str = ""  # base for result URLs; empty: derived from each request
    queued_task_ttl_s: float = 300.0  # queued longer than this: expired (seed 003: 5 minutes)
    max_queued_tasks: int = 10_000  # beyond this new tasks get 503: memory stays bounded
    # New tasks get 503 while the oldest queued task has waited longer than this (the workers are
    # behind): under overload the tasks accepted keep a bounded wait. 0: off (wait up to the TTL).
    max_queue_wait_s: float = 0.0
    lease_s: float = 30.0  # a worker's hold on a job before another may take it
    max_deliveries: int = 3  # a job leased this often without finishing fails with the reason
    max_upload_bytes: int = 20 * 1024 * 1024
    max_lora_bytes: int = 512 * 1024 * 1024
    # Empty: rate limits kept in this process. redis://host:6379/0: shared by every API node.
    rate_limit_url: str = ""
    # /metrics needs a valid API key, or this token as the bearer (what Prometheus is given). Empty:
    # API keys only.
    metrics_token: str = ""
    require_keys: bool = True  # false only for local experiments: every request is an anonymous free user
    webhook_retries: int = 5
    # "host:port" entries that image_url and callback_url may reach although they are private
    # (an operator's internal services; tests). Everything else private is refused (SSRF guard).
    allowed_private_hosts: tuple[str, ...] = ()
    prompt_filter: bool = True  # refuse prompts matching the safety rules or scored as profane
    # Per tier ("free", "paid"): images with an NSFW probability above the limit are withheld and the
    # task fails with the reason (needs the post extra's NSFW model). Empty: no image gate.
    nsfw_max_by_tier: dict[str, float] = Field(default_factory=dict)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMAGEGENX_", env_nested_delimiter="__", frozen=True)

    models: ModelSettings = Field(default_factory=ModelSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    service: ServiceSettings = Field(default_factory=ServiceSettings)
