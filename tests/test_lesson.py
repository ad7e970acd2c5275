"""docs/lesson.md, the lesson walked through on random:gpt2: every command is one gpt2-client
accepts, each has the output tools/lesson.py recorded and each picture it names exists, and the
recorded outputs show what the lesson teaches (the token ids of "cat sat on the", " bank" twice
as one token, temperatures 0.05, 1 and 2 giving different distributions under top-k 50)."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
from gpt2_client.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import lesson  # noqa: E402  (tools/lesson.py)

TEXT = lesson.LESSON.read_text()
COMMANDS = lesson.commands(TEXT)


def output_of(command: str) -> str:
    """What tools/lesson.py recorded under ``command``."""
    for block in lesson.BLOCK.finditer(TEXT):
        lines = block.group(2).splitlines()
        for i, line in enumerate(lines):
            if line == "$ " + command:
                rest = lines[i + 1 :]
                end = next((j for j, later in enumerate(rest) if later.startswith(lesson.PROMPT)), len(rest))
                return "\n".join(rest[:end])
    raise AssertionError(f"{command!r} is not in docs/lesson.md")


def test_the_lesson_walks_through_every_building_block() -> None:
    used = {" ".join(shlex.split(c)[1:3]) for c in COMMANDS}
    for what in ["info", "inspect tokens", "inspect embed", "inspect attention", "inspect trace", "inspect hidden",
                 "inspect next"]:  # fmt: skip
        assert any(u.startswith(what) for u in used), f"no {what} command"
    assert any("--trace" in c for c in COMMANDS), "no step-by-step generation"
    assert len(COMMANDS) >= 15


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_is_accepted_and_has_its_recorded_output(command: str) -> None:
    args = build_parser().parse_args(shlex.split(command)[1:])  # exits 2 on a bad flag
    assert output_of(command).strip(), f"no output recorded under {command!r}: run make lesson"
    png = getattr(args, "png", None)
    if png is not None:
        assert (lesson.PICTURES / png).is_file(), f"{png} missing from docs/images/lesson: run make lesson"
        assert f"(images/lesson/{png})" in TEXT, f"{png} is drawn but not shown"


def test_the_recorded_outputs_show_what_the_lesson_teaches() -> None:
    assert "ids:  [9246, 3332, 319, 262]" in output_of('gpt2-client inspect tokens "cat sat on the"')
    bank = output_of('gpt2-client inspect embed " bank is near the river bank" --png bank.png')
    rows = re.findall(r"^(\d+) +(\d+) +(\S+)", bank, re.M)
    assert rows[0][1:] == rows[5][1:] == ("3331", "␣bank"), rows  # the same token at two positions
    entropies = {}
    for command in COMMANDS:
        if (m := re.search(r"inspect next .* --temperature ([\d.]+) --top-k 50", command)) is not None:
            found = re.search(r"entropy ([\d.]+) nats raw, ([\d.]+) after", output_of(command))
            assert found is not None
            entropies[float(m.group(1))] = (float(found.group(1)), float(found.group(2)))
    assert sorted(entropies) == [0.05, 1.0, 2.0]
    assert len({raw for raw, _ in entropies.values()}) == 1  # temperature leaves the raw distribution alone
    low, one, two = (entropies[t][1] for t in (0.05, 1.0, 2.0))
    assert low < one - 1 and one < two  # visibly sharper at 0.05, flatter at 2


def test_the_readme_links_the_lesson() -> None:
    assert "(docs/lesson.md)" in (ROOT / "README.md").read_text()
