"""The command line, and the composition root: settings, model cache and engine are built here.

User mistakes print one line (``error: ...``) and exit with status 2, never a traceback.
Heavy imports (torch, diffusers) happen inside commands, so ``imagegenx --help`` is instant.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from imagegenx.cli_bench import bench
from imagegenx.cli_inputs import parse_control, parse_lora, read_bytes, read_image, read_prompts
from imagegenx.cli_keys import keys_app
from imagegenx.cli_portrait import portrait
from imagegenx.cli_roles import api, worker
from imagegenx.config import Settings
from imagegenx.types import JobSpec, Priority, Task, UserError, default_sampler

app = typer.Typer(add_completion=False, no_args_is_help=True, help="imagegenx: generate images, fast.")
err = Console(stderr=True)


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False, markup=True)
    return typer.Exit(code)


@app.callback()
def _check_settings() -> None:
    """Before any command: a setting the environment gets wrong is one line per mistake, naming
    its variable, not a traceback from the first place that reads the settings."""
    from pydantic import ValidationError

    try:
        Settings()
    except ValidationError as exc:
        for error in exc.errors():
            name = "IMAGEGENX_" + "__".join(str(part) for part in error["loc"]).upper()
            err.print(f"[red]error:[/red] {name}={error.get('input')!r}: {error['msg']}", highlight=False)
        raise typer.Exit(2) from None


def _quiet_libraries() -> None:
    """transformers and diffusers log warnings that mean nothing to a user of the CLI; so does
    torchao (the fp8 extra), which diffusers imports whenever it is installed: its kernels for other
    GPUs that do not load here, and an enum registration torch deprecates."""
    import logging
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


@app.command()
def generate(
    prompt: Annotated[
        str | None, typer.Argument(help="What to draw. A1111 (word:1.3) weighting works.")
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Model reference (see `models`).")
    ] = None,
    num_images: Annotated[int, typer.Option("--num-images", "-n", min=1, max=1000)] = 1,
    seed: Annotated[int | None, typer.Option(help="Seed of the first image; image i uses seed+i.")] = None,
    out: Annotated[Path, typer.Option(help="Folder for images and their .json metadata.")] = Path("out"),
    negative: Annotated[str | None, typer.Option(help="Negative prompt (default: a general one).")] = None,
    width: Annotated[int | None, typer.Option(help="Multiple of 8.")] = None,
    height: Annotated[int | None, typer.Option(help="Multiple of 8.")] = None,
    steps: Annotated[int, typer.Option()] = 30,
    cfg: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = 7.0,
    scheduler: Annotated[
        str | None,
        typer.Option(
            help="euler, euler_a, dpmpp_2m, dpmpp_2m_karras, ddim, unipc, lcm "
            "[default: dpmpp_2m_karras; euler for SD 3.5 and Flux]"
        ),
    ] = None,
    clip_skip: Annotated[int, typer.Option(help="A1111 convention: 1 = last layer.")] = 1,
    lora: Annotated[list[str] | None, typer.Option(help="NAME[:WEIGHT], repeatable.")] = None,
    control: Annotated[
        list[str] | None,
        typer.Option(
            help="TYPE,MODEL,IMAGE[,STRENGTH], repeatable: TYPE openpose (a photo), canny (a photo), "
            "depth (a depth map) or none (a ready control image); MODEL a ControlNet folder "
            "or random:controlnet."
        ),
    ] = None,
    depth_model: Annotated[
        Path | None, typer.Option(help="ONNX depth model: depth controls then take a photo, not a depth map.")
    ] = None,
    image: Annotated[Path | None, typer.Option(help="Input image: img2img, or inpaint with --mask.")] = None,
    mask: Annotated[Path | None, typer.Option(help="Inpaint mask: white = repaint.")] = None,
    strength: Annotated[float, typer.Option(help="img2img/inpaint denoising strength.")] = 0.75,
    image_format: Annotated[str, typer.Option("--format", help="webp, png, jpeg, avif")] = "webp",
    priority: Annotated[int, typer.Option(min=0, max=3, help="0 most urgent.")] = 2,
    batch_file: Annotated[Path | None, typer.Option(help="One prompt per line.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON line per image on stdout.")] = False,
    no_metadata: Annotated[bool, typer.Option(help="Embed no generation parameters.")] = False,
    hires_scale: Annotated[
        float, typer.Option(help="Hires fix: first pass at the given size, then this much larger.")
    ] = 1.0,
    hires_strength: Annotated[float, typer.Option(help="Hires fix denoising strength.")] = 0.35,
    qc: Annotated[
        bool, typer.Option(help="Score sharpness, NSFW (and identity/SSIM with --reference).")
    ] = False,
    reference: Annotated[
        Path | None, typer.Option(help="Reference photo for identity and SSIM in QC.")
    ] = None,
    brisque: Annotated[bool, typer.Option(help="Add the BRISQUE quality score to QC.")] = False,
    shortlist: Annotated[
        int, typer.Option(min=1, help="With QC: how many of the best images qc.json shortlists.")
    ] = 15,
    refiner: Annotated[str | None, typer.Option(help="Refiner model for a second img2img pass.")] = None,
    refiner_steps: Annotated[int, typer.Option(help="Refiner steps actually run.")] = 10,
    refine_top_k: Annotated[
        int | None, typer.Option(help="Refine only the best K images by QC (turns --qc on).")
    ] = None,
    face_fix: Annotated[bool, typer.Option(help="Regenerate detected faces at low denoise.")] = False,
    hand_fix: Annotated[bool, typer.Option(help="Regenerate detected hands at low denoise.")] = False,
    fix_strength: Annotated[float, typer.Option(help="Face/hand fix denoising strength.")] = 0.4,
    face_restore: Annotated[
        Path | None, typer.Option(help="GFPGAN v1.3/v1.4 .safetensors: restore detected faces.")
    ] = None,
    face_restore_weight: Annotated[float, typer.Option(help="Blend of the restored faces.")] = 0.5,
    upscale: Annotated[int, typer.Option(help="Real-ESRGAN upscale: 1 (off), 2 or 4.")] = 1,
    watermark: Annotated[str | None, typer.Option(help="Visible text watermark.")] = None,
    invisible_watermark: Annotated[bool, typer.Option(help="Embed an invisible watermark.")] = False,
    tiny_decoder: Annotated[
        str | None, typer.Option(help="Decode with a tiny decoder: an AutoencoderTiny folder, or random.")
    ] = None,
) -> None:
    """Generate images and write them, with a .json metadata record each, to --out."""
    _quiet_libraries()
    try:
        settings = Settings()
        prompts = read_prompts(prompt, batch_file)
        from imagegenx.pipelines.samplers import parse_sampler
        from imagegenx.postprocess.encode import ImageFormat

        fmt = ImageFormat.parse(image_format)
        from imagegenx.postprocess.chain import PostprocessSpec

        post = PostprocessSpec(
            hires_scale=hires_scale,
            hires_strength=hires_strength,
            qc=qc or reference is not None or brisque or refine_top_k is not None,
            brisque=brisque,
            refiner=refiner,
            refiner_steps=refiner_steps,
            refine_top_k=refine_top_k,
            face_fix=face_fix,
            hand_fix=hand_fix,
            fix_strength=fix_strength,
            face_restore=str(face_restore) if face_restore else None,
            face_restore_weight=face_restore_weight,
            upscale=upscale,
            watermark_text=watermark,
            invisible_watermark=invisible_watermark,
        )
        reference_image = read_image(reference, "--reference")
        loras = tuple(parse_lora(item) for item in lora or [])
        controls = tuple(parse_control(item, depth_model) for item in control or [])
        task = Task.TEXT2IMG if image is None else Task.INPAINT if mask is not None else Task.IMG2IMG
        if mask is not None and image is None:
            raise UserError("--mask needs --image")
        init_image, mask_image = read_bytes(image, "--image"), read_bytes(mask, "--mask")
        model_ref = model or settings.models.default_model
        from imagegenx.models.sources import NATIVE_SIZE, resolve

        source = resolve(model_ref, settings.models)
        settings = with_tiny_decoder(settings, model_ref, tiny_decoder)
        sampler = parse_sampler(scheduler) if scheduler else default_sampler(source.family)
        default_size = 64 if model_ref.startswith("random:tiny-") else NATIVE_SIZE.get(source.family, 1024)
        first_seed = random.randrange(2**32) if seed is None else seed
        jobs = [
            JobSpec(
                prompt=text,
                model=model_ref,
                negative_prompt=negative,
                width=width or default_size,
                height=height or default_size,
                steps=steps,
                guidance_scale=cfg,
                scheduler=sampler,
                seed=first_seed + i,
                clip_skip=clip_skip,
                task=task,
                strength=strength,
                init_image=init_image,
                mask_image=mask_image,
                loras=loras,
                controls=controls,
                priority=Priority(priority),
                job_id=f"image-{n}",
                decoder="tiny" if tiny_decoder else "full",
            )
            for n, (text, i) in enumerate((text, i) for text in prompts for i in range(num_images))
        ]
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create --out folder {out}: {exc.strerror}") from None
        from imagegenx.cli_generate import run_jobs

        failed = run_jobs(
            settings,
            jobs,
            out,
            fmt,
            post,
            reference_image,
            shortlist,
            as_json=as_json,
            embed_metadata=not no_metadata,
            console=err,
        )
    except UserError as exc:
        raise _fail(str(exc)) from None
    if failed:
        raise typer.Exit(1)


def with_tiny_decoder(settings: Settings, model_ref: str, location: str | None) -> Settings:
    """``settings`` with ``location`` (a folder, or random) as the tiny decoder of ``model_ref``'s
    family: what ``--tiny-decoder`` sets."""
    if not location:
        return settings
    from imagegenx.models.sources import resolve

    decoders = settings.models.tiny_decoders | {resolve(model_ref, settings.models).family: location}
    return _with(settings, models={"tiny_decoders": decoders})


@app.command()
def models(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the models imagegenx can load: shipped random architectures and the model folder."""
    from imagegenx.models.sources import list_models

    settings = Settings()
    found = list_models(settings.models)
    if as_json:
        for info in found:
            typer.echo(json.dumps(info.__dict__))
        return
    table = Table(
        "name", "source", "family", "location", "note", title=f"models (folder: {settings.models.model_dir})"
    )
    for info in found:
        note = f"{info.note}; tiny decoder" if info.tiny_decoder else info.note
        table.add_row(info.name, info.source, info.family, info.location, note)
    Console().print(table)


