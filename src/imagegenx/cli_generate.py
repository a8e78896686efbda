"""Running a `generate` command's jobs on one engine and writing the images (the CLI's side)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from imagegenx.types import UserError


def run_jobs(
    settings,
    jobs,
    out: Path,
    fmt,
    post,
    reference,
    shortlist: int,
    *,
    as_json: bool,
    embed_metadata: bool,
    console: Console,
) -> int:
    """Submit every job to one engine, post-process the finished images as one batch, write each
    with its .json metadata (and, with QC, qc.json: every image's scores best first, and the
    shortlist); returns the failure count."""
    from concurrent.futures import CancelledError

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from imagegenx.engine.engine import Engine, JobFailed
    from imagegenx.postprocess.chain import apply_chain
    from imagegenx.postprocess.encode import encode_image, image_metadata
    from imagegenx.types import JobStatus

    failed = 0
    total_steps = sum(job.steps for job in jobs)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=as_json or not console.is_terminal,
    )
    with Engine(settings) as engine, progress:
        bar = progress.add_task(f"{len(jobs)} image(s)", total=total_steps)
        steps_done = {job.job_id: 0 for job in jobs}

        def on_event(event) -> None:
            # Only the requested images count; post-processing passes have ids of their own.
            if event.job_id in steps_done and event.status in (JobStatus.RUNNING, JobStatus.SUCCEEDED):
                steps_done[event.job_id] = event.step
                progress.update(bar, completed=sum(steps_done.values()))

        engine.subscribe(on_event)
        futures = [engine.submit(job) for job in jobs]
        finished = []
        for index, future in enumerate(futures):
            try:
                finished.append((index, future.result()))
            except (JobFailed, CancelledError) as exc:
                failed += 1
                console.print(f"[red]image {index} failed:[/red] {exc}", highlight=False)
        if post.steps:
            progress.update(bar, description="post-processing")
        images = apply_chain([image for _, image in finished], post, engine, reference)
        written = []
        for (index, _), image in zip(finished, images, strict=True):
            if "error" in image.post:
                failed += 1
                console.print(f"[red]image {index} failed:[/red] {image.post['error']}", highlight=False)
                continue
            stem = out / f"{index:05d}-{image.job.seed}"
            path = stem.with_suffix(fmt.extension)
            meta = image_metadata(image) | {"file": path.name}
            try:
                path.write_bytes(encode_image(image, fmt, embed_metadata=embed_metadata))
                stem.with_suffix(".json").write_text(json.dumps(meta, indent=2))
            except OSError as exc:
                raise UserError(f"cannot write {path}: {exc.strerror}") from None
            written.append(meta)
            if as_json:
                typer.echo(json.dumps(meta | {"path": str(path)}))
        if post.qc:
            _write_qc_report(out / "qc.json", written, shortlist)
    if not as_json:
        console.print(f"wrote {len(jobs) - failed} image(s) to {out}")
    return failed


def _write_qc_report(path: Path, written: list[dict], shortlist: int) -> None:
    ranked = sorted(written, key=lambda m: (m["qc"]["rank"] is None, m["qc"]["rank"] or 0))
    report = {
        "shortlist": [m["file"] for m in ranked if m["qc"]["rank"] is not None][:shortlist],
        "images": [{"file": m["file"], "seed": m["seed"], **m["qc"]} for m in ranked],
    }
    try:
        path.write_text(json.dumps(report, indent=2))
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror}") from None
