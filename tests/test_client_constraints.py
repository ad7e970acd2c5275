"""Constrained generation through Client / AsyncClient and ``gpt2-client generate``, against a live
server: the constraint keywords (regex, json_schema, choice, grammar) and the token keywords
(logit_bias, allowed_token_ids, banned_token_ids, bad_words) reach it and shape the output; two
constraints fail before anything is sent; a bad one is the server's INVALID_ARGUMENT naming its
field; FinishReason.CONSTRAINT_COMPLETE / CONSTRAINT_UNSATISFIED come back from protobuf."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from gpt2_client import AsyncClient, Client, FinishReason, InvalidArgumentError, StreamChunk
from gpt2_client.cli import _generation_params, build_parser
from gpt2_client.params import build_batch, build_request
from gpt2_client.proto import generation_pb2 as pb
from gpt2_client.results import chunk_from_proto, generation_from_proto
from gpt2_service.model.weights import LoadedModel

from tests.api_helpers import serve
from tests.test_client_cli import _cli

DATE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "age"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z]{1,8}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
    },
}
OPTIONS = ("positive", "negative", "neutral")
PROMPT_IDS = [464, 3797, 3332, 319, 262]  # "The cat sat on the"
GREEDY: dict[str, Any] = {"temperature": 0.0, "ignore_eos": True}
SAMPLED: dict[str, Any] = {"temperature": 1.0, "max_new_tokens": 100}  # room to finish the match


# -- the constraints ------------------------------------------------------------------------------


async def test_regex_sync_async_and_streamed_give_a_matching_date_and_constraint_complete(tiny: LoadedModel) -> None:
    async with serve(tiny) as served:
        with Client(served.target, timeout=30) as client:
            sync = [
                await asyncio.to_thread(lambda s=seed: client.generate("Date:", regex=DATE, seed=s, **SAMPLED))
                for seed in range(6)
            ]
        async with AsyncClient(served.target, timeout=30) as aclient:
            asynced = [await aclient.generate("Date:", regex=DATE, seed=seed, **SAMPLED) for seed in range(6)]
            chunks: list[StreamChunk] = [c async for c in aclient.stream("Date:", regex=DATE, seed=0, **SAMPLED)]
    for result in sync + asynced:
        assert result.finish_reason is FinishReason.CONSTRAINT_COMPLETE, result
        assert re.fullmatch(DATE, result.text), result.text
        assert result.choices[0].finish_reason is FinishReason.CONSTRAINT_COMPLETE
    assert [r.text for r in sync] == [r.text for r in asynced]  # the same seeded requests
    assert len({r.text for r in sync}) > 1  # sampled, not one forced answer
    assert "".join(c.text for c in chunks) == sync[0].text
    assert chunks[-1].finish_reason is FinishReason.CONSTRAINT_COMPLETE
    assert all(c.finish_reason is None for c in chunks[:-1])


async def test_json_schema_as_a_dict_gives_valid_json_and_equals_the_schema_text(tiny: LoadedModel) -> None:
    async with serve(tiny) as served:
        with Client(served.target, timeout=60) as client:
            from_dict = [
                await asyncio.to_thread(
                    lambda s=seed: client.generate("Answer:", json_schema=SCHEMA, seed=s, max_new_tokens=200)
                )
                for seed in range(4)
            ]
            from_text = await asyncio.to_thread(
                lambda: client.generate("Answer:", json_schema=json.dumps(SCHEMA), seed=0, max_new_tokens=200)
            )
        async with AsyncClient(served.target, timeout=60) as aclient:
            asynced = await aclient.generate("Answer:", json_schema=SCHEMA, seed=1, max_new_tokens=200)
    for result in [*from_dict, asynced]:
        assert result.finish_reason is FinishReason.CONSTRAINT_COMPLETE, result.text
        jsonschema.validate(json.loads(result.text), SCHEMA)
    assert from_text.text == from_dict[0].text  # the dict is sent as json.dumps of it
    assert asynced.text == from_dict[1].text


async def test_choice_gives_one_of_the_options_and_grammar_a_sentence(tiny: LoadedModel) -> None:
    grammar = 'start: greeting " " name\ngreeting: "hello" | "hi"\nname: /[A-Z][a-z]{1,6}/'
    async with serve(tiny) as served:
        with Client(served.target, timeout=30) as client:
            chosen = [
                await asyncio.to_thread(lambda s=seed: client.generate("Mood:", choice=list(OPTIONS), seed=s))
                for seed in range(12)
            ]
            sentence = await asyncio.to_thread(lambda: client.generate("Say:", grammar=grammar, seed=2, **SAMPLED))
        async with AsyncClient(served.target, timeout=30) as aclient:
            achosen = await aclient.generate("Mood:", choice=OPTIONS, seed=3)
    assert {r.finish_reason for r in chosen} == {FinishReason.CONSTRAINT_COMPLETE}
    assert {r.text for r in chosen} <= set(OPTIONS) and len({r.text for r in chosen}) > 1
    assert achosen.text == chosen[3].text and achosen.finish_reason is FinishReason.CONSTRAINT_COMPLETE
    assert sentence.finish_reason is FinishReason.CONSTRAINT_COMPLETE
    assert re.fullmatch(r"(hello|hi) [A-Z][a-z]{1,6}", sentence.text), sentence.text


async def test_a_constraint_cut_short_ends_constraint_unsatisfied(tiny: LoadedModel) -> None:
    async with serve(tiny) as served:
        with Client(served.target, timeout=30) as client:
            result = await asyncio.to_thread(
                lambda: client.generate("N:", regex=r"[0-9]{60}", seed=5, temperature=1.0, max_new_tokens=6)
            )
    assert result.finish_reason is FinishReason.CONSTRAINT_UNSATISFIED
    assert result.finish_reason.value == "constraint_unsatisfied"
    assert len(result.token_ids) == 6 and re.fullmatch(r"[0-9]+", result.text), result.text  # a beginning


# -- the token keywords ---------------------------------------------------------------------------


async def test_logit_bias_forces_a_token_at_every_step(tiny: LoadedModel) -> None:
    async with serve(tiny) as served:
        with Client(served.target, timeout=30) as client:
            plain = await asyncio.to_thread(lambda: client.generate(PROMPT_IDS, max_new_tokens=8, **GREEDY))
            forced = await asyncio.to_thread(
                lambda: client.generate(PROMPT_IDS, max_new_tokens=8, logit_bias={1000: 100}, **GREEDY)
            )
        async with AsyncClient(served.target, timeout=30) as aclient:
            aforced = await aclient.generate(PROMPT_IDS, max_new_tokens=8, logit_bias={1000: 100.0}, **GREEDY)
    assert plain.token_ids != (1000,) * 8  # without the bias the model picks otherwise
    assert forced.token_ids == (1000,) * 8 and aforced.token_ids == (1000,) * 8
    assert all(t.logprob > -1e-3 for t in forced.tokens)  # the biased distribution's logprob


async def test_allowed_and_banned_token_ids_and_bad_words_reach_the_server(tiny: LoadedModel) -> None:
    allowed = (11, 13, 262, 290, 1000)
    async with serve(tiny) as served:
        with Client(served.target, timeout=30) as client:
            plain = await asyncio.to_thread(lambda: client.generate(PROMPT_IDS, max_new_tokens=16, **GREEDY))
            only = await asyncio.to_thread(
                lambda: client.generate(
                    PROMPT_IDS, max_new_tokens=24, allowed_token_ids=allowed, temperature=1.0, seed=3, ignore_eos=True
                )
            )
            banned = await asyncio.to_thread(
                lambda: client.generate(
                    PROMPT_IDS, max_new_tokens=16, banned_token_ids=sorted(set(plain.token_ids)), **GREEDY
                )
            )
            word = await asyncio.to_thread(lambda: client.inspect.detokenize(plain.token_ids[3:5]))
            avoided = await asyncio.to_thread(
                lambda: client.generate(PROMPT_IDS, max_new_tokens=16, bad_words=[word], **GREEDY)
            )
        async with AsyncClient(served.target, timeout=30) as aclient:
            aonly = await aclient.generate(
                PROMPT_IDS, max_new_tokens=24, allowed_token_ids=allowed, temperature=1.0, seed=3, ignore_eos=True
            )
    assert set(only.token_ids) <= set(allowed) and len(set(only.token_ids)) > 1
    assert aonly.token_ids == only.token_ids
    assert len(banned.token_ids) == 16 and not set(banned.token_ids) & set(plain.token_ids)
    assert avoided.token_ids[:4] == plain.token_ids[:4] and avoided.token_ids[4] != plain.token_ids[4]
    assert tuple(plain.token_ids[3:5]) not in set(itertools.pairwise(avoided.token_ids))


# -- local checks and errors ----------------------------------------------------------------------


async def test_two_constraints_are_a_value_error_before_anything_is_sent() -> None:
    # Nothing listens on port 1: a call that got as far as sending would be UnavailableError.
    with Client("127.0.0.1:1", timeout=5) as client:
        with pytest.raises(ValueError, match=r"got regex, choice$"):
            client.generate("x", regex="a+", choice=["a"])
        with pytest.raises(ValueError, match=r"got json_schema, grammar$"):
            client.stream("x", json_schema={"type": "string"}, grammar="start: /a/")
        with pytest.raises(ValueError, match="at most one constraint"):
            client.generate_batch(["a", {"prompt": "b", "choice": ["x"]}], regex="a+", grammar="start: /a/")
    async with AsyncClient("127.0.0.1:1", timeout=5) as aclient:
        with pytest.raises(ValueError, match=r"got regex, json_schema$"):
            await aclient.generate("x", regex="a+", json_schema="{}")


def test_the_keywords_become_the_request_fields() -> None:
    request = build_request(
        "x",
        {
            "logit_bias": {5: -100, 7: 2.5},
            "allowed_token_ids": (1, 2, 3),
            "banned_token_ids": [4],
            "bad_words": ["foo", " bar"],
            "json_schema": {"type": "integer"},
            "regex": None,  # None = not given: no conflict
        },
    )
    assert dict(request.sampling.logit_bias) == {5: -100.0, 7: 2.5}
    assert list(request.sampling.allowed_token_ids) == [1, 2, 3] and list(request.sampling.banned_token_ids) == [4]
    assert list(request.stopping.bad_words) == ["foo", " bar"]
    assert request.constraint.WhichOneof("kind") == "json_schema"
    assert json.loads(request.constraint.json_schema) == {"type": "integer"}
    assert list(build_request("x", {"choice": ("a", "b")}).constraint.choice.options) == ["a", "b"]
    assert build_request("x", {"grammar": "start: /a/"}).constraint.grammar == "start: /a/"
    assert build_request("x", {"bad_words": "one"}).stopping.bad_words == ["one"]  # a str is one word, as stop
    assert not build_request("x", {}).HasField("constraint")
    with pytest.raises(TypeError, match="choice"):
        build_request("x", {"choice": "yes"})  # one str is not a list of options
    with pytest.raises(TypeError, match="logit_bias"):
        build_request("x", {"logit_bias": [(1, 2.0)]})
    with pytest.raises(TypeError, match="banned_token_ids"):
        build_request("x", {"banned_token_ids": "12"})
    with pytest.raises(TypeError, match="regex"):
        build_request("x", {"regex": 5})
    # A batch item's constraint replaces the shared one, whichever kind either is.
    batch = build_batch(["a", {"prompt": "b", "choice": ["x", "y"]}], {"regex": "a+"})
    assert [r.constraint.WhichOneof("kind") for r in batch.requests] == ["regex", "choice"]


async def test_an_invalid_regex_is_invalid_argument_naming_constraint_regex(tiny: LoadedModel) -> None:
    async with serve(tiny) as served:
        with Client(served.target, timeout=30) as client, pytest.raises(InvalidArgumentError) as error:
            await asyncio.to_thread(lambda: client.generate("x", regex="(ab"))
        async with AsyncClient(served.target, timeout=30) as aclient:
            with pytest.raises(InvalidArgumentError) as aerror:
                await aclient.generate("x", choice=["a", "a"])
    assert [v.field for v in error.value.violations] == ["constraint.regex"]
    assert "unclosed group" in str(error.value)
    assert [v.field for v in aerror.value.violations] == ["constraint.choice.options"]


def test_the_new_finish_reasons_come_from_protobuf() -> None:
    for value, reason in [
        (pb.CONSTRAINT_COMPLETE, FinishReason.CONSTRAINT_COMPLETE),
        (pb.CONSTRAINT_UNSATISFIED, FinishReason.CONSTRAINT_UNSATISFIED),
    ]:
        assert generation_from_proto(pb.GenerateResponse(text="1", finish_reason=value)).finish_reason is reason
        assert chunk_from_proto(pb.GenerateStreamResponse(finish_reason=value)).finish_reason is reason
    assert FinishReason.CONSTRAINT_COMPLETE.value == "constraint_complete"


# -- the command line -----------------------------------------------------------------------------


def _request_of(*argv: str) -> pb.GenerateRequest:
    args = build_parser().parse_args(["generate", "x", *argv])
    return build_request(args.prompt, _generation_params(args))


def test_cli_flags_become_the_request_fields(tmp_path: Path) -> None:
    request = _request_of(
        "--logit-bias", "1000=100", "--logit-bias", "5=-2.5", "--allowed-token-ids", "1,2,3",
        "--allowed-token-ids", "4", "--banned-token-ids", "9", "--bad-word", "foo", "--bad-word", " bar",
    )  # fmt: skip
    assert dict(request.sampling.logit_bias) == {1000: 100.0, 5: -2.5}
    assert list(request.sampling.allowed_token_ids) == [1, 2, 3, 4] and list(request.sampling.banned_token_ids) == [9]
    assert list(request.stopping.bad_words) == ["foo", " bar"] and not request.HasField("constraint")
    plain = _request_of()
    assert not plain.sampling.logit_bias and not plain.sampling.allowed_token_ids and not plain.stopping.bad_words
    assert _request_of("--regex", DATE).constraint.regex == DATE
    assert list(_request_of("--choice", "yes", "--choice", "no").constraint.choice.options) == ["yes", "no"]
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    assert json.loads(_request_of("--json-schema", str(schema_file)).constraint.json_schema) == SCHEMA
    assert _request_of("--json-schema", '{"type": "integer"}').constraint.json_schema == '{"type": "integer"}'
    grammar = 'start: "a" | "b"\n'
    grammar_file = tmp_path / "g.lark"
    grammar_file.write_text(grammar)
    assert _request_of("--grammar", str(grammar_file)).constraint.grammar == grammar
    assert _request_of("--grammar", grammar).constraint.grammar == grammar  # not a file: the grammar itself


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--regex", "a", "--choice", "a"], "not allowed with argument"),
        (["--json-schema", "{}", "--grammar", "start: /a/"], "not allowed with argument"),
        (["--logit-bias", "1000"], "expected ID=BIAS"),
        (["--logit-bias=-1=2"], "token id is >= 0"),
        (["--allowed-token-ids", "1,x"], "comma-separated token ids"),
        (["--json-schema", "/nonexistent/schema.json"], "cannot read the JSON schema file"),
    ],
)
def test_bad_cli_flags_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["generate", "x", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


async def test_cli_generate_with_a_regex_choices_and_a_logit_bias(tiny: LoadedModel) -> None:
    async with serve(tiny) as served:
        t = served.target
        regex = await _cli("generate", "Date:", "--regex", DATE, "--max-new-tokens", "60", "--seed", "4", "--json",
                           target=t)  # fmt: skip
        choice = await _cli("generate", "Is it?", "--choice", "yes", "--choice", "no", "--seed", "1", target=t)
        biased = await _cli("generate", "The cat", "--logit-bias", "1000=100", "--temperature", "0",
                            "--max-new-tokens", "5", "--ignore-eos", "--json", target=t)  # fmt: skip
        cut = await _cli("generate", "N:", "--regex", "[0-9]{60}", "--max-new-tokens", "4", "--seed", "2",
                         "--stream", target=t)  # fmt: skip
        bad = await _cli("generate", "x", "--regex", "(ab", target=t)
    status, out, err = regex
    assert status == 0, err
    result = json.loads(out)
    assert result["finish_reason"] == "CONSTRAINT_COMPLETE" and re.fullmatch(DATE, result["text"]), result
    status, out, err = choice
    assert status == 0, err
    assert out in ("yes\n", "no\n") and "[CONSTRAINT_COMPLETE: " in err and "beginning of a match" not in err
    status, out, err = biased
    assert status == 0, err
    assert json.loads(out)["token_ids"] == [1000] * 5
    status, out, err = cut
    assert status == 0, err
    assert re.fullmatch(r"[0-9]+\n", out) and "[CONSTRAINT_UNSATISFIED: 4 tokens" in err
    assert "only the beginning of a match" in err
    status, out, err = bad
    assert status == 1 and out == "" and "INVALID_ARGUMENT" in err and "constraint.regex" in err
