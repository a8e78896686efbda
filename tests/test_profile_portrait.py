"""scripts/profile_portrait_gpu.py, dry-run on the CPU: the smoke portrait, every stage's line."""

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_portrait_profile_names_every_stage_and_both_threads(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("IMAGEGENX_MODELS__MODEL_DIR", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["profile_portrait_gpu.py", str(tmp_path / "out")])
    runpy.run_path(str(ROOT / "scripts" / "profile_portrait_gpu.py"), run_name="__main__")
    text = (tmp_path / "out" / "profile-portrait-100.txt").read_text()
    assert text.startswith("portrait-100 (smoke, CPU): ")
    for stage in ("selfies", "drafts", "qc", "refine", "fix", "upscale", "write"):
        assert f"  {stage:8s} wall " in text
    assert "GPU busy   0.00 s (  0%)" in text  # no device here: no kernel is counted
    assert "The caller's thread" in text and "The engine thread" in text
    assert "run_portrait" in text and "_run_batch" in text  # each thread's own work was profiled
