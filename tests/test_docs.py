"""The configuration tables in README.md and docs/api.md list exactly the server's flags, each with
its environment twin and default, so the docs cannot drift from ``gpt2-serve --help``."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
from gpt2_service.server import build_parser, env_name

ROOT = Path(__file__).resolve().parent.parent
ROW = re.compile(r"^\| `--([a-z0-9-]+)`(?: / `--no-[a-z0-9-]+`)? \| `(GPT2_SERVE_[A-Z0-9_]+)` \| ([^|]+) \|", re.M)


def documented(path: Path) -> dict[str, tuple[str, str]]:
    return {flag: (env, default.strip()) for flag, env, default in ROW.findall(path.read_text())}


def server_flags() -> dict[str, argparse.Action]:
    parser = build_parser({})
    return {a.option_strings[0][2:]: a for a in parser._actions if a.option_strings and a.dest != "help"}


@pytest.mark.parametrize("doc", ["README.md", "docs/api.md"])
def test_the_configuration_tables_list_every_flag_with_its_twin_and_default(doc: str) -> None:
    rows = documented(ROOT / doc)
    flags = server_flags()
    assert sorted(rows) == sorted(flags), "flags missing from (or unknown to) the table"
    for flag, action in flags.items():
        env, default = rows[flag]
        assert env == env_name(action.dest), flag
        if default.startswith("`"):  # a literal default; "(empty ...)" rows describe an empty one
            shown = str(action.default).lower() if isinstance(action.default, bool) else str(action.default)
            assert default.split("`")[1] == shown, flag
