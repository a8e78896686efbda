"""scripts/loadgen.py: a short open-loop run against a real server, from a second process."""

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from support.server import Server

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "loadgen.py"


def _loadgen():
    if str(SCRIPT.parent) not in sys.path:  # its report module beside it, as when run as a script
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("loadgen", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("loadgen", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_schedule_and_percentiles():
    loadgen = _loadgen()
    assert loadgen.arrival_times(5, 3, "fixed", 0) == pytest.approx([i / 5 for i in range(15)])
    poisson = loadgen.arrival_times(100, 10, "poisson", 1)
    assert 900 < len(poisson) < 1100 and poisson == sorted(poisson) and poisson[-1] < 10
    import loadgen_report as report

    assert report.percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert report.percentile([], 50) is None


def test_a_client_that_fell_behind_is_named_in_the_report():
    """The H200 runs of 2026-11-30: with two worker processes and the full VAE the client's sends
    ran seconds late (httpx's pool with hundreds of requests in flight), which read as a stalled
    server; the same load against one worker process kept its schedule."""
    _loadgen()
    import loadgen_report as report

    runs = ROOT / "benchmarks"
    behind = json.loads((runs / "2026-11-30e-http-h200-turbo-512-1-100-2workers.json").read_text())
    kept = json.loads((runs / "2026-11-30e-http-h200-turbo-512-1-100.json").read_text())
    verdict = report.client_fell_behind(behind["summary"], behind["cpu_during_schedule"])
    assert verdict is not None and "late" in verdict
    assert report.client_fell_behind(kept["summary"], kept["cpu_during_schedule"]) is None
    busy = dict(kept["cpu_during_schedule"], loadgen_cores=0.95)  # on time, but its core nearly full
    assert "core" in report.client_fell_behind(kept["summary"], busy)


def test_the_engines_to_read_follow_the_servers_worker_options():
    """--start-server reads each worker process's /metrics: as many as `serve` starts."""
    loadgen = _loadgen()
    assert loadgen.worker_processes([]) == 0  # the engine runs inside the server
    assert loadgen.worker_processes(["--worker-process"]) == 1
    assert loadgen.worker_processes(["--worker-processes=3"]) == 3
    assert loadgen.worker_processes(["--worker-processes", "2", "--port", "9"]) == 2
    base = loadgen.free_port_block(3)
    assert 0 < base < 65533


def _command(server: Server, out, *, duration: float) -> list[str]:
    """loadgen at 5 requests/s against ``server`` with a fresh unlimited key (``cmd[5]``)."""
    key = server.key(rate=0.0, quota=10_000)
    cmd = [sys.executable, str(SCRIPT), "--url", server.url, "--key", key, "--rate", "5"]
    cmd += ["--metrics-url", f"{server.url}/metrics"]  # the engine runs in the server
    return [*cmd, "--duration", str(duration), "--warmup", "0.5", "--arrivals", "fixed", "--json", str(out)]


@pytest.mark.timeout(120)
def test_short_run_counts_every_request(tmp_path):
    server = Server(tmp_path).start()
    try:
        out = tmp_path / "report.json"
        proc = subprocess.run(_command(server, out, duration=3), capture_output=True, text=True, timeout=90)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    finally:
        server.stop()
    report = json.loads(out.read_text())
    s = report["summary"]
    assert s["offered"]["requests"] == len(report["requests"]) == 15
    assert s["submitted"] == s["accepted"] == 15 and s["rejected"] == 0
    assert s["http_status"] == {"200": 15} and not s["http_errors"] and not s["transport_errors"]
    assert s["final_status"] == {
        "succeeded": 15,
        "failed": 0,
        "canceled": 0,
        "expired": 0,
        "unfinished": 0,
    }
    lat = s["latency_s"]
    assert lat["n"] == s["window"]["scheduled"] == 12
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert s["window"]["completed_per_s"] > 0
    assert "completed" in proc.stdout and "p99" in proc.stdout
    assert report["client_fell_behind"] is None and "WARNING" not in proc.stdout  # 5/s: on schedule
    (engine,) = report["engines_during_schedule"]  # the warm-up task came before: 15 images exactly
    assert engine["images"] == 15 and engine["unet_batches"] >= 4  # 4 steps a task, batched or not
    assert 1 <= engine["mean_unet_batch_images"] <= 15 and engine["mean_step_s"] > 0
    assert "engine 0 (schedule)" in proc.stdout


@pytest.mark.timeout(120)
def test_interrupt_writes_the_report_so_far(tmp_path):
    """A run cut by SIGINT (a GPU call's time limit) still writes its report, covering what ran."""
    server = Server(tmp_path).start()
    try:
        out = tmp_path / "report.json"
        cmd = _command(server, out, duration=300)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not _accepted(server, cmd[5], 11):  # 10 + the warm-up task
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, output
    finally:
        server.stop()
    report = json.loads(out.read_text())
    s = report["summary"]
    assert 1.5 < report["interrupted_at_s"] < 60
    assert s["offered"]["duration_s"] == pytest.approx(report["interrupted_at_s"])
    # only the requests scheduled before the interrupt, each of them sent and answered
    assert 10 <= len(report["requests"]) <= 5 * report["interrupted_at_s"] + 1
    assert s["submitted"] == len(report["requests"])
    assert s["final_status"]["succeeded"] >= 8


def _accepted(server: Server, key: str, n: int) -> bool:
    """At least ``n`` tasks exist on the server (the load generator's progress, seen from outside)."""
    headers = {"Authorization": f"Bearer {key}"}
    response = httpx.get(f"{server.url}/api/v1/image/tasks", params={"page_size": 1}, headers=headers)
    return response.status_code == 200 and response.json()["data"]["total"] >= n
