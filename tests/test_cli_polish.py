"""gpt2-client as a new user meets it (issue 17): no prefix matching of flags, a subcommand's own
usage on a bad flag, a hint when no server answers, plain help texts, --top-logprobs in text mode,
truncation and context shifts in the footer, and parameter counts that add up."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
from collections.abc import AsyncIterator, Iterator

import pytest
from gpt2_client import UnavailableError
from gpt2_client.cli import UNREACHABLE_HINT, _parameter_rows, build_parser, main, unreachable
from gpt2_client.errors import InvalidArgumentError
from gpt2_client.results import ParameterCounts
from gpt2_service.model.weights import LoadedModel

from tests.api_helpers import API_ENGINE_CONFIG, Served, serve

PROMPT = "The cat sat on the"
LONG_PROMPT = " the" * 140  # 140 tokens: over API_ENGINE_CONFIG's 128-token window


def _parsers(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every parser of the command line with the words that reach it: (), ("generate",), ...,
    ("inspect", "tokens"), ..."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


COMMANDS = [path for path, _ in _parsers(build_parser())]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``gpt2-client`` in this thread: its exit status, stdout and stderr."""
    try:
        main(list(argv))
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    else:
        status = 0
    out, err = capsys.readouterr()
    return status, out, err


async def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``gpt2-client`` in a worker thread (the server runs on this test's loop)."""
    return await asyncio.to_thread(_run, capsys, *argv)


@pytest.fixture
async def served(tiny: LoadedModel) -> AsyncIterator[Served]:
    async with serve(tiny) as s:
        yield s


# -- 1. no prefix matching ----------------------------------------------------------------------


def test_the_command_line_has_the_expected_parsers() -> None:
    assert {(), ("generate",), ("score",), ("info",), ("health",), ("inspect",), ("inspect", "next")} <= set(COMMANDS)
    assert len(COMMANDS) == 12


@pytest.mark.parametrize("path", COMMANDS, ids=lambda path: " ".join(path) or "top")
def test_every_parser_refuses_abbreviations(path: tuple[str, ...]) -> None:
    parser = dict(_parsers(build_parser()))[path]
    assert parser.allow_abbrev is False


@pytest.mark.parametrize(
    ("argv", "prog", "flag"),
    [
        (["generate", "x", "--max-new-token", "5"], "gpt2-client generate", "--max-new-token 5"),
        (["generate", "x", "--temp", "0.5"], "gpt2-client generate", "--temp 0.5"),
        (["score", "x", "--top-logprob", "2"], "gpt2-client score", "--top-logprob 2"),
        (["health", "--serv", "x"], "gpt2-client health", "--serv x"),
        (["inspect", "next", "x", "--candidate", "3"], "gpt2-client inspect next", "--candidate 3"),
        (["inspect", "tokens", "x", "--id"], "gpt2-client inspect tokens", "--id"),
        (["--jso", "info"], "gpt2-client", "--jso"),
    ],
)
def test_an_abbreviated_flag_is_an_error(
    capsys: pytest.CaptureFixture[str], argv: list[str], prog: str, flag: str
) -> None:
    status, out, err = _run(capsys, *argv)
    assert status == 2 and out == ""
    assert f"{prog}: error: unrecognized arguments: {flag}" in err, err


# -- 2. a subcommand's own usage ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "prog", "unknown"),
    [
        (["generate", PROMPT, "--bogus"], "gpt2-client generate", "--bogus"),
        (["generate", PROMPT, "surplus"], "gpt2-client generate", "surplus"),
        (["score", "x", "--bogus=1"], "gpt2-client score", "--bogus=1"),
        (["info", "--bogus"], "gpt2-client info", "--bogus"),
        (["health", "--bogus"], "gpt2-client health", "--bogus"),
        (["inspect", "--bogus", "tokens", "x"], "gpt2-client inspect", "--bogus"),
        (["inspect", "tokens", "x", "--bogus"], "gpt2-client inspect tokens", "--bogus"),
        (["inspect", "attention", "x", "--layer", "0", "--bogus"], "gpt2-client inspect attention", "--bogus"),
        (["--bogus", "info"], "gpt2-client", "--bogus"),  # before the command: the top level's
    ],
)
def test_an_unknown_argument_shows_the_usage_of_its_command(
    capsys: pytest.CaptureFixture[str], argv: list[str], prog: str, unknown: str
) -> None:
    status, out, err = _run(capsys, *argv)
    assert status == 2 and out == ""
    assert err.startswith(f"usage: {prog} ["), err
    assert err.rstrip().endswith(f"{prog}: error: unrecognized arguments: {unknown}"), err


