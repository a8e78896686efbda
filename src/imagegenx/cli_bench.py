"""`imagegenx bench`: the benchmark scenarios beside plain diffusers and its fast recipe."""

from __future__ import annotations

import sys
import threading
import traceback
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from imagegenx.config import Settings
from imagegenx.types import UserError


def bench(
    scenarios: Annotated[list[str] | None, typer.Argument(help="Scenario names [default: all].")] = None,
    list_: Annotated[bool, typer.Option("--list", help="List the scenarios and exit.")] = False,
    smoke: Annotated[
        bool, typer.Option(help="Tiny models on the CPU: proves the harness, not speed.")
    ] = False,
    out: Annotated[Path | None, typer.Option(help="Write the report as JSON here.")] = None,
    peer: Annotated[
        list[str] | None, typer.Option(help="A peer to run beside us, repeatable [default: all].")
    ] = None,
    no_peers: Annotated[bool, typer.Option("--no-peers", help="Measure imagegenx alone.")] = False,
    peer_compile: Annotated[
        str, typer.Option(help="torch.compile mode of the fast-recipe peer (max-autotune as published; off).")
    ] = "max-autotune",
    merge: Annotated[
        list[Path] | None,
        typer.Option(
            help="Merge these reports (one machine, several commands) into one table and --out; "
            "measures nothing. Repeatable."
        ),
    ] = None,
    stacks_after: Annotated[
        float | None,
        typer.Option(
            help="Print every thread's Python stack to stderr once this many seconds have passed "
            "(where a run that will be cut short spends its time: a compile, a load)."
        ),
    ] = None,
) -> None:
    """Measure scenarios on this machine's GPU beside diffusers; prints a table, writes JSON."""
    from imagegenx.cli import _fail, _quiet_libraries, _with

    if stacks_after is not None:
        _print_stacks_after(stacks_after)

    _quiet_libraries()
    from imagegenx.bench.scenarios import SCENARIOS

    if list_:
        table = Table("scenario", "what", "status")
        for scenario in SCENARIOS.values():
            table.add_row(scenario.name, scenario.what, scenario.missing or "ready")
        Console().print(table)
        return
    if merge:
        return _merge(merge, scenarios, out)
    names = scenarios or list(SCENARIOS)
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown:
        raise _fail(f"unknown scenario(s): {', '.join(unknown)}; see `imagegenx bench --list`")
    import torch

    from imagegenx.bench import report
    from imagegenx.bench.peers import PEERS
    from imagegenx.bench.scenarios import BenchContext

    settings = Settings()
    if smoke:
        settings = _with(settings, models={"device": "cpu"})
    elif not torch.cuda.is_available():
        raise _fail("no CUDA device: benchmarks measure a GPU (use --smoke to check the harness on a CPU)")
    peers = () if no_peers else tuple(peer or PEERS)
    if set(peers) - set(PEERS):
        raise _fail(
            f"unknown peer(s) {', '.join(sorted(set(peers) - set(PEERS)))}; peers: {', '.join(PEERS)}"
        )
    ctx = BenchContext(settings, smoke, peers, peer_compile, repeats=2 if smoke else 5)
    console = Console(width=max(160, Console().width))  # ten columns: wider than a default pipe
    try:
        result = report.run(names, ctx, console, out)
    except UserError as exc:
        raise _fail(str(exc)) from None
    report.print_table(result, console)


def _merge(paths: list[Path], scenarios: list[str] | None, out: Path | None) -> None:
    """``bench --merge``: the reports as one, printed and written to ``out``."""
    import json

    from imagegenx.bench import report
    from imagegenx.bench.merge import merge, read_reports
    from imagegenx.cli import _fail

    if scenarios:
        raise _fail("--merge measures nothing: give report files, not scenario names")
    try:
        merged = merge(read_reports(paths))
    except UserError as exc:
        raise _fail(str(exc)) from None
    if out is not None:
        out.write_text(json.dumps(merged, indent=2))
    report.print_table(merged, Console(width=max(160, Console().width)))


def _print_stacks_after(seconds: float) -> None:
    """Every thread's Python stack to stderr once, ``seconds`` from now, from a daemon timer thread
    (not faulthandler's watchdog, which reads other threads' frames without the GIL and crashed a
    run mid-import)."""

    def dump() -> None:
        names = {thread.ident: thread.name for thread in threading.enumerate()}
        lines = [f"every thread's stack after {seconds:g} s:\n"]
        for ident, frame in sys._current_frames().items():
            lines.append(f"Thread {names.get(ident, ident)} (most recent call last):\n")
            lines += traceback.format_stack(frame)
        print("".join(lines), file=sys.__stderr__, flush=True)

    timer = threading.Timer(seconds, dump)
    timer.daemon = True
    timer.start()
