"""Prometheus metrics of one engine, in a registry of its own (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
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
        self.registry.register(_LoadCollector(models))


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
