"""Several bench reports of one machine as one: a full table from a run that took more than one
command (a lent GPU gives ten minutes a command; every scenario with its peers takes longer).

The reports must come from the same GPU, driver, torch and diffusers. A scenario measured in more
than one report keeps every row; where its rows were measured with different speed-ups (eager in
one command, compiled in another), each runner's name says which (``imagegenx (compile default)``;
a peer by its own compile, from its note: ``diffusers-fast (compile default)``), and each report's
ratios stay with their rows.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from imagegenx.types import UserError

SAME = ("gpu", "driver", "torch", "diffusers", "smoke")


def read_reports(paths: list[Path]) -> list[dict[str, Any]]:
    reports = []
    for path in paths:
        try:
            reports.append(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read the bench report {path}: {exc}") from None
    return reports


def merge(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report holding every scenario of ``reports``, in their order."""
    if not reports:
        raise UserError("nothing to merge")
    first = reports[0]
    for report in reports[1:]:
        differ = [key for key in SAME if report.get(key) != first.get(key)]
        if differ:
            detail = ", ".join(f"{key} {first.get(key)!r} against {report.get(key)!r}" for key in differ)
            raise UserError(f"these reports come from different machines or versions: {detail}")
    tags = [_tag(report.get("speedups", {})) for report in reports]
    tagged = len(set(tags)) > 1  # runners are named by speed-ups only where the reports differ in them
    merged = {key: first[key] for key in (*SAME, "device", "python", "cpus", "pillow") if key in first}
    merged["date"] = " / ".join(dict.fromkeys(report["date"] for report in reports))
    merged["matmul_peak_tflops"] = max(report.get("matmul_peak_tflops") or 0 for report in reports) or None
    merged["merged_from"] = [{"date": r["date"], "speedups": r.get("speedups", {})} for r in reports]
    scenarios: dict[str, Any] = {}
    for report, tag in zip(reports, tags, strict=True):
        for name, result in report["scenarios"].items():
            if "skipped" in result:
                scenarios.setdefault(name, result)
                continue
            named = {row["runner"]: _name(row, tag if tagged else "") for row in result["rows"]}
            rows = [row | {"runner": named[row["runner"]]} for row in result["rows"]]
            ratios = {
                named.get(runner, runner): ratio for runner, ratio in result.get("speedup_vs", {}).items()
            }
            into = scenarios.get(name)
            if into is None or "skipped" in into:
                scenarios[name] = {"what": result["what"], "rows": rows, "speedup_vs": ratios}
            else:
                into["rows"] += rows
                into["speedup_vs"] |= ratios
    merged["scenarios"] = scenarios
    return merged


def _name(row: dict[str, Any], tag: str) -> str:
    """``row``'s runner named by the speed-ups it ran with: ours by the report's ``tag`` (empty where
    the merged reports do not differ), a peer by its own compile mode, which its note states."""
    if row["runner"].startswith("diffusers"):
        mode = re.search(r"compile (default|reduce-overhead|max-autotune)", row.get("note", ""))
        tag = f"compile {mode[1]}" if mode and tag else ""
    return f"{row['runner']} ({tag})" if tag else row["runner"]  # not [..]: rich reads brackets as markup


def _tag(speedups: dict[str, Any]) -> str:
    """The speed-ups that set runs apart, in words: "compile default", "compile reduce-overhead,
    fp8"; "" for an eager run."""
    parts = []
    if speedups.get("compile", "off") != "off":
        parts.append(f"compile {speedups['compile']}")
    named = ("fp8", "fuse_qkv", "compile_dynamic", "vae_channels_last")
    parts += [name for name in named if speedups.get(name)]
    if speedups.get("fp8") and speedups.get("fp8_granularity") == "tensor":
        parts[parts.index("fp8")] = "fp8 per tensor"
    if speedups.get("attention", "auto") != "auto":
        parts.append(f"attention {speedups['attention']}")
    parts += [f"{name}={value}" for name, value in (speedups.get("inductor_flags") or {}).items()]
    return ", ".join(parts)
