"""Prometheus metrics of one engine, in a registry of its own (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from imagegenx.models.cache import ModelCache


class EngineMetrics:
    def __init__(self, models: ModelCache) -> None:
        self.registry = CollectorRegistry()
        self.images = Counter(
            "imagegenx_images",
            "Images finished, by model and outcome",
            ["model", "status"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "imagegenx_unet_batch_images",
            "Images per UNet call",
            buckets=(1, 2, 4, 8, 16, 32),
            registry=self.registry,
        )
        self.step_seconds = Histogram(
            "imagegenx_step_seconds", "Seconds per denoising step of a batch", registry=self.registry
        )
        self.waiting = Gauge("imagegenx_jobs_waiting", "Jobs waiting for a batch", registry=self.registry)
        self.oom_splits = Counter(
            "imagegenx_oom_splits", "Batches split after running out of device memory", registry=self.registry
        )
        self.generation_seconds = Histogram(
            "imagegenx_generation_seconds",
            "Seconds from submission to a finished image, by model and resolution",
            ["model", "resolution"],
            buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        # For the dashboard: LoRA usage, and failures by a bounded reason label (see failure_reason)
        self.lora_images = Counter(
            "imagegenx_lora_images",
            "Finished images that used a LoRA, by LoRA name",
            ["lora"],
            registry=self.registry,
        )
        self.failures = Counter(
            "imagegenx_failures", "Jobs failed in the engine, by reason", ["reason"], registry=self.registry
        )
        self.registry.register(_LoadCollector(models))
        self.registry.register(_DeviceMemoryCollector())


def failure_reason(message: str) -> str:
    """A label for a failure message, which is free text: out_of_memory, non_finite, internal or invalid."""
    if message.startswith("out of device memory"):
        return "out_of_memory"
    if "NaN/infinite" in message:
        return "non_finite"
    if message.startswith("internal error"):
        return "internal"
    return "invalid"  # the rest are UserErrors: unknown model or LoRA, unsupported combination, bad image


class _LoadCollector(Collector):
    """Model and LoRA loads, read from the model cache at scrape time."""

    def __init__(self, models: ModelCache) -> None:
        self.models = models

    def collect(self):
        loads = CounterMetricFamily("imagegenx_model_loads", "Base model loads", labels=["model"])
        for ref, count in self.models.loads.items():
            loads.add_metric([ref], count)
        yield loads
        lora = CounterMetricFamily("imagegenx_lora_loads", "LoRA files read, by base model", labels=["model"])
        for ref, count in self.models.lora_loads().items():
            lora.add_metric([ref], count)
        yield lora


class _DeviceMemoryCollector(Collector):
    """VRAM in use and reserved by this process (0 without a GPU), read at scrape time."""

    def collect(self):
        import torch

        in_use = GaugeMetricFamily("imagegenx_vram_used_bytes", "GPU memory allocated by tensors")
        reserved = GaugeMetricFamily("imagegenx_vram_reserved_bytes", "GPU memory held by the allocator")
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        in_use.add_metric([], float(torch.cuda.memory_allocated()) if cuda else 0.0)
        reserved.add_metric([], float(torch.cuda.memory_reserved()) if cuda else 0.0)
        yield in_use
        yield reserved
