"""The command line as a user runs it: real processes for the main path, CliRunner for mistakes."""

import io
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from imagegenx.cli import app
from imagegenx.postprocess.encode import read_parameters


def run_cli(*args: str, tmp_path, check: bool = True) -> subprocess.CompletedProcess:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "IMAGEGENX_MODELS__MODEL_DIR": str(tmp_path / "models")}
    proc = subprocess.run(
        [sys.executable, "-m", "imagegenx.cli", *args], capture_output=True, text=True, env=env, timeout=600
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_generate_writes_images_and_metadata(tmp_path):
    out = tmp_path / "x"
    proc = run_cli(
        "generate",
        "a red fox in snow",
        "--model",
        "random:tiny-sdxl",
        "-n",
        "4",
        "--seed",
        "7",
        "--steps",
        "8",
        "--out",
        str(out),
        "--json",
        tmp_path=tmp_path,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["seed"] for line in lines] == [7, 8, 9, 10]
    for line in lines:
        data = (out / line["file"]).read_bytes()
        assert Image.open(io.BytesIO(data)).format == "WEBP"
        assert "Seed: {}".format(line["seed"]) in read_parameters(data)
        assert (
            json.loads((out / line["file"]).with_suffix(".json").read_text())["model"] == "random:tiny-sdxl"
        )
    assert "Traceback" not in proc.stderr
    # Libraries' noise stays out (torchao is installed with the test extra, as with imagegenx[fp8]).
    assert "torchao" not in proc.stderr and "register_constant" not in proc.stderr, proc.stderr


def test_batch_file_img2img_and_png(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\na cat\n\na (very red:1.3) barn, " + "field, " * 60 + "\n")
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(tmp_path / "in.png")
    result = CliRunner().invoke(
        app,
        [
            "generate",
            "--batch-file",
            str(prompts),
            "-n",
            "2",
            "--model",
            "random:tiny-sd15",
            "--steps",
            "4",
            "--image",
            str(tmp_path / "in.png"),
            "--strength",
            "0.5",
            "--format",
            "png",
            "--seed",
            "1",
            "--out",
            str(tmp_path / "o"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(records) == 4 and {r["task"] for r in records} == {"img2img"}
    assert {r["prompt"][:5] for r in records} == {"a cat", "a (ve"}
    assert all(r["file"].endswith(".png") for r in records)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "x", "--scheduler", "warp"], "unknown scheduler"),
        (["generate", "x", "--model", "random:tiny-sdxl", "--width", "65"], "multiple of 8"),
        (["generate", "x", "--format", "gif"], "unknown image format"),
        (["generate", "x", "--model", "no/such-model"], "not in the local Hugging Face cache"),
        (["generate"], "give a PROMPT"),
        (["generate", "x", "--mask", "m.png"], "--mask needs --image"),
        (["generate", "x", "--lora", "a:heavy"], "NAME:WEIGHT"),
    ],
)
def test_user_mistakes_are_one_clear_line(args, message, tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGEGENX_MODELS__MODEL_DIR", str(tmp_path))
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "o")] if len(args) > 1 else args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)


def test_pickle_checkpoint_refused_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "models").mkdir()
    ckpt = tmp_path / "models" / "evil.ckpt"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    ckpt.write_bytes(pickle.dumps(Exploit()))
    proc = run_cli(
        "generate", "x", "--model", str(ckpt), "--out", str(tmp_path / "o"), tmp_path=tmp_path, check=False
    )
    assert proc.returncode == 2
    assert "arbitrary code" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()
    listing = run_cli("models", "--json", tmp_path=tmp_path)
    entries = {e["name"]: e for e in map(json.loads, listing.stdout.splitlines())}
    assert entries["evil.ckpt"]["source"] == "refused"
    assert "random:tiny-sdxl" in entries and entries["random:sdxl"]["family"] == "sdxl"


def test_watermark_check_reads_back_through_jpeg(tmp_path):
    from skimage import data

    from imagegenx.postprocess.watermark import embed_invisible, make_payload

    marked, plain = tmp_path / "marked.jpg", tmp_path / "plain.jpg"
    embed_invisible(Image.fromarray(data.astronaut()), make_payload(42)).save(marked, quality=90)
    Image.fromarray(data.astronaut()).save(plain, quality=90)
    found = CliRunner().invoke(app, ["watermark-check", str(marked)])
    assert found.exit_code == 0 and json.loads(found.stdout)["id"] == f"{42:016x}"
    missing = CliRunner().invoke(app, ["watermark-check", str(plain)])
    assert missing.exit_code == 1 and json.loads(missing.stdout)["found"] is False


def test_worker_per_gpu_starts_that_many_children_per_gpu_and_stops_them(monkeypatch):
    """`worker --gpus 0,1 --per-gpu 2`: four children, each seeing one GPU, with its own lease owner
    and metrics port; SIGTERM reaches every child and the supervisor returns once all have stopped."""
    import signal
    import threading

    from imagegenx import cli_roles

    started = []

    class FakeChild:
        def __init__(self, cmd, env):
            self.cmd, self.env, self.returncode = cmd, env, None
            started.append(self)

        def poll(self):
            return self.returncode

        def send_signal(self, signum):
            self.returncode = 0

    monkeypatch.setenv("IMAGEGENX_SERVICE__METRICS_PORT", "9100")
    monkeypatch.setattr(cli_roles.subprocess, "Popen", FakeChild)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        assert cli_roles.supervise(["0", "1"], ["--grace", "5"], per_gpu=2) == 0
    finally:
        timer.cancel()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert [c.env["CUDA_VISIBLE_DEVICES"] for c in started] == ["0", "0", "1", "1"]
    owners = [c.cmd[c.cmd.index("--owner") + 1].split("/")[-1] for c in started]
    assert owners == ["gpu0.0", "gpu0.1", "gpu1.0", "gpu1.1"]
    assert [c.env["IMAGEGENX_SERVICE__METRICS_PORT"] for c in started] == ["9100", "9101", "9102", "9103"]
    assert all(c.cmd[-2:] == ["--grace", "5"] for c in started)


def test_worker_per_gpu_without_gpus_is_a_clear_error():
    result = CliRunner().invoke(app, ["worker", "--per-gpu", "2"])
    assert result.exit_code != 0 and "--per-gpu needs --gpus" in result.output


@pytest.mark.parametrize(("ms", "expected"), [(1.0, 0.001), (0.0, None)])
def test_gil_switch_interval_is_applied_from_the_settings(ms, expected):
    """Workers and `serve` shorten the GIL switch interval (a lease or store thread holding the
    database's write lock waits less for the engine thread); 0 keeps Python's own."""
    from imagegenx.cli_roles import apply_gil_switch_interval
    from imagegenx.config import EngineSettings, Settings

    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        apply_gil_switch_interval(Settings(engine=EngineSettings(gil_switch_interval_ms=ms)))
        assert sys.getswitchinterval() == pytest.approx(expected or 0.005)
    finally:
        sys.setswitchinterval(before)


def test_a_bad_setting_in_the_environment_is_one_line_naming_it_not_a_traceback():
    result = CliRunner().invoke(
        app,
        ["generate", "a fox"],
        env={"IMAGEGENX_MODELS__ATTENTION": "xformers", "IMAGEGENX_ENGINE__MAX_BATCH": "many"},
    )
    assert result.exit_code == 2
    assert "IMAGEGENX_MODELS__ATTENTION='xformers'" in result.output and "'flash'" in result.output
    assert "IMAGEGENX_ENGINE__MAX_BATCH='many'" in result.output
    assert "Traceback" not in result.output