@app.command()
def serve(
    model: Annotated[str | None, typer.Option("--model", "-m", help="Default model (see `models`).")] = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on [default: 127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option(help="Port [default: 8000].")] = None,
    worker_process: Annotated[
        bool,
        typer.Option(
            "--worker-process",
            help="Run the engine in a child `imagegenx worker` process (restarted if it dies), so HTTP "
            "traffic and the engine do not share one interpreter lock: for high request rates.",
        ),
    ] = False,
    worker_processes: Annotated[
        int,
        typer.Option(
            min=0,
            max=16,
            help="Run N child worker processes (implies --worker-process), each with its own copy of "
            "the model on the same device: a GPU that one host-bound worker leaves idle part of the "
            "time (small images, few steps) does more with two.",
        ),
    ] = 0,
) -> None:
    """Start the HTTP API and the engine (SQLite, a local folder, the embedded queue): in one process,
    or with --worker-process(es) in one and the engine in one or more others."""
    _quiet_libraries()
    import uvicorn

    from imagegenx.api.app import create_app

    settings = Settings()
    try:
        if model:
            from imagegenx.models.sources import resolve

            resolve(model, settings.models)
        settings = _with(
            settings,
            models={"default_model": model} if model else {},
            service={k: v for k, v in (("host", host), ("port", port)) if v is not None},
        )
    except UserError as exc:
        raise _fail(str(exc)) from None
    from imagegenx.api import jsonlog
    from imagegenx.cli_roles import apply_gil_switch_interval, child_workers

    jsonlog.configure()
    _configure_tracing()
    apply_gil_switch_interval(settings)  # the API's database writes, and the engine's when it runs here
    service = settings.service
    workers = max(worker_processes, int(worker_process))
    if not workers:
        uvicorn.run(create_app(settings), host=service.host, port=service.port, log_config=None)
        return

    with child_workers(["--model", model] if model else [], workers):
        uvicorn.run(
            create_app(settings, run_worker=False), host=service.host, port=service.port, log_config=None
        )