def test_parse_args_still_reports_bad_values_with_the_subcommand_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["generate", "x", "--max-new-tokens", "many"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("usage: gpt2-client generate [")
    assert "argument --max-new-tokens: invalid int value: 'many'" in err


# -- 3. the hint when no server answers ---------------------------------------------------------


def _free_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.mark.parametrize(
    "argv",
    [["info"], ["generate", PROMPT], ["generate", PROMPT, "--stream"], ["inspect", "tokens", PROMPT]],
    ids=["info", "generate", "stream", "inspect"],
)
def test_connection_refused_asks_whether_a_server_runs_there(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    target = f"127.0.0.1:{_free_port()}"
    status, out, err = _run(capsys, "--target", target, "--timeout", "20", *argv)
    assert status == 1 and out == ""
    lines = err.splitlines()
    assert lines[0].startswith("error: UNAVAILABLE: ") and "Connection refused" in lines[0], err
    assert lines[1] == (
        f"hint: is a server running at {target}? (start one with: make run, or gpt2-serve; "
        "set --target or GPT2_CLIENT_TARGET)"
    )
    assert UNREACHABLE_HINT.format(target=target, env="GPT2_CLIENT_TARGET") in lines[1]


async def test_a_server_that_answers_unavailable_gets_no_hint(
    tiny: LoadedModel, capsys: pytest.CaptureFixture[str]
) -> None:
    async with serve(tiny, attach=False) as loading:  # it answers: the model is still loading
        status, _, err = await _cli(capsys, "--target", loading.target, "generate", PROMPT, "--stream")
    assert status == 1 and "UNAVAILABLE" in err and "hint" not in err


def test_only_a_failure_to_connect_is_unreachable() -> None:
    refused = "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Connection refused"
    assert unreachable(UnavailableError(refused))
    assert not unreachable(UnavailableError("the server is draining", reason="DRAINING"))
    assert not unreachable(UnavailableError("Socket closed"))
    assert not unreachable(InvalidArgumentError(refused))


# -- 4. plain help texts ------------------------------------------------------------------------


@pytest.mark.parametrize("path", COMMANDS, ids=lambda path: " ".join(path) or "top")
def test_help_shows_no_markup(capsys: pytest.CaptureFixture[str], path: tuple[str, ...]) -> None:
    status, out, err = _run(capsys, *path, "--help")
    assert status == 0 and err == ""
    assert out.startswith(f"usage: {' '.join(['gpt2-client', *path])} ")
    for markup in ("`", "**"):
        assert markup not in out, f"{markup!r} in the help of {path}:\n{out}"


@pytest.mark.parametrize(
    ("path", "example"),
    [((), '    gpt2-client info\n'), (("inspect",), '    gpt2-client inspect trace "cat sat on the"\n')],
)  # fmt: skip
def test_help_keeps_the_examples_lines(capsys: pytest.CaptureFixture[str], path: tuple[str, ...], example: str) -> None:
    _, out, _ = _run(capsys, *path, "--help")
    assert example in out


# -- 5. --top-logprobs in text mode -------------------------------------------------------------


GENERATE = ["generate", PROMPT, "--max-new-tokens", "5", "--seed", "4", "--ignore-eos"]


def _alternatives_lines(out: str) -> list[str]:
    lines = out.splitlines()
    start = lines.index("--- generated tokens: position, token, logprob, top alternatives ---")
    return lines[start + 1 :]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_top_logprobs_in_text_mode_lists_the_alternatives(
    served: Served, capsys: pytest.CaptureFixture[str], stream: bool
) -> None:
    t = ["--target", served.target]
    status, as_json, err = await _cli(capsys, *t, "--json", *GENERATE, "--top-logprobs", "3")
    assert status == 0, err
    expected = json.loads(as_json)
    status, out, summary = await _cli(capsys, *t, *GENERATE, "--top-logprobs", "3", *(["--stream"] * stream))
    assert status == 0, summary
    assert out.startswith(expected["text"] + "\n")
    rows = _alternatives_lines(out)
    assert len(rows) == 5 == len(expected["tokens"])
    for position, (row, token) in enumerate(zip(rows, expected["tokens"], strict=True)):
        assert len(token["top_logprobs"]) == 3
        fields = re.split(r" {2,}", row.strip(), maxsplit=3)
        assert fields[:3] == [str(position), repr(token["text"]), f"{token['logprob']:.4f}"], row
        assert fields[3] == ", ".join(f"{x['text']!r} {x['logprob']:.2f}" for x in token["top_logprobs"])
    assert summary.startswith("[LENGTH: 5 tokens")


async def test_without_top_logprobs_text_mode_prints_the_text_alone(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    t = ["--target", served.target]
    _, as_json, _ = await _cli(capsys, *t, "--json", *GENERATE)
    status, out, _ = await _cli(capsys, *t, *GENERATE)
    _, streamed, _ = await _cli(capsys, *t, *GENERATE, "--stream")
    assert status == 0 and out == streamed == json.loads(as_json)["text"] + "\n"


async def test_top_logprobs_with_several_choices_lists_each_choice_s(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--target", served.target, *GENERATE, "--top-logprobs", "2", "--n", "2"]
    _, out, _ = await _cli(capsys, *argv)
    _, streamed, _ = await _cli(capsys, *argv, "--stream")
    assert out == streamed
    assert out.count("--- generated tokens: position, token, logprob, top alternatives ---") == 2
    assert out.index("--- choice 0") < out.index("--- generated tokens") < out.index("--- choice 1")


# -- 6. truncation and context shifts in the footer ---------------------------------------------


FOOTER = re.compile(
    r"\[(?P<reason>[^:]+): (?P<tokens>\d+) tokens in [\d.]+s, seed \d+"
    r"(?:, (?P<truncated>\d+) prompt tokens? truncated)?(?:, (?P<shifts>\d+) context shifts?)?, request \w+\]"
)


@pytest.mark.parametrize(
    "extra", [[], ["--stream"], ["--n", "2"], ["--n", "2", "--stream"]], ids=["whole", "stream", "n2", "n2-stream"]
)
async def test_the_footer_counts_truncated_prompt_tokens_and_context_shifts(
    served: Served, capsys: pytest.CaptureFixture[str], extra: list[str]
) -> None:
    assert API_ENGINE_CONFIG.context_window == 128
    argv = ["--target", served.target, "generate", LONG_PROMPT, "--max-new-tokens", "200", "--ignore-eos",
            "--seed", "3", *extra]  # fmt: skip
    status, as_json, err = await _cli(capsys, *argv, "--json")
    assert status == 0, err
    usages = [json.loads(line)["usage"] for line in as_json.splitlines() if '"usage": {' in line]
    usages = [u for u in usages if u is not None]
    truncated = usages[0]["truncated_prompt_tokens"]
    shifts = sum(u["context_shifts"] for u in usages)
    assert truncated > 0 and shifts > 0
    status, _, err = await _cli(capsys, *argv)
    assert status == 0, err
    footer = FOOTER.search(err)
    assert footer is not None, err
    assert int(footer["truncated"]) == truncated and int(footer["shifts"]) == shifts
    assert int(footer["tokens"]) == 200 * (2 if "--n" in extra else 1)


async def test_a_short_prompt_s_footer_names_neither(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = await _cli(capsys, "--target", served.target, *GENERATE)
    assert status == 0 and "[LENGTH: 5 tokens in " in err
    assert "truncated" not in err and "shift" not in err


# -- 7. parameter counts that add up ------------------------------------------------------------


def _number(text: str) -> int:
    return int(text.replace(",", ""))


async def test_info_parameter_lines_add_up_to_the_total(
    served: Served, tiny: LoadedModel, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = await _cli(capsys, "--target", served.target, "info")
    assert status == 0, err
    lines = out.splitlines()
    block = lines[next(i for i, line in enumerate(lines) if line.startswith("parameters")) :]
    block = block[: next(i for i, line in enumerate(block) if line.startswith("limits"))]
    header, *parts = block
    rows = {line.split()[0]: line.split(None, 1)[1] for line in parts}
    counts = tiny.model.parameter_counts()
    total = _number(rows.pop("total").split()[0])
    lm_head = rows.pop("lm_head")
    assert total == counts["total"] == _number(header.split()[1])
    assert sum(_number(value) for value in rows.values()) == total
    assert set(rows) == {"token_embedding", "position_embedding", "attention", "feed_forward", "layer_norm"}
    assert f"tied to token_embedding: the same {counts['token_embedding']:,} weights" in lm_head
    assert not re.match(r"\d", lm_head)  # no number of its own to add
    assert "tied to the token embedding" in header and "weight sharing" in header


def test_an_untied_lm_head_would_be_counted_like_the_others() -> None:
    counts = ParameterCounts(token_embedding=100, position_embedding=20, attention=30, feed_forward=40,
                             layer_norm=5, lm_head=100, total=295)  # fmt: skip
    rows = dict(_parameter_rows(counts))
    assert rows["parameters"] == "295 total"
    assert rows["  lm_head"].strip() == "100" and "(the sum of the lines above)" in rows["  total"]
    tied = dict(_parameter_rows(ParameterCounts(100, 20, 30, 40, 5, 100, 195)))
    assert "tied" in tied["  lm_head"] and tied["  total"].split()[0] == "195"
