"""``imagegenx api`` and ``imagegenx worker``: the two roles of a scaled-out installation.

An API node answers HTTP and never imports torch; a worker has no HTTP, leases jobs from the queue,
runs them on its engine and writes the results. Both reach the same task database, queue and blob
store (``IMAGEGENX_STORAGE__*``, ``IMAGEGENX_QUEUE__URL``). Registered by ``cli.py``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Annotated

import typer

from imagegenx.config import Settings
from imagegenx.types import UserError

log = logging.getLogger("imagegenx.worker")
RESTART_DELAY_S = 2.0  # a crashed GPU worker is started again after this pause


def api(
    host: Annotated[str | None, typer.Option(help="Address to listen on [default: 127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option(help="Port [default: 8000].")] = None,
) -> None:
    """Start an API node: HTTP only, no engine; tasks run on `imagegenx worker` processes."""
    import uvicorn

    from imagegenx.api import jsonlog
    from imagegenx.api.app import create_app
    from imagegenx.cli import _configure_tracing, _with

    settings = _with(Settings(), service={k: v for k, v in (("host", host), ("port", port)) if v is not None})
    jsonlog.configure()
    _configure_tracing()
    uvicorn.run(
        create_app(settings, run_worker=False),
        host=settings.service.host,
        port=settings.service.port,
        log_config=None,
    )


def worker(
    gpus: Annotated[
        str | None,
        typer.Option(
            help="'all': one worker process per visible CUDA GPU; '0,1': those GPUs; "
            "unset: one worker on the configured device (the CPU where there is no GPU)."
        ),
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Default model, loaded before the first lease.")
    ] = None,
    grace: Annotated[
        float, typer.Option(help="Seconds a stopping worker lets its jobs finish before giving them back.")
    ] = 30.0,
    owner: Annotated[
        str | None, typer.Option(hidden=True, help="Lease owner id (set for child workers).")
    ] = None,
    per_gpu: Annotated[
        int,
        typer.Option(
            min=1,
            max=8,
            help="Worker processes per GPU, each with its own copy of the model: two fill the time one "
            "host-bound worker leaves its GPU idle (small images, few steps).",
        ),
    ] = 1,
) -> None:
    """Start a worker: lease jobs from the queue, generate, store results; no HTTP. SIGTERM stops it
    gracefully (running jobs finish, or their leases are given back)."""
    from imagegenx.cli import _fail, _quiet_libraries, _with

    _quiet_libraries()
    try:
        devices = parse_gpus(gpus)
    except UserError as exc:
        raise _fail(str(exc)) from None
    if per_gpu > 1 and devices is None:
        raise _fail("--per-gpu needs --gpus (for one process per CPU worker, start several workers)")
    if devices is not None and (len(devices) > 1 or per_gpu > 1):
        args = ["--grace", str(grace)] + (["--model", model] if model else [])
        raise typer.Exit(supervise(devices, args, per_gpu))
    if devices:  # exactly one GPU: this process, before anything imports torch
        os.environ["CUDA_VISIBLE_DEVICES"] = devices[0]
        owner = owner or f"worker@{socket.gethostname()[:40]}/gpu{devices[0]}"
    settings = Settings()
    if devices:
        settings = _with(settings, models={"device": "cuda"})
    if model:
        settings = _with(settings, models={"default_model": model})
    try:
        run_worker(settings, owner=owner, grace_s=grace)
    except UserError as exc:
        raise _fail(str(exc)) from None


def parse_gpus(text: str | None) -> list[str] | None:
    """None: one worker on the configured device; otherwise the GPU ids to start a worker on each
    ('all' with no GPU visible: one CPU worker, so None)."""
    if text is None or not text.strip():
        return None
    if text.strip() == "all":
        return visible_gpus() or None
    ids = [part.strip() for part in text.split(",") if part.strip()]
    if not ids or not all(part.isdigit() for part in ids):
        raise UserError(f"--gpus takes 'all' or GPU numbers like '0,1', got {text!r}")
    if len(set(ids)) != len(ids):
        raise UserError(f"--gpus names a GPU twice: {text!r}")
    return ids


def visible_gpus() -> list[str]:
    """The CUDA GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (or their indices)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    named = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return named[:count] if named else [str(i) for i in range(count)]


