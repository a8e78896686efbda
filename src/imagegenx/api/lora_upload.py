"""Accepting an uploaded LoRA: only real .safetensors bytes, under a name the server chooses."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import struct
from pathlib import Path

from imagegenx.types import UserError

_SAFE = re.compile(r"[^A-Za-z0-9_-]+")


def check_safetensors(data: bytes) -> dict:
    """Parse the header from the bytes themselves; anything else (pickles, zips, text) is refused."""
    if len(data) < 8:
        raise UserError("not a .safetensors file (too short)")
    (size,) = struct.unpack("<Q", data[:8])
    if size <= 1 or 8 + size > len(data):
        raise UserError(
            "not a .safetensors file (bad header length); pickled .ckpt/.pt/.bin files are refused"
        )
    try:
        header = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError("not a .safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise UserError("not a .safetensors file (header is not a table)")
    body = len(data) - 8 - size
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if not tensors:
        raise UserError("the file holds no tensors")
    for name, info in tensors.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and 0 <= offsets[0] <= offsets[1] <= body):
            raise UserError(f"not a valid .safetensors file (tensor {name!r} points outside the file)")
    return header


def save_lora(folder: Path, filename: str, data: bytes) -> str:
    """Write the LoRA as ``<clean stem>-<hash>.safetensors`` in ``folder``; returns the LoRA's name."""
    check_safetensors(data)
    stem = _SAFE.sub("-", Path(filename.replace("\\", "/")).name.rsplit(".", 1)[0]).strip("-")[:48] or "lora"
    name = f"{stem}-{hashlib.sha256(data).hexdigest()[:10]}"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name}.safetensors"
    if target.is_file() and not target.is_symlink():
        return name  # the same bytes under the same name: already there
    # A random temporary name, opened O_EXCL | O_NOFOLLOW, then renamed over the target: nothing is
    # ever written through a symlink, and a symlink planted at the target is replaced, not followed.
    tmp = folder / f".{name}.{secrets.token_hex(8)}.upload"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o640)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return name
