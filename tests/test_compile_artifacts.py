"""Compiled artifacts in one portable file (models/compile_artifacts.py): real torch.compile runs in
separate processes, each with its own empty Inductor cache folder, as separate machines would."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from conftest import make_settings
from imagegenx.engine.engine import Engine
from imagegenx.models import compile_artifacts
from imagegenx.models.compile_artifacts import _read, load_compile_artifacts, save_compile_artifacts

# One "machine": load the file, compile a small function for the given sizes, save; print Inductor's
# cache hits and misses (a hit can only come from the file: the cache folder starts empty).
MACHINE = textwrap.dedent(
    """
    import json, sys, torch
    from torch._dynamo.utils import counters
    from imagegenx.models.compile_artifacts import _read, load_compile_artifacts, save_compile_artifacts
    path, sizes = sys.argv[1], [int(s) for s in sys.argv[2].split(",")]
    loaded = load_compile_artifacts(path) if sys.argv[3] == "load" else 0
    f = torch.compile(lambda x: (x.sin() * 2 + x.cos()).relu(), dynamic=False)
    for n in sizes:
        f(torch.randn(n))
    written = save_compile_artifacts(path)
    inductor = counters["inductor"]
    print(json.dumps({"loaded": loaded, "written": written, "hits": inductor["fxgraph_cache_hit"],
                      "misses": inductor["fxgraph_cache_miss"]}))
    """
)


def machine(tmp_path, name: str, path, sizes: str, load: bool = True) -> dict:
    env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{name}")}
    args = [sys.executable, "-c", MACHINE, str(path), sizes, "load" if load else "no"]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_second_machine_compiles_nothing_and_machines_merge_their_work(tmp_path):
    path = tmp_path / "shared" / "compile-artifacts.bin"
    first = machine(tmp_path, "a", path, "8")
    assert first["misses"] == 1 and first["hits"] == 0 and first["written"] > 0 and path.is_file()
    second = machine(tmp_path, "b", path, "8,16")  # 8 from the file; 16 is new
    assert (second["loaded"], second["hits"], second["misses"]) == (2, 1, 1)
    # A machine that started before the file had 16 compiles 32, and its save keeps 8 and 16.
    third = machine(tmp_path, "c", path, "32", load=False)
    assert third["misses"] == 1
    fourth = machine(tmp_path, "d", path, "8,16,32")
    assert (fourth["hits"], fourth["misses"]) == (3, 0)


def test_a_damaged_file_is_ignored_and_nothing_to_save_writes_nothing(tmp_path, caplog):
    damaged = tmp_path / "damaged.bin"
    damaged.write_bytes(b"not a cache")
    with caplog.at_level(logging.WARNING):
        assert load_compile_artifacts(damaged) == 0
    assert "ignoring compile artifacts" in caplog.text
    assert load_compile_artifacts(None) == 0 and save_compile_artifacts(None) == 0
    assert load_compile_artifacts(tmp_path / "missing.bin") == 0


def _info(**artifacts: list[str]) -> SimpleNamespace:
    return SimpleNamespace(artifacts=artifacts)


def test_the_engine_loads_before_compiling_and_saves_when_it_stops(tmp_path, monkeypatch):
    """The wiring and the file's entries, with torch.compile and the cache calls recorded (the real
    ones run in the test above)."""
    calls = []
    monkeypatch.setattr(compile_artifacts, "_loaded", set())
    monkeypatch.setattr(torch, "compile", lambda fn, **_: calls.append("compile") or fn)
    infos = {b"old": _info(inductor=["a", "b"], aot_autograd=["c"]), b"other": _info(inductor=["x"])}
    monkeypatch.setattr(
        torch.compiler, "load_cache_artifacts", lambda data: calls.append(data) or infos[data]
    )
    path = tmp_path / "artifacts.bin"
    for data in (b"old", b"other"):  # two earlier machines' saves
        monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda data=data: (data, infos[data]))
        assert save_compile_artifacts(path) == len(data)
    assert sorted(blob for blob, _ in _read(path).values()) == [b"old", b"other"]

    new = (b"new", _info(inductor=["a", "b", "d"], aot_autograd=["c"]))
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: calls.append("save") or new)
    settings = make_settings(tmp_path)
    models = settings.models.model_copy(update={"compile": "default", "compile_artifacts": path})
    with Engine(settings.model_copy(update={"models": models})) as engine:
        assert engine.models.get("random:tiny-sd15").speedups["compile_artifacts"] == 4
        assert set(calls[:2]) == {b"old", b"other"} and calls[2] == "compile"  # loaded, then compiled
        assert "save" not in calls
    assert calls[-1] == "save"
    # The new entry covers the old one's keys (it hit them): the old one goes, the other one stays.
    assert sorted((blob, keys) for blob, keys in _read(path).values()) == [
        (b"new", ["a", "b", "c", "d"]),
        (b"other", ["x"]),
    ]


@pytest.mark.parametrize("mode", ["off", "reduce-overhead"])
def test_an_engine_without_compile_or_with_cuda_graphs_writes_no_artifacts(tmp_path, monkeypatch, mode):
    """Off: nothing compiled. CUDA graphs: torch 2.11 crashed the process right after saving on the
    H200, so the save is never called (Inductor's disk cache still serves a restart)."""
    saves = []
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: saves.append(1) or (b"x", _info()))
    path = tmp_path / "artifacts.bin"
    settings = make_settings(tmp_path)
    models = settings.models.model_copy(update={"compile": mode, "compile_artifacts": path})
    with Engine(settings.model_copy(update={"models": models})) as engine:
        assert engine.save_compile_artifacts() == 0
    assert not path.exists() and saves == []
