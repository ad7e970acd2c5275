"""What the benchmarks that are also phases of ``make bench`` (reuse_bench.py, constraint_bench.py)
share when run on their own: a markdown table, the run itself (the engine's threads as gpt2-serve
sets them, the machine described, the model loaded once), the dated report, and writing the JSON
and, for full runs, bench/README.md."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from engine_bench import update_readme
from gpt2_service.model.weights import LoadedModel, load_model

P = TypeVar("P")


def table(header: list[str], rows: list[list[str]], align: str) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", align, *("| " + " | ".join(row) + " |" for row in rows)])


def yes(ok: bool) -> str:
    return "yes" if ok else "**NO**"


async def run(model: str, measure: Callable[[LoadedModel, P], Awaitable[dict[str, Any]]], plan: P) -> dict[str, Any]:
    """``measure(loaded, plan)`` in a standalone run, with its date and machine."""
    import machine
    from gpt2_service.engine.threads import confine_torch_to_the_engine

    confine_torch_to_the_engine(asyncio.get_running_loop())  # as gpt2-serve does
    env = machine.describe()
    result = await measure(load_model(model), plan)
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": env, **result}


def dated_report(payload: dict[str, Any], report: Callable[[dict[str, Any]], str]) -> str:
    """A standalone run's report: its date and machine, then ``report(payload)``."""
    from machine import short_description

    return f"Run of {payload['date']}: {short_description(payload['machine'])}.\n\n{report(payload)}"


def write(payload: dict[str, Any], text: str, out: Path, readme: bool, markers: tuple[str, str]) -> None:
    """The JSON to ``out``; with ``readme``, ``text`` between ``markers`` in bench/README.md."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    if readme:
        update_readme(text, *markers)
    print(f"\nwrote {out}{' and bench/README.md' if readme else ''} in {payload['seconds']:.0f}s")