def _configure_tracing() -> None:
    """OpenTelemetry export is off unless OTEL_EXPORTER_OTLP_ENDPOINT is set and the SDK is installed
    (`pip install imagegenx[otel]`); without it every span is a no-op."""
    import os

    if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        err.print("OTEL_EXPORTER_OTLP_ENDPOINT is set but the OpenTelemetry SDK is not installed: no traces")
        return
    provider = TracerProvider(resource=Resource.create({"service.name": "imagegenx"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)


@app.command("watermark-check")
def watermark_check(path: Annotated[Path, typer.Argument(help="An image written by imagegenx.")]) -> None:
    """Read the invisible watermark back from an image (prints one JSON line)."""
    from imagegenx.postprocess.watermark import check_watermark

    try:
        result = check_watermark(path)
    except UserError as exc:
        raise _fail(str(exc)) from None
    typer.echo(json.dumps(result))
    if not result["found"]:
        raise typer.Exit(1)


app.add_typer(keys_app, name="keys")
app.command()(bench)
app.command()(portrait)
app.command()(api)
app.command()(worker)


def _with(settings: Settings, **slices: dict) -> Settings:
    """A copy of the settings with some fields of some slices replaced."""
    return settings.model_copy(
        update={name: getattr(settings, name).model_copy(update=values) for name, values in slices.items()}
    )


def main() -> None:  # pragma: no cover - console script shim
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
