"""Leasing: take as many tasks from the queue as the engine can start soon, and turn each into a job.

A lease whose task needs no run is settled at once (already final, too many deliveries, cancelled);
a portrait goes to ``engine.portrait_runner``; every other task's inputs are read from the blob
store and submitted to the engine, and the job is held in flight until its future is done.
"""

from __future__ import annotations

from dataclasses import replace

from opentelemetry import trace

from imagegenx.engine.engine import Engine
from imagegenx.engine.held_tasks import HeldTasks, InFlight
from imagegenx.engine.portrait_runner import PortraitRunner
from imagegenx.engine.service import Service, input_key, job_from_params
from imagegenx.queue.base import Lease
from imagegenx.types import TaskRecord, UserError, default_sampler

__all__ = ["Intake"]

tracer = trace.get_tracer("imagegenx.worker")  # a no-op unless an exporter is configured


class Intake:
    def __init__(
        self,
        service: Service,
        engine: Engine,
        held: HeldTasks,
        portraits: PortraitRunner,
        *,
        capacity: int,
        lease_s: float,
        storing_allowance: int = 0,
    ) -> None:
        self.service = service
        self.engine = engine
        self._held = held
        self._portraits = portraits
        self.capacity = capacity
        self.lease_s = lease_s
        self.storing_allowance = storing_allowance

    def lease_more(self) -> None:
        """Lease up to the free capacity, reading the leased tasks' rows in one query.

        Up to ``storing_allowance`` tasks being stored do not count: while a finished batch is
        encoded and written, the engine must still hold a running batch and the next one. Counted,
        a 32-image group storing leaves the engine one batch and nothing queued behind it, so the GPU
        waits for each group's encodes: the likely cause of the H200's HTTP runs completing ~50
        tasks/s with an engine that does 74-102 alone (BENCHMARKS.md, fifth session)."""
        held = self._held
        free = self.capacity - len(held.in_flight) - max(0, len(held.storing) - self.storing_allowance)
        if free <= 0:
            return
        leases = self.service.queue.lease(held.owner, free, self.lease_s)
        records = {r.task_id: r for r in self.service.store.get_many([lease.task_id for lease in leases])}
        for lease in leases:
            self._begin(lease, records.get(lease.task_id))

    def _begin(self, lease: Lease, record: TaskRecord | None) -> None:
        service, held, task_id = self.service, self._held, lease.task_id
        if record is None or record.status.final:
            service.queue.ack(held.owner, task_id)
            return
        if lease.delivery > service.settings.service.max_deliveries:
            service.store.fail(task_id, f"gave up after {lease.delivery - 1} attempts that did not finish")
            held.finish(task_id)
            return
        if record.cancel_requested:
            service.store.mark_canceled(task_id)
            held.finish(task_id)
            return
        if record.task_type == "portrait":
            self._portraits.begin(record)
            return
        # The attempt counts real starts (the engine's first step), not leases.
        job = InFlight(lease, attempt=record.attempts + 1, span=tracer.start_span("inference"))
        job.span.set_attributes(
            {"task_id": task_id, "model": record.model, "resolution": f"{record.width}x{record.height}"}
        )
        held.in_flight[task_id] = job  # before submit: the engine may report the first step at once
        try:
            image = service.blobs.get(input_key(task_id, "image")) if record.task_type != "text2img" else None
            mask = service.blobs.get(input_key(task_id, "mask")) if record.task_type == "inpaint" else None
            controls = [
                service.blobs.get(input_key(task_id, f"control{index}"))
                for index in range(len(record.params.get("controls", [])))
            ]
            spec = job_from_params(task_id, record.params, image, mask, controls)
            if "scheduler" not in record.params:  # the request named no sampler: the model's own
                spec = replace(spec, scheduler=default_sampler(self.engine.models.source(spec.model).family))
            job.future = self.engine.submit(spec)
        except (UserError, KeyError) as exc:
            held.in_flight.pop(task_id, None)
            service.store.fail(task_id, str(exc))
            held.finish(task_id)
            return
        job.future.add_done_callback(lambda _f, task_id=task_id: held.done.put(task_id))
