"""Copies between the host and the device that do not wait for the device.

A plain ``.cpu()`` waits for every kernel queued so far; the engine thread would then sit idle while
the device finishes, and the device idle while the thread prepares the next launch. With a
``HostCopy`` (a non-blocking copy into pinned memory and a CUDA event, queued behind the kernels that
compute the result) the thread queues the next batch's work first and asks for the copy afterwards.
The other way, ``to_device`` copies host tensors (the starting noise, drawn on the CPU for seeds that
give the same image on any device) from pinned memory: a pageable copy waits like ``.cpu()`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; from the CPU to a GPU queued behind the kernels already there, not
    waiting for them (the pinned buffer is kept until the copy has run: PyTorch's host allocator
    records it)."""
    if tensor.is_cuda or device.type != "cuda":
        return tensor.to(device)
    # contiguous first: a broadcast view (a run's timestep expanded to its rows) cannot be pinned
    return tensor.contiguous().pin_memory().to(device, non_blocking=True)


class HostCopy:
    """``tensor`` on its way to the host (done at once where it is on the CPU already)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._event: torch.cuda.Event | None = None
        if tensor.is_cuda:
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor.contiguous(), non_blocking=True)
            self._event = torch.cuda.Event()
            # The device tensor may be freed now: its stream reuses the memory only after the copy.
            self._event.record(torch.cuda.current_stream(tensor.device))
        else:
            self._host = tensor.cpu()

    def done(self) -> bool:
        """Whether the copy has completed (asks the event, never waits)."""
        return self._event is None or self._event.query()

    def wait(self) -> torch.Tensor:
        """The host tensor, once the copy has completed."""
        if self._event is not None:
            self._event.synchronize()
        return self._host


@dataclass
class PendingImages:
    """A decoded batch on its way to the host: HxWx3 images and whether each came out finite."""

    images: HostCopy
    finite: HostCopy

    def result(self) -> list[np.ndarray | None]:
        """The images (``None`` for one whose values were not finite), waiting for the copy."""
        images = self.images.wait().numpy()
        finite = self.finite.wait().tolist()
        return [image if ok else None for image, ok in zip(images, finite, strict=True)]
