"""torch.compile's work in one portable file (PyTorch's "Mega-Cache"), so other machines skip it.

Compiling an SDXL UNet and VAE for a few batch buckets takes minutes on an H200; Inductor's on-disk
cache (``ModelSettings.compile_cache_dir``) spares a restart on the same machine, but every new
machine or container starts from nothing. ``ModelSettings.compile_artifacts`` names a file: it is
loaded once per process before the first compile, and written when the engine has warmed up and
when it stops, holding what this process compiled and what it loaded (``torch.compiler``'s
``save_cache_artifacts`` / ``load_cache_artifacts``: Inductor, Triton, AOTAutograd and autotuning
results). Copy it to machines with the same GPU model, torch and Triton versions; elsewhere its
entries simply do not match and the compiles happen as usual.

Several processes may share the file. ``save_cache_artifacts`` holds what this process compiled
and what its compiles found in the caches, not everything it loaded, so the file keeps one entry
per process's save (a zip: the bytes and the artifact keys of each); a new save drops the entries
whose keys it covers and adds its own, then replaces the file atomically. A lost race between two
savers costs a compile later, never a job.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
import zipfile
from pathlib import Path

import torch

__all__ = ["load_compile_artifacts", "save_compile_artifacts"]

log = logging.getLogger(__name__)
_loaded: set[Path] = set()  # files this process has loaded (Inductor's caches are process-wide)
_lock = threading.Lock()
_KEYS = "keys.json"  # in the zip: entry name -> its artifact keys


def load_compile_artifacts(path: Path | None) -> int:
    """Load ``path``'s artifacts into this process's compile caches, once; returns how many it
    held (0: no file, already loaded, or unreadable: logged, the compiles then happen as usual)."""
    if path is None:
        return 0
    path = Path(path).expanduser()
    with _lock:
        if path in _loaded or not path.is_file():
            return 0
        _loaded.add(path)
        loaded = 0
        for name, (data, _) in _read(path).items():
            try:
                info = torch.compiler.load_cache_artifacts(data)
            except Exception as exc:  # another torch's entry: compile as if it were not there
                log.warning("ignoring compile artifacts %s in %s: %s", name, path, exc)
                continue
            loaded += sum(len(keys) for keys in info.artifacts.values()) if info is not None else 0
        return loaded


def save_compile_artifacts(path: Path | None) -> int:
    """Add this process's artifacts to ``path`` (dropping entries they cover); returns the bytes of
    this process's entry, 0 when there was nothing to write or the write failed (logged)."""
    if path is None:
        return 0
    path = Path(path).expanduser()
    with _lock:
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return 0
        data, info = saved
        keys = sorted(key for group in info.artifacts.values() for key in group)
        entries = {name: entry for name, entry in _read(path).items() if not set(entry[1]) <= set(keys)}
        entries[f"{hashlib.sha256(data).hexdigest()[:32]}.bin"] = (data, keys)
        draft = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(draft, "w") as archive:  # the artifacts are compressed already
                for name, (blob, _) in entries.items():
                    archive.writestr(name, blob)
                archive.writestr(_KEYS, json.dumps({name: k for name, (_, k) in entries.items()}))
            draft.replace(path)
        except OSError as exc:  # a full disk costs the next machine a compile, nothing more
            log.warning("could not write compile artifacts to %s: %s", path, exc)
            draft.unlink(missing_ok=True)
            return 0
    log.info("wrote %d bytes of compile artifacts to %s (%d entries)", len(data), path, len(entries))
    return len(data)


def _read(path: Path) -> dict[str, tuple[bytes, list[str]]]:
    """The file's entries: name -> (bytes, artifact keys); none when it is missing or damaged."""
    if not path.is_file():
        return {}
    try:
        with zipfile.ZipFile(io.BytesIO(path.read_bytes())) as archive:
            keys = json.loads(archive.read(_KEYS))
            return {name: (archive.read(name), list(keys[name])) for name in keys}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        log.warning("ignoring compile artifacts in %s: %s", path, exc)
        return {}
