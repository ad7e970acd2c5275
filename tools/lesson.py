"""Fill docs/lesson.md with real output: run every command of its console blocks against a fresh
``gpt2-serve --model random:gpt2`` and write what each printed under it.

A console block is a fenced ```console block; each line starting with ``$ gpt2-client`` is a
command, and the lines after it (up to the next command or the end of the block) are its
output, replaced on every run. Commands run in docs/images/lesson/, so ``--png name.png`` writes
the picture the lesson shows as ``images/lesson/name.png``. random:gpt2 is seeded, so a rerun
gives the same numbers (the timings of ``inspect trace`` aside).

    .venv/bin/python tools/lesson.py            # rewrite docs/lesson.md and its pictures
    .venv/bin/python tools/lesson.py --check    # exit 1 if a command's output has changed
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LESSON = ROOT / "docs" / "lesson.md"
PICTURES = ROOT / "docs" / "images" / "lesson"
BIN = Path(sys.executable).parent
LISTENING = re.compile(r"listening on \S+?:(\d+)")
BLOCK = re.compile(r"(```console\n)(.*?)(```)", re.DOTALL)
PROMPT = "$ gpt2-client"
# what differs from run to run: timings (trace's stage table, generate's summary) and request ids
VOLATILE = re.compile(
    r"(?m)^(\S+ +\[[\d, ]*\] +\[[\d, ]*\] +)\d+\.\d+|total \d+\.\d+ ms|\d+\.\d+s,|request [0-9a-f]{32}"
)


def commands(lesson: str) -> list[str]:
    """Every ``$ gpt2-client ...`` line of the lesson's console blocks, without the ``$ ``."""
    return [
        line[2:] for block in BLOCK.finditer(lesson) for line in block.group(2).splitlines() if line.startswith(PROMPT)
    ]


def run(command: str, target: str) -> str:
    """One command as bash runs it (the lesson may use "$(...)"), gpt2-client from this venv."""
    env = {**os.environ, "GPT2_CLIENT_TARGET": target, "COLUMNS": "100", "PATH": f"{BIN}:{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "-c", command], cwd=PICTURES, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"{command!r} exited {done.returncode}:\n{done.stderr}")
    return done.stdout + done.stderr


def fill(lesson: str, target: str) -> str:
    def block(match: re.Match[str]) -> str:
        lines: list[str] = []
        for line in match.group(2).splitlines():
            if line.startswith(PROMPT):
                lines.append(line)
                lines.extend(run(line[2:], target).rstrip("\n").splitlines())
                print(f"ran {line[2:]}", file=sys.stderr)
        return match.group(1) + "".join(line + "\n" for line in lines) + match.group(3)

    return BLOCK.sub(block, lesson)


def serve(log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """gpt2-serve on random:gpt2 at a free port, logging into ``log``; returns once SERVING."""
    with log.open("wb") as sink:
        server = subprocess.Popen(
            [str(BIN / "gpt2-serve"), "--model", "random:gpt2", "--host", "127.0.0.1", "--port", "0",
             "--metrics-port", "-1", "--log-format", "text"],
            stdin=subprocess.DEVNULL, stderr=sink,
        )  # fmt: skip
    deadline = time.monotonic() + 180
    while server.poll() is None and time.monotonic() < deadline:
        if (m := LISTENING.search(log.read_text())) is not None:
            target = f"127.0.0.1:{m.group(1)}"
            health = subprocess.run([str(BIN / "gpt2-client"), "--target", target, "health"], capture_output=True)
            if health.returncode == 0:  # listening comes first; SERVING once the model is loaded
                return server, target
        time.sleep(0.5)
    server.kill()
    raise SystemExit(f"gpt2-serve did not start:\n{log.read_text()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare instead of rewriting")
    args = parser.parse_args()
    PICTURES.mkdir(parents=True, exist_ok=True)
    lesson = LESSON.read_text()
    with tempfile.TemporaryDirectory() as tmp:
        server, target = serve(Path(tmp) / "gpt2-serve.log")
        try:
            filled = fill(lesson, target)
        finally:
            server.terminate()
            server.wait(timeout=60)
    if args.check:
        same = VOLATILE.sub(r"\1", filled) == VOLATILE.sub(r"\1", lesson)
        print("docs/lesson.md is up to date" if same else "docs/lesson.md differs from a fresh run", file=sys.stderr)
        return 0 if same else 1
    LESSON.write_text(filled)
    print(f"wrote {LESSON.relative_to(ROOT)} ({len(commands(filled))} commands)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