def supervise(devices: list[str], args: list[str], per_gpu: int = 1) -> int:
    """``per_gpu`` child workers per GPU, each seeing only its GPU; SIGTERM/SIGINT reach every child,
    and a child that dies on its own (a crash, the OOM killer) starts again. Returns when all have
    stopped."""
    stopping = threading.Event()
    host = socket.gethostname()[:40]
    slots = [(device, k) for device in devices for k in range(per_gpu)]

    def spawn(slot: int) -> subprocess.Popen:
        device, k = slots[slot]
        owner = f"worker@{host}/gpu{device}" + (f".{k}" if per_gpu > 1 else "")
        cmd = [sys.executable, "-m", "imagegenx.cli", "worker", "--owner", owner, *args]
        env = child_env(slot) | {"CUDA_VISIBLE_DEVICES": device, "IMAGEGENX_MODELS__DEVICE": "cuda"}
        return subprocess.Popen(cmd, env=env)

    def forward(signum: int, _frame: object) -> None:
        stopping.set()
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signum)

    children = {slot: spawn(slot) for slot in range(len(slots))}
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while True:
        for slot, child in list(children.items()):
            code = child.poll()
            if code is not None and not stopping.is_set():
                device = slots[slot][0]
                print(f"worker on GPU {device} exited with {code}; starting it again", file=sys.stderr)
                time.sleep(RESTART_DELAY_S)
                children[slot] = spawn(slot)
        if stopping.is_set() and all(child.poll() is not None for child in children.values()):
            return max(child.returncode for child in children.values())
        time.sleep(0.5)


def child_env(slot: int) -> dict[str, str]:
    """The environment of the ``slot``-th child worker (0, 1, ...): this process's, with /metrics on
    ``metrics_port + slot`` when a metrics port is set (one port each: they would collide on one)."""
    metrics_port = Settings().service.metrics_port
    if not metrics_port:
        return dict(os.environ)
    return os.environ | {"IMAGEGENX_SERVICE__METRICS_PORT": str(metrics_port + slot)}


@contextlib.contextmanager
def child_workers(args: list[str], count: int = 1) -> Iterator[None]:
    """``count`` child ``imagegenx worker ARGS`` processes while the block runs (``serve
    --worker-processes``): each started again if it dies on its own, all stopped gracefully (SIGTERM:
    they drain) when the block ends. Several on one GPU fill the time one leaves it idle while its
    host side (prompts, results, the database) runs: each has its own interpreter lock."""
    stopping = threading.Event()
    cmd = [sys.executable, "-m", "imagegenx.cli", "worker", *args]

    def spawn(slot: int) -> subprocess.Popen:
        return subprocess.Popen(cmd, env=child_env(slot), preexec_fn=_die_with_parent)

    children = [spawn(slot) for slot in range(count)]

    def watch() -> None:
        while not stopping.wait(0.5):
            for i, child in enumerate(children):
                if child.poll() is not None:
                    print(f"worker exited with {child.returncode}; starting it again", file=sys.stderr)
                    if stopping.wait(RESTART_DELAY_S):  # not when the server is stopping meanwhile
                        return
                    # Its parent-death signal follows this thread, which lives until the server stops.
                    children[i] = spawn(i)

    watcher = threading.Thread(target=watch, name="imagegenx-worker-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stopping.set()
        watcher.join()
        for child in children:
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()


def _die_with_parent() -> None:
    """In the child before exec: Linux sends it SIGTERM if the parent dies (even by kill -9), so no
    orphaned worker keeps leasing jobs; elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def apply_gil_switch_interval(settings: Settings) -> None:
    """This process's GIL switch interval, as ``EngineSettings.gil_switch_interval_ms`` says."""
    if settings.engine.gil_switch_interval_ms > 0:
        sys.setswitchinterval(settings.engine.gil_switch_interval_ms / 1000)


def run_worker(settings: Settings, *, owner: str | None = None, grace_s: float = 30.0) -> None:
    """One worker in this process until SIGTERM or SIGINT; then it drains (see ServiceWorker.drain)."""
    from imagegenx.api import jsonlog
    from imagegenx.api.app import build_service, warm_up_engine
    from imagegenx.engine.engine import Engine
    from imagegenx.engine.worker import ServiceWorker
    from imagegenx.models.sources import resolve

    jsonlog.configure()
    apply_gil_switch_interval(settings)
    resolve(settings.models.default_model, settings.models)  # an unknown model fails now, clearly
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    service = build_service(settings)
    engine = Engine(settings)
    owner = owner or f"worker@{socket.gethostname()[:40]}/pid{os.getpid()}"
    job_worker = ServiceWorker(service, engine, owner=owner)
    if settings.service.metrics_port:  # Prometheus scrapes workers here: they have no other HTTP
        from prometheus_client import start_http_server

        start_http_server(settings.service.metrics_port, registry=engine.metrics.registry)
    try:
        warm_up_engine(engine, settings)  # the default model is resident before the first lease
        job_worker.start()
        print(f"worker {owner} ready ({settings.models.default_model})", flush=True)
        while not stop.wait(1.0):
            pass
        given_back = job_worker.drain(grace_s)
        print(f"worker {owner} stopped; {len(given_back)} job(s) given back", flush=True)
    finally:
        engine.close()
        service.close()
