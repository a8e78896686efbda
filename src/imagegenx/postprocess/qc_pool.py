"""QC of many images on every core, while whatever makes them is still running (portrait drafts).

``postprocess.qc.score_batch`` scores a batch on one thread: a 1024² draft takes about 0.4-1 s of CPU,
most of it in dlib (HOG face detection and the ResNet identity embedding), then SSIM and sharpness.
:class:`QcPool` spreads that over a process pool (spawn context; dlib's Python bindings hold the GIL,
and a process never slows the engine's own thread that feeds the GPU). Each worker loads the face
models once, in its initializer, while the GPU is still making the first drafts; it imports no torch.

Images arrive one by one (``add(index, pixels)``, in any order) and each goes to a worker at once.
The NSFW model stays in this process on one background thread (onnxruntime releases the GIL): the
workers send back its 224² input, and it runs in the batches :meth:`NsfwClassifier.probability` would
use (consecutive runs of ``batch_size`` images in index order, failed images skipped), because an
ONNX batch of another size can round the last bits differently. So the scores are bit-for-bit those
of ``qc_batch`` over the same images, whatever the order of arrival and the number of workers.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from typing import Any

import numpy as np

from imagegenx.vision.identity import DlibIdentity
from imagegenx.vision.nsfw import NsfwClassifier, preprocess
from imagegenx.vision.quality import ImageScorer, QcScores

__all__ = ["QcPool", "default_workers"]


def default_workers() -> int:
    """Worker processes for QC: every core this process may use but one, which stays with the
    engine's loop (a starved loop starves the GPU)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores - 1)


# One worker process's scorer, built by ``_start`` (a process scores for one pool only).
_worker: dict[str, Any] = {}


def _start(
    reference: np.ndarray | None,
    reference_embedding: np.ndarray | None,
    face_options: tuple[int, float, int],
    brisque: bool,
) -> None:
    import cv2

    from imagegenx.vision.identity import _dlib_models

    cv2.setNumThreads(1)  # a worker is one core: OpenCV's own threads would oversubscribe the pool
    faces = DlibIdentity(*face_options)
    identity = faces if reference_embedding is not None else None
    _worker["score"] = ImageScorer(reference, reference_embedding, identity, brisque=brisque)
    if identity is not None:
        _dlib_models()  # load the models now, while the GPU makes the first drafts


def _ping() -> int:
    return os.getpid()


def _score(pixels: np.ndarray, nsfw: bool) -> tuple[QcScores, np.ndarray | None, float]:
    """One image's scores (NSFW left out), its NSFW model input and the seconds it took."""
    started = time.perf_counter()
    scores = _worker["score"](pixels)
    return scores, preprocess(pixels) if nsfw else None, time.perf_counter() - started


class QcPool:
    """``add`` images as they come, then ``scores()`` for all of them; see the module's docstring.

    ``identity`` gives the face backend's settings (upsample, threshold, jitter); it is used, as in
    ``qc_batch``, only with a ``reference_embedding``. ``nsfw`` None skips the NSFW check.
    """

    def __init__(
        self,
        *,
        reference: np.ndarray | None,
        reference_embedding: np.ndarray | None,
        identity: DlibIdentity,
        nsfw: NsfwClassifier | None,
        brisque: bool = False,
        workers: int | None = None,
    ) -> None:
        self.workers = workers or default_workers()
        options = (identity.upsample, identity.threshold, identity.jitter)
        self._procs = ProcessPoolExecutor(
            self.workers,
            mp_context=get_context("spawn"),
            initializer=_start,
            initargs=(reference, reference_embedding, options, brisque),
        )
        self._nsfw = nsfw
        self._nsfw_thread = ThreadPoolExecutor(1, thread_name_prefix="qc-nsfw")
        self._lock = threading.RLock()  # add_done_callback may call back at once, inside add()
        self._scored: dict[int, Future | None] = {}  # index → its worker's future (None: no image)
        self._next = 0  # indices below are placed in the NSFW batches
        self._open: list[int] = []  # the NSFW batch being filled
        self._closed: list[list[int]] = []  # full NSFW batches waiting for their inputs
        self._batches: list[tuple[list[int], Future]] = []
        self._finished = False
        # Start every worker now (a spawn pool starts one per submit that finds none idle).
        for _ in range(self.workers):
            self._procs.submit(_ping)

    def __enter__(self) -> QcPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers; queued work is dropped (the caller gave up, or everything is scored)."""
        self._procs.shutdown(wait=True, cancel_futures=True)
        self._nsfw_thread.shutdown(wait=True, cancel_futures=True)

    def add(self, index: int, pixels: np.ndarray | None) -> None:
        """Image ``index`` (RGB uint8 HxWx3), or None for one that does not exist (a failed draft):
        every index from 0 up must come exactly once before :meth:`scores`."""
        with self._lock:
            if self._finished or index in self._scored or index < 0:
                raise ValueError(f"image {index} was already added, or scores() was called")
            job = None
            if pixels is not None:
                job = self._procs.submit(_score, np.ascontiguousarray(pixels), self._nsfw is not None)
                job.add_done_callback(lambda _: self._advance())
            self._scored[index] = job
        self._advance()

    def scores(self) -> tuple[list[QcScores], float]:
        """The scores of every image given, in index order (None entries left out), and the mean
        seconds a worker spent on one image; raises what a worker raised."""
        with self._lock:
            self._finished = True
            if set(self._scored) != set(range(len(self._scored))):
                raise ValueError(f"images missing: got {len(self._scored)} indices, not 0..n-1")
        jobs = [job for _, job in sorted(self._scored.items()) if job is not None]
        done = [job.result() for job in jobs]
        self._advance()
        probs: dict[int, float] = {}
        for members, batch in self._batches:
            probs.update(zip(members, batch.result(), strict=True))
        order = [i for i, job in sorted(self._scored.items()) if job is not None]
        scores = [replace(s, nsfw=probs.get(i)) for i, (s, _, _) in zip(order, done, strict=True)]
        seconds = sum(s for _, _, s in done) / len(done) if done else 0.0
        return scores, seconds

    def _ready(self, index: int) -> bool:
        job = self._scored[index]
        return job is not None and job.done() and not job.cancelled() and job.exception() is None

    def _advance(self) -> None:
        """Form the NSFW batches in index order and run each one whose inputs are all back."""
        if self._nsfw is None:
            return
        with self._lock:
            while self._next in self._scored:
                if self._scored[self._next] is not None:
                    self._open.append(self._next)
                self._next += 1
                if len(self._open) == self._nsfw.batch_size:
                    self._closed.append(self._open)
                    self._open = []
            if self._finished and self._open and self._next == len(self._scored):
                self._closed.append(self._open)
                self._open = []
            while self._closed and all(self._ready(i) for i in self._closed[0]):
                members = self._closed.pop(0)
                inputs = np.stack([self._scored[i].result()[1] for i in members])  # type: ignore[union-attr]
                self._batches.append((members, self._nsfw_thread.submit(self._nsfw.run, inputs)))
