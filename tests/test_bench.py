"""`imagegenx bench` in smoke mode: the harness end to end on tiny models on the CPU.

It asserts the report's shape (every scenario, ours and both peers, the figures each row must
carry), never a time: speed is measured on a GPU and recorded in BENCHMARKS.md.
"""

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
from typer.testing import CliRunner

from imagegenx.bench.measure import Row, compile_events, describe_events, percentile
from imagegenx.cli import app


def test_bench_smoke_reports_every_scenario_with_peers(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGEGENX_MODELS__MODEL_DIR", str(tmp_path))
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "--smoke", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["smoke"] is True and report["device"] == "cpu" and report["matmul_peak_tflops"] > 0
    assert report["cpus"] >= 1 and report["pillow"].count(".") >= 1  # the host side of CPU stages
    scenarios = report["scenarios"]
    assert set(scenarios) == {
        "sdxl-1024-30", "sdxl-1024-lcm4", "turbo-512-1", "esrgan-x4-1024", "vae-decode-1024",
        "portrait-100", "cold-start", "flux-dev-1024-28", "turbo-512-1-tiny", "sdxl-1024-lcm4-tiny",
        "portrait-100-tiny",
    }  # fmt: skip
    generation = ("sdxl-1024-30", "sdxl-1024-lcm4", "turbo-512-1", "flux-dev-1024-28")
    for name in (*generation, "turbo-512-1-tiny", "sdxl-1024-lcm4-tiny"):
        rows = scenarios[name]["rows"]
        assert [row["runner"] for row in rows] == ["imagegenx", "diffusers", "diffusers-fast"]
        for row in rows:
            assert row["images"] > 0 and row["images_per_s"] > 0 and row["peak_vram_gib"] is None  # CPU
            assert row["tflop_per_image"] > 0 and row["achieved_tflops"] > 0
        assert set(scenarios[name]["speedup_vs"]) == {"diffusers", "diffusers-fast"}
        assert rows[0]["note"] == "timed run: 0 compiles, 0 cuda graph recordings"  # eager, warmed
    latency_rows = scenarios["sdxl-1024-30"]["rows"]
    assert all(len(row["latencies"]) == 2 and row["p50_s"] <= row["p99_s"] for row in latency_rows)
    esrgan_rows = scenarios["esrgan-x4-1024"]["rows"]
    assert [row["runner"] for row in esrgan_rows] == [
        "imagegenx x4 + finish", "imagegenx x4 network only", "imagegenx x4 network only, tile 1024",
        "imagegenx x4 network only, dense blocks plain",  # the CPU's default is fused: the other way
    ]  # fmt: skip
    assert [row["note"].rsplit(", ", 1)[1] for row in esrgan_rows] == ["dense blocks fused"] * 3 + [
        "dense blocks plain"
    ]
    decodes = scenarios["vae-decode-1024"]["rows"]
    assert len(decodes) == 6 and [row["runner"].split()[1] for row in decodes] == ["vae"] * 4 + ["tiny"] * 2
    for name in ("portrait-100", "portrait-100-tiny"):
        [portrait] = scenarios[name]["rows"]
        assert portrait["images"] == 8 and "drafts" in portrait["note"] and "qc" in portrait["note"]
        assert "models resident" in portrait["note"]
        assert portrait["note"].endswith("timed run: 0 compiles, 0 cuda graph recordings")  # eager
    cold = {row["runner"]: row for row in scenarios["cold-start"]["rows"]}
    first, mixed = "imagegenx file → first image", "imagegenx 40 mixed requests"
    switches = ["imagegenx LoRA switch (adapters)", "imagegenx LoRA switch (fused)"]
    assert list(cold) == [first, *switches, mixed]
    assert "single file" in cold[first]["note"]
    for switch in switches:
        assert "file reads 3 for 3 LoRAs" in cold[switch]["note"] and "ms without" in cold[switch]["note"]
    assert "originals kept" in cold[switches[1]]["note"]
    assert cold[mixed]["images"] == 40 and "reloads 0, LoRA file reads 0, failed 0" in cold[mixed]["note"]
    assert "sdxl-1024-30" in result.output  # the table


def test_bench_lists_scenarios_and_refuses_unknown_ones():
    listed = CliRunner().invoke(app, ["bench", "--list"])
    assert listed.exit_code == 0 and "turbo-512-1" in listed.output
    unknown = CliRunner().invoke(app, ["bench", "warp-speed", "--smoke"])
    assert unknown.exit_code == 2 and "unknown scenario" in unknown.output


def test_row_figures():
    row = Row("s", "imagegenx", images=4, seconds=2.0, latencies=[0.4, 0.5, 0.6, 0.5], tflop_per_image=10.0)
    data = row.as_dict(peak_tflops=40.0)
    assert data["images_per_s"] == 2.0 and data["achieved_tflops"] == 20.0 and data["share_of_peak"] == 0.5
    assert data["p50_s"] == 0.5 and data["p99_s"] == 0.6
    assert percentile([3.0], 99) == 3.0


def test_a_run_cut_short_keeps_the_rows_measured_before(tmp_path, monkeypatch):
    """A GPU call can end inside a peer's compile: the rows measured before are already in the JSON,
    marked partial."""
    from rich.console import Console

    from imagegenx.bench import report, scenarios
    from imagegenx.bench.scenarios import BenchContext
    from imagegenx.config import Settings

    monkeypatch.setenv("IMAGEGENX_MODELS__MODEL_DIR", str(tmp_path))
    real_load_peer = scenarios.load_peer

    def load_peer(name, *args, **kwargs):
        if name == "diffusers-fast":
            raise KeyboardInterrupt  # what a time limit's signal looks like from inside
        return real_load_peer(name, *args, **kwargs)

    monkeypatch.setattr(scenarios, "load_peer", load_peer)
    out = tmp_path / "cut.json"
    models = Settings().models.model_copy(update={"device": "cpu"})
    settings = Settings().model_copy(update={"models": models})
    ctx = BenchContext(settings, smoke=True, peers=("diffusers", "diffusers-fast"))
    with pytest.raises(KeyboardInterrupt), open(tmp_path / "log", "w") as log:
        report.run(["turbo-512-1"], ctx, Console(file=log), out)
    result = json.loads(out.read_text())["scenarios"]["turbo-512-1"]
    assert result["partial"] is True
    assert [row["runner"] for row in result["rows"]] == ["imagegenx", "diffusers"]
    assert set(result["speedup_vs"]) == {"diffusers"}


def test_a_peer_gives_back_inductors_flags():
    """The fast recipe sets global Inductor flags; closing the peer restores them, so the next
    scenario's own compile is not tuned by the recipe's flags."""
    import torch._inductor.config as inductor

    from imagegenx.bench.peers import Peer

    before = inductor.coordinate_descent_tuning
    peer = Peer("diffusers-fast", model=None, saved_inductor=inductor.get_config_copy())
    inductor.coordinate_descent_tuning = not before
    peer.close()
    assert inductor.coordinate_descent_tuning is before and peer.saved_inductor is None


def test_compile_events_count_what_compiled_inside_the_block():
    """A real Dynamo compile (the eager backend: no Inductor, quick) inside the block is counted,
    the same call again is not, and nothing is counted once the block has ended."""
    import torch

    compiled = torch.compile(lambda x: x * 2 + 1, backend="eager", dynamic=False)
    with compile_events() as events:
        compiled(torch.ones(3))
        compiled(torch.ones(3))  # the same shape: no compile
        compiled(torch.ones(5))  # a new one: a compile
    compiled(torch.ones(7))
    assert events == {"compiles": 2, "cuda graph recordings": 0}
    assert describe_events(events) == "timed run: 2 compiles, 0 cuda graph recordings"
    warm = Counter({"compiles": 5, "cuda graph recordings": 0})
    assert describe_events(events, warm, "default") == (
        "warm-up: 5 compiles, 0 cuda graph recordings; timed run: 2 compiles, 0 cuda graph recordings"
    )


def test_a_compiled_run_whose_warm_up_compiled_nothing_says_it_ran_eagerly():
    """What the tenth GPU run's fp8 Flux row would have said: Dynamo had given up on its blocks."""
    nothing = Counter({"compiles": 0, "cuda graph recordings": 0})
    note = describe_events(nothing, nothing, "reduce-overhead")
    assert describe_events(nothing, nothing, "off") == "timed run: 0 compiles, 0 cuda graph recordings"
    assert note.startswith("warm-up compiled nothing, so the model ran eagerly;")


def test_bench_prints_every_threads_stack_when_asked(tmp_path):
    """--stacks-after: where a run that a time limit will cut spends its time, printed by a watchdog
    thread while the scenario runs (here the smoke scenario outlasts a 0.5-s timer)."""
    command = [
        sys.executable,
        "-m",
        "imagegenx.cli",
        "bench",
        "--smoke",
        "--no-peers",
        "--stacks-after",
        "0.5",
    ]
    done = subprocess.run(
        [*command, "--stacks-after", "0.5", "cold-start", "--out", str(tmp_path / "r.json")],
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ | {"HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "every thread's stack after 0.5 s:" in done.stderr
    assert "Thread MainThread (most recent call last)" in done.stderr and 'File "' in done.stderr
