"""The benchmark scenarios. Full size on a GPU (random weights: a step costs the same whatever the
weights); ``smoke`` runs the same code on tiny models on the CPU, to prove the harness in CI.

Each scenario returns ``Row``s: ours first, then each peer (bench/peers.py) doing the same work.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from imagegenx.bench.coldstart import cold_start
from imagegenx.bench.decode import vae_decode
from imagegenx.bench.flops import image_tflop
from imagegenx.bench.measure import (
    Row,
    compile_events,
    count_tflop,
    describe_events,
    free_device,
    peak_gib,
    reset_peak,
    timed,
)
from imagegenx.bench.peers import Peer, load_peer
from imagegenx.bench.portrait import portrait_100
from imagegenx.config import ModelSettings, Settings
from imagegenx.engine.engine import Engine
from imagegenx.engine.warmup import warm_up_sizes
from imagegenx.models.speed import use_cudnn_benchmark
from imagegenx.models.tiny_decoder import TINY_DECODER_FAMILIES
from imagegenx.pipelines.samplers import make_scheduler
from imagegenx.postprocess.encode import ImageFormat, encode_image, encode_pil
from imagegenx.types import JobSpec, SchedulerName

PROMPT = "a red fox in fresh snow, golden hour, photo"


def prompt_of(index: int) -> str:
    """Each request's own prompt, as real traffic has (one repeated prompt would be served by the
    prompt cache after its first encoding)."""
    return f"{PROMPT} #{index}"


@dataclass
class BenchContext:
    settings: Settings  # the engine's, speed-ups included
    smoke: bool
    peers: tuple[str, ...]
    peer_compile: str = "max-autotune"
    repeats: int = 5
    # Called with each row as soon as it is measured, so a run cut short (a GPU call's time limit
    # during a peer's compile) keeps the rows before it.
    on_row: Callable[[Row], None] | None = None

    def emit(self, row: Row) -> Row:
        if self.on_row is not None:
            self.on_row(row)
        return row

    @property
    def device(self) -> torch.device:
        from imagegenx.models.loader import resolve_device

        return resolve_device(self.settings.models.device)


@dataclass(frozen=True)
class Scenario:
    name: str
    what: str
    run: Callable[[BenchContext], list[Row]] | None = None  # None: not measurable yet
    missing: str = ""


# Image generation ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    model: str
    size: int
    steps: int
    cfg: float
    scheduler: SchedulerName
    jobs: int  # requests in a latency run, images in a throughput run
    peer_batch: int  # images per pipeline call for the peers
    decoder: str = "full"  # "tiny": a random TAESD-kind decoder, for us and the peers (pipe.vae)

    def job(self, seed: int) -> JobSpec:
        return JobSpec(
            prompt_of(seed),
            self.model,
            width=self.size,
            height=self.size,
            steps=self.steps,
            guidance_scale=self.cfg,
            scheduler=self.scheduler,
            seed=seed,
            decoder=self.decoder,
        )


# The engine's batches in the bench (and its profile scripts): as large as the peers', 32 images of
# 512² or 16 of 1024² in one UNet batch.
BENCH_BATCH_LIMITS = {"max_batch": 32, "max_pixels_per_batch": 16 * 1024 * 1024}


def _engine_settings(ctx: BenchContext, tiny: bool = False) -> Settings:
    """Batches as large as the peers': 32 images of 512², 16 of 1024² in one UNet batch; and the
    random tiny decoders a tiny workload decodes with."""
    engine = ctx.settings.engine.model_copy(update=BENCH_BATCH_LIMITS)
    return ctx.settings.model_copy(update={"engine": engine, "models": _model_settings(ctx, tiny)})


def _model_settings(ctx: BenchContext, tiny: bool) -> ModelSettings:
    models = ctx.settings.models
    if not tiny:
        return models
    random = {family: "random" for family in TINY_DECODER_FAMILIES}
    return models.model_copy(update={"tiny_decoders": random | models.tiny_decoders})


def _run_peers(ctx: BenchContext, name: str, work: Workload, measure: Callable[[Peer], Row]) -> list[Row]:
    rows = []
    for peer_name in ctx.peers:
        peer = load_peer(
            peer_name,
            work.model,
            _model_settings(ctx, work.decoder == "tiny"),
            ctx.peer_compile,
            work.decoder,
        )
        # The UNet families take the job's sampler; SD 3.5 and Flux keep their flow-matching Euler.
        if work.scheduler is not SchedulerName.DPMPP_2M_KARRAS and hasattr(peer.pipe, "unet"):
            peer.pipe.scheduler = make_scheduler(work.scheduler, peer.pipe.scheduler.config)
        try:
            row = measure(peer)
        finally:
            peer.close()
        rows.append(ctx.emit(replace(row, scenario=name, runner=peer_name, note=peer.note)))
        del peer
        free_device()
    return rows


def latency(name: str, work: Workload, ctx: BenchContext) -> list[Row]:
    """One request at a time, from submit to the encoded WebP."""
    device = ctx.device

    def ours() -> Row:
        with Engine(_engine_settings(ctx, work.decoder == "tiny")) as engine:
            tflop = image_tflop(engine.models.get(work.model), work)
            # Warm-up (and compile). CUDA graph trees record a function on its second call, and the
            # decoder runs once an image: a second image records its graph before the timing.
            with compile_events() as warm:
                for _ in range(2 if ctx.settings.models.compile == "reduce-overhead" else 1):
                    encode_image(engine.run([work.job(0)])[0], ImageFormat.WEBP)
            reset_peak(device)
            with compile_events() as events:
                seconds = [
                    timed(device, lambda seed=seed: encode_image(engine.submit(work.job(seed)).result()))[0]
                    for seed in range(1, work.jobs + 1)
                ]
            # Kept before the engine closes: a fault while it stops must not lose the measurement.
            note = describe_events(events, warm, ctx.settings.models.compile)
            return ctx.emit(
                Row(name, "imagegenx", len(seconds), sum(seconds), seconds, peak_gib(device), tflop, note)
            )

    def peer_row(peer: Peer, tflop: float) -> Row:
        def one(seed: int) -> bytes:
            size, steps = work.size, work.steps
            return _webp(
                peer.generate(
                    [prompt_of(seed)], width=size, height=size, steps=steps, cfg=work.cfg, seed=seed
                )[0]
            )

        one(0)
        reset_peak(device)
        seconds = [timed(device, lambda seed=seed: one(seed))[0] for seed in range(1, work.jobs + 1)]
        return Row(name, peer.name, len(seconds), sum(seconds), seconds, peak_gib(device), tflop)

    row = ours()
    free_device()
    return [row, *_run_peers(ctx, name, work, lambda peer: peer_row(peer, row.tflop_per_image))]


def throughput(name: str, work: Workload, ctx: BenchContext) -> list[Row]:
    """Many jobs arriving at once: sustained images per second."""
    device = ctx.device

    def ours() -> Row:
        with Engine(_engine_settings(ctx, work.decoder == "tiny")) as engine:
            tflop = image_tflop(engine.models.get(work.model), work)
            # Every batch shape first (a compiled engine compiles each once), then the workload itself.
            with compile_events() as warm:
                warm_up_sizes(engine, work.model, [(work.size, work.size)], (work.cfg,), (work.decoder,))
                engine.run([work.job(seed) for seed in range(work.peer_batch)])
            reset_peak(device)
            with compile_events() as events:
                seconds, _ = timed(device, lambda: engine.run([work.job(seed) for seed in range(work.jobs)]))
            # Kept before the engine closes: a fault while it stops must not lose the measurement.
            note = describe_events(events, warm, ctx.settings.models.compile)
            row = Row(name, "imagegenx", work.jobs, seconds, [], peak_gib(device), tflop, note)
            return ctx.emit(row)

    def peer_row(peer: Peer, tflop: float) -> Row:
        calls = max(1, work.jobs // work.peer_batch)

        def call(seed: int) -> None:
            prompts = [prompt_of(seed * work.peer_batch + i) for i in range(work.peer_batch)]
            size = work.size
            peer.generate(prompts, width=size, height=size, steps=work.steps, cfg=work.cfg, seed=seed)

        call(0)
        reset_peak(device)
        seconds, _ = timed(device, lambda: [call(seed) for seed in range(1, calls + 1)])
        return Row(name, peer.name, calls * work.peer_batch, seconds, [], peak_gib(device), tflop)

    row = ours()
    free_device()
    return [row, *_run_peers(ctx, name, work, lambda peer: peer_row(peer, row.tflop_per_image))]


def _webp(image) -> bytes:
    """A peer's PIL image encoded with our WebP settings: the comparison is of the generation."""
    return encode_pil(image, ImageFormat.WEBP)


