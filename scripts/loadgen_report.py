"""scripts/loadgen.py's report: latency statistics, the summary of a run, the engines' own figures
(from their Prometheus pages), whether the client kept its schedule, and the printed table."""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loadgen import Request

FINAL = ("succeeded", "failed", "canceled", "expired")
REJECTED = (429, 503)
LAG_LIMIT_S = 0.1  # a p99 send lag above this: the client, not the server, set the pace
CLIENT_CORE_LIMIT = 0.8  # of the client's one core


def percentile(values: list[float], p: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = p / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _stats(values: list[float]) -> dict:
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values) if values else None,
        "mean": sum(values) / len(values) if values else None,
    }


# Engine metrics (engine/metrics.py) read from each worker's /metrics before and after the schedule.
ENGINE_SERIES = {
    "images": "imagegenx_images_total",
    "unet_batches": "imagegenx_unet_batch_images_count",
    "unet_images": "imagegenx_unet_batch_images_sum",
    "steps": "imagegenx_step_seconds_count",
    "step_seconds": "imagegenx_step_seconds_sum",
    "generations": "imagegenx_generation_seconds_count",
    "generation_seconds": "imagegenx_generation_seconds_sum",
}


def engine_counts(text: str) -> dict[str, float]:
    """The engine's counters in a Prometheus text page, summed over their labels."""
    from prometheus_client.parser import text_string_to_metric_families

    names = {series: key for key, series in ENGINE_SERIES.items()}
    counts = dict.fromkeys(ENGINE_SERIES, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in names and sample.labels.get("status", "succeeded") == "succeeded":
                counts[names[sample.name]] += sample.value
    return counts


def engine_summary(url: str, before: dict[str, float], after: dict[str, float]) -> dict:
    """What one engine did during the schedule: images, UNet batches and their mean size, seconds
    per denoising step of a batch, and seconds from submission to a finished image."""
    d = {key: after[key] - before[key] for key in ENGINE_SERIES}
    return {
        "url": url,
        "images": d["images"],
        "unet_batches": d["unet_batches"],
        "mean_unet_batch_images": d["unet_images"] / d["unet_batches"] if d["unet_batches"] else None,
        "mean_step_s": d["step_seconds"] / d["steps"] if d["steps"] else None,
        "mean_generation_s": d["generation_seconds"] / d["generations"] if d["generations"] else None,
    }


def summarize(requests: list[Request], args: argparse.Namespace, drained: float) -> dict:
    warmup = args.warmup
    window = max(args.duration - warmup, 1e-9)
    in_window = [r for r in requests if r.scheduled >= warmup]
    succeeded_in_window = [
        r for r in requests if r.status == "succeeded" and warmup <= r.done <= args.duration
    ]
    statuses = Counter(r.status for r in requests if r.task_id is not None)
    http = Counter(str(r.http_status) for r in requests if r.http_status is not None)
    rejected = sum(n for code, n in http.items() if int(code) in REJECTED)
    other_errors = {code: n for code, n in http.items() if int(code) != 200 and int(code) not in REJECTED}
    transport = Counter(r.error for r in requests if r.error)
    lat = [r.latency for r in in_window if r.latency is not None]
    lat_all = [r.latency for r in requests if r.latency is not None]
    lag = [r.sent - r.scheduled for r in requests if r.sent is not None]
    submit_rtt = [r.answered - r.sent for r in requests if r.answered is not None and r.sent is not None]
    done_times = [r.done for r in requests if r.status == "succeeded"]
    detection = [r.done - r.server_done for r in requests if r.server_done is not None]
    buckets = []  # by scheduled time: does latency stay flat (sustained) or grow (overloaded)?
    for start in range(0, math.ceil(args.duration), args.bucket):
        end = min(start + args.bucket, args.duration)
        lats = [r.latency for r in requests if start <= r.scheduled < end and r.latency is not None]
        finished = sum(1 for t in done_times if start <= t < end)
        buckets.append(
            {"start_s": start, "end_s": end, "completed_per_s": finished / (end - start), **_stats(lats)}
        )
    return {
        "offered": {
            "rate_per_s": args.rate,
            "duration_s": args.duration,
            "arrivals": args.arrivals,
            "requests": len(requests),
            "actual_rate_per_s": len(requests) / args.duration,
        },
        "window": {
            "start_s": warmup,
            "end_s": args.duration,
            "scheduled": len(in_window),
            "succeeded_in_window": len(succeeded_in_window),
            "completed_per_s": len(succeeded_in_window) / window,
        },
        "submitted": sum(1 for r in requests if r.sent is not None),
        "accepted": sum(1 for r in requests if r.task_id is not None),
        "rejected": rejected,
        "http_status": dict(sorted(http.items())),
        "http_errors": other_errors,
        "transport_errors": dict(transport),
        "final_status": {s: statuses.get(s, 0) for s in (*FINAL, "unfinished")},
        "latency_s": _stats(lat),
        "latency_all_s": _stats(lat_all),
        "client_lag_s": _stats(lag),
        "submit_rtt_s": _stats(submit_rtt),
        "detection_delay_s": _stats(detection),
        "succeeded_total": len(done_times),
        "last_success_s": max(done_times) if done_times else None,
        "drain_s": drained,
        "buckets": buckets,
    }


def client_fell_behind(summary: dict, cpu: dict | None) -> str | None:
    """Why the figures may measure this client rather than the server, or None. Sends more than
    ``LAG_LIMIT_S`` late (p99), or the client's one event-loop thread busy past ``CLIENT_CORE_LIMIT``
    of a core, mean the schedule was not kept: the server saw less than the offered load, later."""
    lag = summary["client_lag_s"]["p99"]
    if lag is not None and lag > LAG_LIMIT_S:
        return f"sends were up to {lag:.2f} s late (p99): the load generator could not keep its schedule"
    if cpu and cpu["loadgen_cores"] > CLIENT_CORE_LIMIT:
        return f"the load generator used {cpu['loadgen_cores']:.2f} of its one core: near saturation"
    return None


def fmt(value: float | None, scale: float = 1.0, digits: int = 3) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def print_table(report: dict) -> None:
    s = report["summary"]
    o, w, lat = s["offered"], s["window"], s["latency_s"]
    rows = [
        (
            "offered rate",
            f"{o['rate_per_s']:g}/s ({o['arrivals']}), {o['requests']} requests in {o['duration_s']:g} s",
        ),
        (
            "window",
            f"{w['start_s']:g}-{w['end_s']:g} s: {w['scheduled']} scheduled "
            f"({w['scheduled'] / (w['end_s'] - w['start_s']):.2f}/s)",
        ),
        ("completed", f"{w['completed_per_s']:.2f} tasks/s ({w['succeeded_in_window']} succeeded in window)"),
        (
            "latency (s)",
            f"p50 {fmt(lat['p50'])}  p90 {fmt(lat['p90'])}  p99 {fmt(lat['p99'])}  "
            f"max {fmt(lat['max'])}  (n={lat['n']})",
        ),
        (
            f"p50 per {report['config']['bucket']} s",
            " ".join(fmt(b["p50"], digits=2) for b in s["buckets"]) + "  (by scheduled time)",
        ),
        (
            f"done/s per {report['config']['bucket']} s",
            " ".join(f"{b['completed_per_s']:.1f}" for b in s["buckets"]),
        ),
        ("accepted", f"{s['accepted']} of {s['submitted']} submitted; rejected (429/503) {s['rejected']}"),
        ("final status", ", ".join(f"{k} {v}" for k, v in s["final_status"].items())),
        ("http status", ", ".join(f"{k}: {v}" for k, v in s["http_status"].items()) or "-"),
        (
            "errors",
            json.dumps(
                {"http": s["http_errors"], "transport": s["transport_errors"], "polls": report["poll_errors"]}
            ),
        ),
        (
            "client lag (s)",
            f"p99 {fmt(s['client_lag_s']['p99'])}  max {fmt(s['client_lag_s']['max'])}",
        ),
        ("submit rtt (s)", f"p50 {fmt(s['submit_rtt_s']['p50'])}  p99 {fmt(s['submit_rtt_s']['p99'])}"),
        (
            "polls",
            f"{report['polls']} ({report['polls_per_s']:.0f}/s); drain after schedule {s['drain_s']:.1f} s",
        ),
    ]
    if s["detection_delay_s"]["n"]:
        d = s["detection_delay_s"]
        rows.append(
            (
                "seen after finish (s)",
                f"p50 {fmt(d['p50'])}  p99 {fmt(d['p99'])}  (client saw it - server finished_at)",
            )
        )
    cpu = report["cpu_during_schedule"]
    if cpu:
        parts = [f"machine {cpu['busy_cores']:.2f} of {cpu['machine_cores']}"]
        parts += [f"loadgen {cpu['loadgen_cores']:.2f}"]
        if "server_cores" in cpu:
            parts += [f"server {cpu['server_cores']:.2f}", f"other processes {cpu['other_cores']:.2f}"]
        rows.append(("cores busy (schedule)", ", ".join(parts)))
    for i, engine in enumerate(report.get("engines_during_schedule") or []):
        batch, step = engine["mean_unet_batch_images"], engine["mean_step_s"]
        rows.append(
            (
                f"engine {i} (schedule)",
                f"{engine['images']:.0f} images, {engine['unet_batches']:.0f} UNet batches of "
                f"{fmt(batch, digits=1)} images, step {fmt(step, 1000, 1)} ms, "
                f"engine submit to image {fmt(engine['mean_generation_s'], digits=2)} s",
            )
        )
    if report.get("client_fell_behind"):
        rows.append(("WARNING", report["client_fell_behind"]))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
