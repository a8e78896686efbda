"""`imagegenx bench --merge`: reports of one machine from several commands as one table."""

import json

from typer.testing import CliRunner

from imagegenx.bench.merge import merge
from imagegenx.cli import app

MACHINE = {"gpu": "NVIDIA H200", "driver": "580", "torch": "2.11.0", "diffusers": "0.42.1", "smoke": False}


def _row(runner: str, seconds: float, note: str = "") -> dict:
    row = {"scenario": "s", "runner": runner, "images": 1, "seconds": seconds, "images_per_s": 1 / seconds}
    return row | {"note": note}


def _report(compile_mode: str, scenarios: dict, date: str = "2026-11-30", peak: float = 740.0) -> dict:
    speedups = {"compile": compile_mode, "fp8": False}
    return MACHINE | {"date": date, "matmul_peak_tflops": peak, "speedups": speedups, "scenarios": scenarios}


def _scenario(rows: list[dict], ratios: dict | None = None) -> dict:
    return {"what": "w", "rows": rows, "speedup_vs": ratios or {}}


def test_rows_of_runs_with_different_speedups_say_which_and_keep_their_ratios():
    eager = _report(
        "off",
        {
            "lcm4": _scenario([_row("imagegenx", 0.15), _row("diffusers", 0.2)], {"diffusers": 1.33}),
            "esrgan": {"what": "x4", "skipped": "no weights"},
        },
    )
    compiled = _report(
        "reduce-overhead",
        {
            "lcm4": _scenario(
                # the recipe compiled in default mode beside ours with CUDA graphs
                [
                    _row("imagegenx", 0.07),
                    _row("diffusers-fast", 0.08, "bf16, compile default without tuning"),
                ],
                {"diffusers-fast": 1.14},
            ),
            "esrgan": _scenario([_row("imagegenx", 0.23)]),
        },
        date="2026-12-01",
        peak=760.0,
    )
    merged = merge([eager, compiled])
    runners = [row["runner"] for row in merged["scenarios"]["lcm4"]["rows"]]
    assert runners == [
        "imagegenx",
        "diffusers",
        "imagegenx (compile reduce-overhead)",
        "diffusers-fast (compile default)",  # its own compile, not ours
    ]
    assert merged["scenarios"]["lcm4"]["speedup_vs"] == {
        "diffusers": 1.33,
        "diffusers-fast (compile default)": 1.14,
    }
    # A scenario one command skipped and another measured: the measurement.
    assert [row["runner"] for row in merged["scenarios"]["esrgan"]["rows"]] == [
        "imagegenx (compile reduce-overhead)"
    ]
    assert merged["date"] == "2026-11-30 / 2026-12-01" and merged["matmul_peak_tflops"] == 760.0
    assert merged["gpu"] == "NVIDIA H200" and len(merged["merged_from"]) == 2


def _one_row(scenario: str, compile_mode: str, seconds: float, **speedups) -> dict:
    """A report of ``scenario`` with our one row, run with ``speedups`` beside the compile mode."""
    report = _report(compile_mode, {scenario: _scenario([_row("imagegenx", seconds)])})
    report["speedups"] |= speedups
    return report


def _runners(merged: dict, scenario: str) -> list[str]:
    return [row["runner"] for row in merged["scenarios"][scenario]["rows"]]


def test_fp8_runs_are_named_by_their_scales():
    merged = merge(
        [
            _one_row("flux", "off", 5.4),
            _one_row("flux", "default", 4.0, fp8=True, fp8_granularity="row"),
            _one_row("flux", "default", 4.0, fp8=True, fp8_granularity="tensor"),
        ]
    )
    assert _runners(merged, "flux") == [
        "imagegenx",
        "imagegenx (compile default, fp8)",
        "imagegenx (compile default, fp8 per tensor)",
    ]


def test_an_attention_kernel_and_inductor_flags_are_named():
    merged = merge(
        [
            _one_row("sdxl", "off", 1.8, attention="auto"),
            _one_row("sdxl", "off", 1.9, attention="flash"),
            _one_row("sdxl", "default", 1.1, inductor_flags={"conv_1x1_as_mm": True}),
        ]
    )
    assert _runners(merged, "sdxl") == [
        "imagegenx",
        "imagegenx (attention flash)",
        "imagegenx (compile default, conv_1x1_as_mm=True)",
    ]


def test_reports_of_one_setting_keep_their_runner_names():
    a = _report("off", {"turbo": _scenario([_row("imagegenx", 0.01)])})
    b = _report("off", {"flux": _scenario([_row("imagegenx", 5.4)])})
    merged = merge([a, b])
    assert list(merged["scenarios"]) == ["turbo", "flux"]
    assert merged["scenarios"]["flux"]["rows"][0]["runner"] == "imagegenx"


def test_cli_merges_files_and_refuses_reports_of_other_machines(tmp_path):
    paths = []
    for i, (report, gpu) in enumerate(
        [(_report("off", {}), "NVIDIA H200"), (_report("off", {}), "NVIDIA H100")]
    ):
        path = tmp_path / f"r{i}.json"
        path.write_text(json.dumps(report | {"gpu": gpu}))
        paths.append(path)
    out = tmp_path / "full.json"
    ok = CliRunner().invoke(
        app, ["bench", "--merge", str(paths[0]), "--merge", str(paths[0]), "--out", str(out)]
    )
    assert ok.exit_code == 0, ok.output
    assert json.loads(out.read_text())["gpu"] == "NVIDIA H200"
    refused = CliRunner().invoke(app, ["bench", "--merge", str(paths[0]), "--merge", str(paths[1])])
    assert refused.exit_code != 0
    assert "different machines" in refused.output and "NVIDIA H100" in refused.output
    assert "Traceback" not in refused.output
    missing = CliRunner().invoke(app, ["bench", "--merge", str(tmp_path / "nope.json")])
    assert missing.exit_code != 0 and "cannot read" in missing.output