# Heavy stages alone -------------------------------------------------------------------------------


def esrgan(name: str, ctx: BenchContext) -> list[Row]:
    """Real-ESRGAN x4plus (real weights) on 1024² photos in a batch of 4: with the seed-000 finish
    (blend 0.35 with Lanczos, unsharp) and the network alone."""
    import numpy as np
    from PIL import Image
    from skimage import data

    from imagegenx.postprocess.upscale import Upscale, get_upscaler

    device, side = ctx.device, 32 if ctx.smoke else 1024
    use_cudnn_benchmark(ctx.settings.models, device)  # as a model load would (no model is loaded here)
    photo = Image.fromarray(data.astronaut()).resize((side, side), Image.Resampling.LANCZOS)
    mode = ctx.settings.models.upscaler_compile  # as the engine's chain would
    fused = ctx.settings.models.upscaler_fused_blocks
    upscaler = get_upscaler(device=device, fused_blocks=fused)
    net = upscaler.net
    pixels = torch.from_numpy(np.array(photo)).permute(2, 0, 1)[None].to(device, next(net.parameters()).dtype)
    tflop = count_tflop(lambda: type(net).forward(net, pixels / 255))
    rows = []
    ours = Upscale(device=device, compile_mode=mode, fused_blocks=fused)
    # The dense blocks the other way too (fused where the default is plain, and back), to measure both.
    other = Upscale(device=device, compile_mode=mode, fused_blocks=not upscaler.fused_blocks)
    compiled = f", compiled {mode}" if mode != "off" else ""
    network = {"scale": 4, "network_strength": 1.0}
    for runner, step, params in (
        ("imagegenx x4 + finish", ours, {"scale": 4, "network_strength": 0.35, "unsharp": True}),
        ("imagegenx x4 network only", ours, network),
        # Tiles of 512 read 32 pixels of context on each inner side: 1.27x the pixels of a 1024² image.
        # A GPU with room for the whole image reads each pixel once (``tile`` is a request parameter).
        ("imagegenx x4 network only, tile 1024", ours, network | {"tile": 1024}),
        (
            f"imagegenx x4 network only, dense blocks {'plain' if upscaler.fused_blocks else 'fused'}",
            other,
            network,
        ),
    ):
        step.apply([photo] * 4, params)  # warm-up
        reset_peak(device)
        run = lambda step=step, params=params: step.apply([photo] * 4, params)  # noqa: E731
        blocks = "dense blocks fused" if (step is ours) == upscaler.fused_blocks else "dense blocks plain"
        best = min(timed(device, run)[0] for _ in range(3))
        rows.append(
            Row(
                name,
                runner,
                4,
                best,
                [],
                peak_gib(device),
                tflop,
                f"batch of 4, best of 3{compiled}, {blocks}",
            )
        )
    return rows


