"""Read a ``.safetensors`` file's tensors straight into device memory, fast (models/fastload.py uses it).

On CUDA: large ``pread`` calls on several threads, each reading one contiguous part of the file
through its own descriptor (the GIL is released while the disk works), into pinned staging buffers
copied asynchronously into each tensor's own device allocation; optionally with ``O_DIRECT``. On the
CPU: safetensors' copy-on-write mapping of the file, as diffusers has it. Floating tensors are cast
to the target dtype on the device.
"""

from __future__ import annotations

import contextlib
import os
import queue
import struct
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from imagegenx.models.sources import read_safetensors_header

CHUNK_BYTES = 64 << 20  # one pread and one host-to-device copy; large enough for full disk speed
READ_THREADS = min(8, os.cpu_count() or 1)
PAGE = 4096  # O_DIRECT alignment of offsets, sizes and buffers

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class FastLoadUnsupported(Exception):
    """The fast path does not handle this checkpoint; the message says why."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype | None  # None: a dtype this reader does not know (an error only if it is read)
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def tensor_table(path: Path) -> list[TensorSpec]:
    """The file's tensors in file order, with absolute byte ranges."""
    with path.open("rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
    data_start = 8 + header_size
    specs = []
    for name, info in read_safetensors_header(path).items():
        begin, end = info["data_offsets"]
        dtype = _DTYPES.get(info.get("dtype", ""))
        specs.append(TensorSpec(name, dtype, tuple(info["shape"]), data_start + begin, data_start + end))
    return sorted(specs, key=lambda s: s.start)


class Staging:
    """Host buffers, each with its CUDA stream, shared by the reader threads of one load.

    On CUDA the buffers are pinned (made once per load: pinning is slow) and copied asynchronously;
    on the CPU (tests) the same path runs with plain buffers and synchronous copies. Buffers are
    page-aligned with a page to spare at each end, as ``O_DIRECT`` reads need.
    """

    def __init__(
        self, device: torch.device, count: int, chunk_bytes: int = CHUNK_BYTES, direct: bool = False
    ):
        self.chunk_bytes = chunk_bytes
        self.direct = direct
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        self.streams = []
        cuda = device.type == "cuda"
        for _ in range(count):
            base = torch.empty(chunk_bytes + 3 * PAGE, dtype=torch.uint8, pin_memory=cuda)
            skip = -base.data_ptr() % PAGE
            stream = torch.cuda.Stream(device) if cuda else None
            if stream is not None:
                self.streams.append(stream)
            self.free.put((base[skip : skip + chunk_bytes + 2 * PAGE], stream))

    def synchronize(self) -> None:
        for stream in self.streams:
            stream.synchronize()


def read_tensors(
    path: Path,
    specs: Iterable[TensorSpec],
    device: torch.device,
    dtype: torch.dtype,
    threads: int = 0,
    staging: Staging | None = None,
) -> dict[str, torch.Tensor]:
    """Read ``specs`` from ``path`` into tensors on ``device``; floating ones cast to ``dtype`` there.

    Each thread reads one contiguous part of the file, in order, through its own file descriptor
    (so the kernel's read-ahead sees a sequential reader per descriptor, not interleaved chunks).
    On CUDA, or when ``staging`` is given, the bytes go through the staging buffers; else (CPU) the
    tensors map the file.
    """
    specs = sorted(specs, key=lambda s: s.start)
    unknown = [s.name for s in specs if s.dtype is None]
    if unknown:
        raise FastLoadUnsupported(f"tensors of a dtype the fast reader does not know, e.g. {unknown[:3]}")
    if device.type == "cpu" and staging is None:
        # A private (copy-on-write) mapping of the file, as diffusers' own CPU path has: pages come
        # in from the page cache on first use; copying them into fresh memory only costs more.
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            loaded = {spec.name: f.get_tensor(spec.name) for spec in specs}
        return {name: _cast(tensor, dtype) for name, tensor in loaded.items()}
    threads = threads or READ_THREADS
    # One allocation per tensor (not views of one big buffer), so evicting one component frees its memory.
    raw = {s.name: torch.empty(s.nbytes, dtype=torch.uint8, device=device) for s in specs}
    staging = staging or Staging(device, threads)
    parts = _parts(_chunks(specs, staging.chunk_bytes), threads)
    _in_threads(path, parts, _staged_reader(raw, staging), staging.direct)
    staging.synchronize()
    return {
        spec.name: _cast(raw.pop(spec.name).view(spec.dtype).reshape(spec.shape), dtype) for spec in specs
    }


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() and tensor.dtype != dtype else tensor


def _parts(items: list, count: int) -> list[list]:
    """``items`` (tensors or chunks, in file order) cut into ``count`` runs of about equal bytes."""
    total = sum(item.nbytes for item in items) or 1
    parts: list[list] = [[] for _ in range(count)]
    seen = 0
    for item in items:
        parts[min(count - 1, seen * count // total)].append(item)
        seen += item.nbytes
    return [part for part in parts if part]


def _in_threads(path: Path, parts: list[list], read: Any, direct: bool) -> None:
    """``read(fd, item)`` for every item; one thread and one file descriptor per part.

    ``direct``: open with ``O_DIRECT`` (the disk straight into the buffers, no page cache); where
    the file system refuses it, the reads go through the page cache.
    """

    def run(part: list) -> None:
        fd = _open(path, direct)
        try:
            if hasattr(os, "posix_fadvise"):  # a larger read-ahead window
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            for item in part:
                read(fd, item)
        finally:
            os.close(fd)

    with ThreadPoolExecutor(max(1, len(parts)), thread_name_prefix="fastload") as pool:
        list(pool.map(run, parts))


def _open(path: Path, direct: bool) -> int:
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError:  # tmpfs and some others refuse O_DIRECT
            pass
    return os.open(path, os.O_RDONLY)


def _pread_full(fd: int, buffer: memoryview, offset: int, need: int | None = None) -> None:
    """Fill ``buffer`` from ``offset``; with ``need``, a shorter read that ends the file is enough
    once ``need`` bytes are in (aligned ``O_DIRECT`` reads may ask for bytes past the end)."""
    need = len(buffer) if need is None else need
    done = 0
    while done < need:
        n = os.preadv(fd, [buffer[done:]], offset + done)
        if n <= 0:
            raise FastLoadUnsupported(f"file ends before byte {offset + need} (truncated?)")
        done += n


@dataclass(frozen=True)
class _Chunk:
    start: int  # file offset
    nbytes: int
    pieces: tuple[tuple[str, int, int, int], ...]  # (tensor, offset in chunk, offset in tensor, bytes)


def _chunks(specs: list[TensorSpec], chunk_bytes: int) -> list[_Chunk]:
    """Cut the byte ranges of ``specs`` (merged where adjacent) into chunks of at most ``chunk_bytes``."""
    chunks: list[_Chunk] = []
    start, pieces, end = -1, [], -1

    def close() -> None:
        if pieces:
            chunks.append(_Chunk(start, end - start, tuple(pieces)))

    for spec in specs:
        done = 0
        while done < spec.nbytes:
            here = spec.start + done
            if here != end or end - start >= chunk_bytes:  # a gap in the file or a full chunk
                close()
                start, pieces, end = here, [], here
            n = min(spec.nbytes - done, chunk_bytes - (end - start))
            pieces.append((spec.name, here - start, done, n))
            done += n
            end = here + n
    close()
    return chunks


def _staged_reader(raw: dict[str, torch.Tensor], staging: Staging) -> Any:
    """CUDA target: a chunk is pread into a free pinned buffer, then copied to its tensors on that
    buffer's stream; the buffer is reused once that copy is done."""

    def read(fd: int, chunk: _Chunk) -> None:
        buffer, stream = staging.free.get()
        try:
            if stream is not None:
                stream.synchronize()  # the buffer's previous copy is done before it is overwritten
            # The read starts and ends on page boundaries (for O_DIRECT; harmless otherwise).
            front = chunk.start % PAGE
            size = -(-(front + chunk.nbytes) // PAGE) * PAGE
            _pread_full(fd, memoryview(buffer.numpy())[:size], chunk.start - front, front + chunk.nbytes)
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                for name, at, offset, n in chunk.pieces:
                    source = buffer[front + at : front + at + n]
                    raw[name][offset : offset + n].copy_(source, non_blocking=stream is not None)
        finally:
            staging.free.put((buffer, stream))

    return read
