"""The docs cannot drift from the code or from each other: the configuration table in
docs/configuration.md lists exactly the server's flags, each with its environment twin and
default (``gpt2-serve --help``), no other page repeats it, and every relative link in README.md,
docs/ and bench/README.md points to a file (and heading) that exists."""

from __future__ import annotations

import argparse
import re
import unicodedata
from pathlib import Path

import pytest
from gpt2_service.config import build_parser, env_name

ROOT = Path(__file__).resolve().parent.parent
FLAGS_TABLE = "docs/configuration.md"  # the one page with the flag/environment/default table
PAGES = sorted(
    str(p.relative_to(ROOT)) for p in [ROOT / "README.md", ROOT / "bench" / "README.md", *(ROOT / "docs").glob("*.md")]
)
ROW = re.compile(r"^\| `--([a-z0-9-]+)`(?: / `--no-[a-z0-9-]+`)? \| `(GPT2_SERVE_[A-Z0-9_]+)` \| ([^|]+) \|", re.M)
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def documented(path: Path) -> dict[str, tuple[str, str]]:
    return {flag: (env, default.strip()) for flag, env, default in ROW.findall(path.read_text())}


def server_flags() -> dict[str, argparse.Action]:
    parser = build_parser({})
    return {a.option_strings[0][2:]: a for a in parser._actions if a.option_strings and a.dest != "help"}


def test_the_configuration_table_lists_every_flag_with_its_twin_and_default() -> None:
    rows = documented(ROOT / FLAGS_TABLE)
    flags = server_flags()
    assert sorted(rows) == sorted(flags), "flags missing from (or unknown to) the table"
    for flag, action in flags.items():
        env, default = rows[flag]
        assert env == env_name(action.dest), flag
        if default.startswith("`"):  # a literal default; "(empty ...)" rows describe an empty one
            shown = str(action.default).lower() if isinstance(action.default, bool) else str(action.default)
            assert default.split("`")[1] == shown, flag


@pytest.mark.parametrize("page", [p for p in PAGES if p != FLAGS_TABLE])
def test_no_other_page_repeats_the_configuration_table(page: str) -> None:
    assert not documented(ROOT / page), f"flag rows belong in {FLAGS_TABLE} only; link to it instead"


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where brackets are no links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor; a repeated heading gets -1, -2, ... as on GitHub."""
    found: set[str] = set()
    counts: dict[str, int] = {}
    for heading in HEADING.findall(FENCE.sub("", path.read_text())):
        base = slug(heading)
        n = counts.get(base, 0)
        counts[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_point_to_existing_files_and_headings(page: str) -> None:
    source = ROOT / page
    broken = []
    for target in LINK.findall(prose(source.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        path = (source.parent / file_part).resolve() if file_part else source
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no such heading in {path.relative_to(ROOT)}")
    assert not broken, f"{page}: " + "; ".join(broken)


def test_the_readme_is_a_front_door() -> None:
    text = (ROOT / "README.md").read_text()
    lines = text.splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; reference material belongs under docs/"
    assert "make run" in lines and "make test" in lines