# The registry -------------------------------------------------------------------------------------


def _workloads(smoke: bool) -> dict[str, Workload]:
    if smoke:
        return {
            "sdxl-1024-30": Workload("random:tiny-sdxl", 64, 2, 7.0, SchedulerName.DPMPP_2M_KARRAS, 2, 1),
            "sdxl-1024-lcm4": Workload("random:tiny-sdxl", 64, 4, 1.0, SchedulerName.LCM, 4, 2),
            "sdxl-1024-lcm4-tiny": Workload("random:tiny-sdxl", 64, 4, 1.0, SchedulerName.LCM, 4, 2, "tiny"),
            "turbo-512-1": Workload("random:tiny-sd21", 64, 1, 0.0, SchedulerName.EULER, 4, 2),
            "turbo-512-1-tiny": Workload("random:tiny-sd21", 64, 1, 0.0, SchedulerName.EULER, 4, 2, "tiny"),
            "flux-dev-1024-28": Workload("random:tiny-flux", 64, 2, 3.5, SchedulerName.EULER, 2, 1),
        }
    return {
        "sdxl-1024-30": Workload("random:sdxl", 1024, 30, 7.0, SchedulerName.DPMPP_2M_KARRAS, 5, 1),
        "sdxl-1024-lcm4": Workload("random:sdxl", 1024, 4, 1.0, SchedulerName.LCM, 64, 16),
        "turbo-512-1": Workload("random:sd21", 512, 1, 0.0, SchedulerName.EULER, 256, 32),
        "turbo-512-1-tiny": Workload("random:sd21", 512, 1, 0.0, SchedulerName.EULER, 256, 32, "tiny"),
        "sdxl-1024-lcm4-tiny": Workload("random:sdxl", 1024, 4, 1.0, SchedulerName.LCM, 64, 16, "tiny"),
        "flux-dev-1024-28": Workload("random:flux-dev", 1024, 28, 3.5, SchedulerName.EULER, 3, 1),
    }


