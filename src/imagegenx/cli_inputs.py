"""Reading a command's inputs: LoRA and ControlNet specs, prompt files, image files. Each mistake
is a ``UserError`` naming the option and what was expected."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imagegenx.types import ControlRef, LoraRef, UserError


def parse_lora(text: str) -> LoraRef:
    name, _, weight = text.partition(":")
    try:
        return LoraRef(name.strip(), float(weight) if weight else 1.0)
    except ValueError:
        raise UserError(f"--lora {text!r}: expected NAME or NAME:WEIGHT") from None


def parse_control(text: str, depth_model: Path | None = None) -> ControlRef:
    """``TYPE,MODEL,IMAGE[,STRENGTH]`` → a ControlRef holding the finished control image."""
    import io

    from imagegenx.vision.controls import DEFAULT_STRENGTH, make_control_image

    parts = [part.strip() for part in text.split(",")]
    if len(parts) not in (3, 4):
        raise UserError(f"--control {text!r}: expected TYPE,MODEL,IMAGE[,STRENGTH]")
    kind, model, path = parts[:3]
    try:
        strength = float(parts[3]) if len(parts) == 4 else DEFAULT_STRENGTH.get(kind, 1.0)
    except ValueError:
        raise UserError(f"--control {text!r}: strength {parts[3]!r} is not a number") from None
    depth = str(depth_model) if depth_model else None
    image = make_control_image(kind, read_image(Path(path), f"--control image {path}"), depth_model=depth)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return ControlRef(model, buffer.getvalue(), strength)


def read_prompts(prompt: str | None, batch_file: Path | None) -> list[str]:
    prompts = [prompt] if prompt else []
    if batch_file is not None:
        try:
            lines = batch_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise UserError(f"cannot read --batch-file: {exc.strerror}: {batch_file}") from None
        prompts += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise UserError("give a PROMPT or --batch-file with one prompt per line")
    return prompts


def read_image(path: Path | None, what: str) -> Any:
    """A PIL image from a file, or a clear error."""
    data = read_bytes(path, what)
    if data is None:
        return None
    from imagegenx.pipelines.sample import decode_input_image

    return decode_input_image(data, what)


def read_bytes(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {what}: {exc.strerror}: {path}") from None
