"""``imagegenx portrait``: 1-3 selfies → the best of N photoreal portraits (seed 000), in a folder.

Registered by ``cli.py`` (``app.command()(portrait)``); the work is ``engine.portrait.run_portrait``.
Heavy imports happen inside the command, so importing this module (and ``imagegenx --help``) stays instant.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Annotated

import typer


def portrait(
    selfies: Annotated[
        list[Path],
        typer.Argument(help="1-3 selfies (JPEG, PNG, WebP), one clear face of 64 px or more each."),
    ],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The portrait to make of the person.")],
    num: Annotated[
        int, typer.Option("-n", "--num-drafts", min=1, max=1000, help="Drafts to choose from.")
    ] = 100,
    out: Annotated[
        Path, typer.Option(help="Folder for the portraits, report.json and contact_sheet.webp.")
    ] = Path("portraits"),
    seed: Annotated[int | None, typer.Option(help="Seed of the first draft; draft i uses seed+i.")] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model", "-m", help="Base model (default: the setting IMAGEGENX_MODELS__DEFAULT_MODEL)."
        ),
    ] = None,
    negative: Annotated[str | None, typer.Option(help="Negative prompt (default: a general one).")] = None,
    width: Annotated[
        int | None, typer.Option(help="Multiple of 8 (default: 1024; 64 for random:tiny-* models).")
    ] = None,
    height: Annotated[
        int | None, typer.Option(help="Multiple of 8 (default: 1024; 64 for random:tiny-* models).")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="LCM steps per draft (default: 4).")] = None,
    cfg: Annotated[float, typer.Option(help="Guidance scale (seed 000: 6.5 with LCM-4).")] = 6.5,
    lcm2: Annotated[bool, typer.Option("--lcm2", help="2 LCM steps and CFG 0.5 lower.")] = False,
    lora: Annotated[list[str] | None, typer.Option(help="NAME[:WEIGHT], repeatable (an LCM-LoRA).")] = None,
    refiner: Annotated[str | None, typer.Option(help="Refiner model (default: the base model).")] = None,
    refiner_steps: Annotated[int, typer.Option(min=1, help="Refiner steps actually run.")] = 10,
    upscale: Annotated[int, typer.Option(help="Real-ESRGAN: 1 (off), 2 or 4.")] = 4,
    image_format: Annotated[
        str, typer.Option("--format", help="webp, or jpeg (quality 95), png, avif")
    ] = "webp",
    strict_ssim: Annotated[
        bool, typer.Option(help="Shortlist only drafts that pass the SSIM gate (τ 0.75), however few.")
    ] = False,
    face_fix: Annotated[bool, typer.Option(help="Regenerate the faces found at low denoise.")] = True,
    instantid: Annotated[str | None, typer.Option(help="InstantID adapter (with --identitynet).")] = None,
    identitynet: Annotated[str | None, typer.Option(help="InstantID's IdentityNet ControlNet.")] = None,
    identity_scale: Annotated[float, typer.Option(help="InstantID scale (seed 000: 0.9-1.1).")] = 1.0,
    arcface: Annotated[
        Path | None, typer.Option(help="InsightFace-format ArcFace .onnx: InstantID's face embedding.")
    ] = None,
    tiny_decoder: Annotated[
        str | None,
        typer.Option(help="Decode the drafts with a tiny decoder: an AutoencoderTiny folder, or random."),
    ] = None,
) -> None:
    """Make portraits of the person in the selfies: N drafts, the best 15 by identity and quality,
    refined, face-fixed and upscaled, with report.json and a contact sheet of every draft."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from imagegenx.cli import _fail, _quiet_libraries, err, with_tiny_decoder
    from imagegenx.config import Settings
    from imagegenx.types import LoraRef, UserError

    _quiet_libraries()
    try:
        if lcm2 and steps is not None:
            raise UserError("--lcm2 runs 2 steps: leave --steps out")
        data = []
        for path in selfies:
            try:
                data.append((path.name, path.read_bytes()))
            except OSError as exc:
                raise UserError(f"cannot read selfie {path}: {exc.strerror}") from None
        loras = []
        for item in lora or []:
            name, _, weight = item.partition(":")
            try:
                loras.append(LoraRef(name.strip(), float(weight) if weight else 1.0))
            except ValueError:
                raise UserError(f"--lora {item!r}: expected NAME or NAME:WEIGHT") from None
        from imagegenx.engine.portrait import PortraitSpec, run_portrait

        spec = PortraitSpec(
            prompt=prompt,
            n=num,
            seed=random.randrange(2**32) if seed is None else seed,
            model=model,
            negative_prompt=negative,
            width=width,
            height=height,
            steps=4 if steps is None else steps,
            cfg=cfg,
            lcm2=lcm2,
            loras=tuple(loras),
            refiner=refiner,
            refiner_steps=refiner_steps,
            face_fix=face_fix,
            upscale=upscale,
            image_format=image_format,
            strict_ssim=strict_ssim,
            instantid=instantid,
            identitynet=identitynet,
            identity_scale=identity_scale,
            arcface=str(arcface) if arcface else None,
            draft_decoder="tiny" if tiny_decoder else "full",
        )
        from imagegenx.engine.engine import Engine

        bars = Progress(
            TextColumn("{task.description:>8}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
            disable=not err.is_terminal,
        )
        settings = Settings()
        settings = with_tiny_decoder(settings, model or settings.models.default_model, tiny_decoder)
        with Engine(settings) as engine, bars:
            bar = bars.add_task("selfies", total=len(data))

            def show(stage: str, done: int, total: int) -> None:
                bars.update(bar, description=stage, completed=done, total=max(total, 1))

            result = run_portrait(engine, data, spec, show)
        try:
            result.save(out)
        except OSError as exc:
            raise UserError(f"cannot write to --out {out}: {exc.strerror}") from None
    except UserError as exc:
        raise _fail(str(exc)) from None
    for warning in result.warnings:
        err.print(f"[yellow]note:[/yellow] {warning}", highlight=False)
    failed = [entry for entry in result.report["shortlist"] if "error" in entry]
    for entry in failed:
        err.print(f"[red]portrait {entry['position']} failed:[/red] {entry['error']}", highlight=False)
    written = len(result.report["shortlist"]) - len(failed)
    err.print(f"wrote {written} portrait(s), report.json and contact_sheet.webp to {out}", highlight=False)
    if failed:
        raise typer.Exit(1)