def _generation(name: str, kind: Callable[[str, Workload, BenchContext], list[Row]]):
    return lambda ctx: kind(name, _workloads(ctx.smoke)[name], ctx)


SCENARIOS: dict[str, Scenario] = {
    "sdxl-1024-30": Scenario(
        "sdxl-1024-30",
        "SDXL 1024², 30 steps, CFG 7, one request at a time",
        _generation("sdxl-1024-30", latency),
    ),
    "sdxl-1024-lcm4": Scenario(
        "sdxl-1024-lcm4",
        "SDXL 1024², 4 LCM steps, no CFG, 64 jobs at once",
        _generation("sdxl-1024-lcm4", throughput),
    ),
    "turbo-512-1": Scenario(
        "turbo-512-1",
        "SD 2.1 architecture 512², 1 step, 256 jobs at once",
        _generation("turbo-512-1", throughput),
    ),
    "turbo-512-1-tiny": Scenario(
        "turbo-512-1-tiny",
        "turbo-512-1 decoded by a tiny decoder (TAESD's architecture, random weights), the peers too",
        _generation("turbo-512-1-tiny", throughput),
    ),
    "sdxl-1024-lcm4-tiny": Scenario(
        "sdxl-1024-lcm4-tiny",
        "sdxl-1024-lcm4 decoded by a tiny decoder (TAESDXL's architecture, random weights), the peers too",
        _generation("sdxl-1024-lcm4-tiny", throughput),
    ),
    "esrgan-x4-1024": Scenario(
        "esrgan-x4-1024", "Real-ESRGAN x4 of 1024² images", lambda ctx: esrgan("esrgan-x4-1024", ctx)
    ),
    "vae-decode-1024": Scenario(
        "vae-decode-1024", "SDXL VAE decode of 1024²", lambda ctx: vae_decode("vae-decode-1024", ctx)
    ),
    "portrait-100": Scenario(
        "portrait-100",
        "seed 000: 100 InstantID drafts, QC, shortlist 15, refine 10, face fix, x4",
        lambda ctx: portrait_100("portrait-100", ctx, _engine_settings(ctx)),
    ),
    "portrait-100-tiny": Scenario(
        "portrait-100-tiny",
        "portrait-100 with the drafts decoded by a tiny decoder (TAESDXL's architecture, random weights)",
        lambda ctx: portrait_100("portrait-100-tiny", ctx, _engine_settings(ctx, tiny=True), "tiny"),
    ),
    "cold-start": Scenario(
        "cold-start",
        "single-file SDXL checkpoint → first image; LoRA switches; no reloads over mixed requests",
        lambda ctx: cold_start("cold-start", ctx),
    ),
    "flux-dev-1024-28": Scenario(
        "flux-dev-1024-28",
        "Flux.1-dev 1024², 28 steps, one request at a time",
        _generation("flux-dev-1024-28", latency),
    ),
}
