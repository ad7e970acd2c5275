"""Client.score / score_batch (sync and async) and ``gpt2-client score``, against a live server."""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Sequence
from typing import Any

import pytest
import torch
import transformers
from gpt2_client import (
    AsyncClient,
    Client,
    InvalidArgumentError,
    ScoredToken,
    ScoreItem,
    ScoreResult,
    UnavailableError,
)
from gpt2_service.model.weights import LoadedModel

from tests.api_helpers import API_ENGINE_CONFIG, serve
from tests.test_client_cli import _cli

EOS = 50256
TEXT = "The cat sat on the mat, and the dog sat on the log."
CONTEXT = "Once upon a time"
RANK_SLACK = 1e-4  # logprobs this close to the scored token's may rank either side of it (float rounding)


def _tokenize(client: Client, text: str) -> list[int]:
    return client.inspect.tokenize(text).token_ids


def _check_consistent(result: ScoreResult) -> None:
    """Every scored token has a rank >= 1 and a logprob <= 0; the totals agree with the tokens."""
    assert isinstance(result, ScoreResult) and result.tokens
    assert all(isinstance(t, ScoredToken) and t.rank >= 1 and t.logprob <= 0.0 for t in result.tokens)
    assert result.total_logprob == pytest.approx(sum(t.logprob for t in result.tokens), abs=1e-9)
    assert result.mean_nll == pytest.approx(-result.total_logprob / len(result.tokens), abs=1e-9)
    assert result.perplexity == pytest.approx(math.exp(result.mean_nll), rel=1e-9)
    assert result.usage.completion_tokens == 0


def _reference(hf: transformers.GPT2LMHeadModel, ids: list[int]) -> list[tuple[float, int, int]]:
    """Hugging Face's logprob of each token after the first, and the bounds of its rank."""
    with torch.no_grad():
        logprobs = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), dim=-1)
    rows = []
    for position in range(1, len(ids)):
        row = logprobs[position - 1]
        logprob = float(row[ids[position]])
        rank_low = 1 + int((row > logprob + RANK_SLACK).sum())
        rank_high = 1 + int((row > logprob - RANK_SLACK).sum()) - 1
        rows.append((logprob, rank_low, max(rank_low, rank_high)))
    return rows


def _same_scores(a: Sequence[ScoredToken], b: Sequence[ScoredToken], tolerance: float = 1e-6) -> None:
    assert [(t.id, t.text) for t in a] == [(t.id, t.text) for t in b]
    assert [t.logprob for t in a] == pytest.approx([t.logprob for t in b], abs=tolerance)


# -- the library ----------------------------------------------------------------------------------


async def test_score_gives_every_token_but_the_first_its_logprob_and_rank(
    tiny: LoadedModel, hf_tiny: transformers.GPT2LMHeadModel
) -> None:
    async with serve(tiny) as served:
        with Client(served.target, timeout=30) as client:
            ids = await asyncio.to_thread(_tokenize, client, TEXT)
            by_text = await asyncio.to_thread(lambda: client.score(TEXT, top_logprobs=3, request_id="score-1"))
            by_ids = await asyncio.to_thread(lambda: client.score(token_ids=ids))
    assert len(ids) > 10
    _check_consistent(by_text)
    _check_consistent(by_ids)
    assert by_text.request_id == "score-1" and by_ids.request_id  # echoed, or generated
    assert [t.id for t in by_text.tokens] == ids[1:]  # the first token has nothing to be predicted from
    assert "".join(t.text for t in by_text.tokens) == TEXT[len("The") :]
    assert by_text.usage.prompt_tokens == by_ids.usage.prompt_tokens == len(ids)
    _same_scores(by_text.tokens, by_ids.tokens)
    for token, (logprob, rank_low, rank_high) in zip(by_text.tokens, _reference(hf_tiny, ids), strict=True):
        assert token.logprob == pytest.approx(logprob, abs=1e-4)
        assert rank_low <= token.rank <= rank_high
        assert len(token.top_logprobs) == 3
        top = [x.logprob for x in token.top_logprobs]
        assert top == sorted(top, reverse=True) and top[0] >= token.logprob - 1e-6
        assert (token.top_logprobs[0].id == token.id) == (token.rank == 1)
    assert by_ids.tokens[0].top_logprobs == ()  # none asked for


async def test_context_and_add_bos_score_every_input_token(tiny: LoadedModel) -> None:
    async with serve(tiny) as served:
        with Client(served.target, timeout=30) as client:
            ids = await asyncio.to_thread(_tokenize, client, TEXT)
            context_ids = await asyncio.to_thread(_tokenize, client, CONTEXT)
            with_bos = await asyncio.to_thread(lambda: client.score(TEXT, add_bos=True))
            after_eos = await asyncio.to_thread(lambda: client.score(TEXT, context_token_ids=[EOS]))
            with_context = await asyncio.to_thread(lambda: client.score(TEXT, context=CONTEXT))
            joined = await asyncio.to_thread(lambda: client.score(token_ids=context_ids + ids))
            both = await asyncio.to_thread(lambda: client.score(token_ids=ids, context=CONTEXT, add_bos=True))
            from_bos = await asyncio.to_thread(lambda: client.score(token_ids=[EOS, *context_ids, *ids]))
    for result in (with_bos, after_eos, with_context, both):
        _check_consistent(result)
        assert [t.id for t in result.tokens] == ids  # every input token, the first included
    assert with_bos.usage.prompt_tokens == after_eos.usage.prompt_tokens == len(ids) + 1
    assert with_context.usage.prompt_tokens == len(context_ids) + len(ids)
    assert both.usage.prompt_tokens == 1 + len(context_ids) + len(ids)
    _same_scores(with_bos.tokens, after_eos.tokens)  # add_bos is <|endoftext|> read first
    # A context is read, not scored: the input's tokens score as they do after it in one text.
    _same_scores(with_context.tokens, joined.tokens[len(context_ids) - 1 :], tolerance=1e-4)
    _same_scores(both.tokens, from_bos.tokens[len(context_ids) :], tolerance=1e-4)
    assert with_context.total_logprob != pytest.approx(with_bos.total_logprob, abs=1e-6)  # the context counts


async def test_score_batch_answers_in_order_like_single_calls(tiny: LoadedModel) -> None:
    items: list[str | list[int] | ScoreItem] = [
        TEXT,
        [464, 3797, 3332, 319, 262, 2603],
        {"text": "Hello world, hello again", "add_bos": True, "request_id": "third"},
        {"token_ids": [40, 1101, 257, 3290], "context_token_ids": [48, 25], "top_logprobs": 1},
    ]
    async with serve(tiny) as served:
        with Client(served.target, timeout=30) as client:
            batch = await asyncio.to_thread(client.score_batch, items, top_logprobs=2, context=CONTEXT)
            singles = [
                await asyncio.to_thread(lambda: client.score(TEXT, top_logprobs=2, context=CONTEXT)),
                await asyncio.to_thread(
                    lambda: client.score(token_ids=[464, 3797, 3332, 319, 262, 2603], top_logprobs=2, context=CONTEXT)
                ),
                await asyncio.to_thread(
                    lambda: client.score("Hello world, hello again", add_bos=True, top_logprobs=2, context=CONTEXT)
                ),
                # an item's own context replaces the shared one
                await asyncio.to_thread(
                    lambda: client.score(token_ids=[40, 1101, 257, 3290], context_token_ids=[48, 25], top_logprobs=1)
                ),
            ]
    assert len(batch) == len(singles) == 4
    for got, want in zip(batch, singles, strict=True):
        _check_consistent(got)
        _same_scores(got.tokens, want.tokens)
        assert [t.rank for t in got.tokens] == [t.rank for t in want.tokens]
        assert [len(t.top_logprobs) for t in got.tokens] == [len(t.top_logprobs) for t in want.tokens]
        assert got.usage == want.usage
    assert batch[2].request_id == "third" and len({r.request_id for r in batch}) == 4
    assert [len(r.tokens) for r in batch[1:]] == [6, 5, 4]  # with a context or add_bos, every token


async def test_async_client_scores_like_the_sync_one(tiny: LoadedModel) -> None:
    async with serve(tiny) as served:
        with Client(served.target, timeout=30) as client:
            sync = await asyncio.to_thread(lambda: client.score(TEXT, context=CONTEXT, top_logprobs=2))
        async with AsyncClient(served.target, timeout=30) as aclient:
            ids = (await aclient.inspect.tokenize(TEXT)).token_ids
            unary = await aclient.score(TEXT, context=CONTEXT, top_logprobs=2)
            plain = await aclient.score(token_ids=ids)
            items = [{"token_ids": ids, "context": None}, "Hello world"]
            batch = await aclient.score_batch(items, context=CONTEXT)  # type: ignore[arg-type]  # None is "not given"
            with pytest.raises(InvalidArgumentError) as caught:
                await aclient.score(TEXT, top_logprobs=21)
    _check_consistent(unary)
    _same_scores(unary.tokens, sync.tokens)
    assert [t.rank for t in unary.tokens] == [t.rank for t in sync.tokens]
    assert all(len(t.top_logprobs) == 2 for t in unary.tokens)
    assert [t.id for t in plain.tokens] == ids[1:] and [t.id for t in unary.tokens] == ids
    _same_scores(batch[0].tokens, unary.tokens)  # an item's None context is not given: the shared one applies
    assert [t.text for t in batch[1].tokens] == ["Hello", " world"]  # in order; after the context, both scored
    assert "top_logprobs" in [v.field for v in caught.value.violations]


# -- errors ---------------------------------------------------------------------------------------


def _misuses(client: Client | AsyncClient) -> list[tuple[type[Exception], str, Any]]:
    return [
        (ValueError, "exactly one of text and token_ids", lambda: client.score(TEXT, token_ids=[1, 2])),
        (ValueError, "exactly one of text and token_ids", lambda: client.score()),
        (ValueError, "at most one of context", lambda: client.score(TEXT, context="a", context_token_ids=[1])),
        (ValueError, "priority must be one of", lambda: client.score(TEXT, priority="urgent")),  # type: ignore[arg-type]
        (TypeError, "token_ids=", lambda: client.score([464, 3797])),  # type: ignore[arg-type]
        (ValueError, "exactly one of text", lambda: client.score_batch([{"text": TEXT, "token_ids": [1]}])),
        (TypeError, "not one text", lambda: client.score_batch(TEXT)),
        (
            TypeError,
            "unknown score parameter.*tempreature",
            lambda: client.score_batch([{"text": "x", "tempreature": 1}]),  # type: ignore[list-item]
        ),
    ]


def test_misuse_raises_before_any_call() -> None:
    # Nothing listens on port 1: a call that went out would raise UnavailableError instead.
    with Client("127.0.0.1:1", timeout=5) as client:
        for error, match, misuse in _misuses(client):
            with pytest.raises(error, match=match):
                misuse()
        with pytest.raises(UnavailableError):  # and a well-formed one does go out
            client.score(TEXT)


async def test_async_misuse_raises_before_any_call() -> None:
    async with AsyncClient("127.0.0.1:1", timeout=5) as client:
        for error, match, misuse in _misuses(client):
            with pytest.raises(error, match=match):
                await misuse()
        with pytest.raises(UnavailableError):
            await client.score(TEXT)


async def test_invalid_arguments_raise_naming_the_field(tiny: LoadedModel) -> None:
    async with serve(tiny) as served:
        with Client(served.target, timeout=30) as client:
            with pytest.raises(InvalidArgumentError) as single:
                await asyncio.to_thread(lambda: client.score(TEXT, top_logprobs=21, request_id="bad-1"))
            with pytest.raises(InvalidArgumentError) as batch:
                await asyncio.to_thread(client.score_batch, [TEXT, {"text": TEXT, "top_logprobs": 21}])
            with pytest.raises(InvalidArgumentError) as ids:
                await asyncio.to_thread(lambda: client.score(token_ids=[464, 50300]))
    assert [v.field for v in single.value.violations] == ["top_logprobs"]
    assert single.value.request_id == "bad-1" and single.value.reason == "INVALID_ARGUMENT"
    assert [v.field for v in batch.value.violations] == ["requests[1].top_logprobs"]
    assert "token_ids.ids[1]" in [v.field for v in ids.value.violations]


async def test_what_does_not_fit_the_window_is_refused_not_truncated(tiny: LoadedModel) -> None:
    window = API_ENGINE_CONFIG.context_window
    ids = [(464 + 7 * i) % 50000 for i in range(window)]
    async with serve(tiny) as served:
        with Client(served.target, timeout=30) as client:
            fits = await asyncio.to_thread(lambda: client.score(token_ids=ids))
            refused = []
            for call in (
                lambda: client.score(token_ids=ids, add_bos=True),
                lambda: client.score(token_ids=ids[1:], context_token_ids=ids[:2]),
                lambda: client.score(token_ids=[*ids, 464]),
            ):
                with pytest.raises(InvalidArgumentError) as caught:
                    await asyncio.to_thread(call)
                refused.append(caught.value.reason)
    assert len(fits.tokens) == window - 1 and fits.usage.prompt_tokens == window
    assert fits.usage.truncated_prompt_tokens == 0
    assert refused == ["PROMPT_TOO_LONG"] * 3


# -- the command line ------------------------------------------------------------------------------

_ROW = re.compile(r"^ *(\d+)  ('.*'|\".*\") +(-?\d+\.\d{4})  rank (\d+)$")


def _rows(out: str) -> list[tuple[int, str, float, int]]:
    rows = []
    for line in out.splitlines():
        match = _ROW.match(line)
        if match:
            rows.append((int(match[1]), match[2], float(match[3]), int(match[4])))
    return rows


async def test_cli_score_prints_each_token_and_the_totals(tiny: LoadedModel) -> None:
    async with serve(tiny) as served:
        status, out, err = await _cli("score", TEXT, "--json", target=served.target)
        assert status == 0, err
        status, text, summary = await _cli("score", TEXT, "--request-id", "cli-1", target=served.target)
        assert status == 0, summary
        status, bos, _ = await _cli("score", TEXT, "--add-bos", "--top-logprobs", "2", target=served.target)
        assert status == 0
        status, context, _ = await _cli("score", TEXT, "--context", CONTEXT, "--json", target=served.target)
        assert status == 0
        status, bad_out, bad_err = await _cli("score", TEXT, "--top-logprobs", "21", target=served.target)
    result = json.loads(out)
    assert set(result) == {"request_id", "tokens", "total_logprob", "mean_nll", "perplexity", "usage", "timing"}
    tokens = result["tokens"]
    assert set(tokens[0]) == {"id", "text", "logprob", "rank", "top_logprobs"}
    assert result["total_logprob"] == pytest.approx(sum(t["logprob"] for t in tokens), abs=1e-9)
    assert result["usage"]["prompt_tokens"] == len(tokens) + 1

    rows = _rows(text)  # position in the input, the token repr'd, its logprob, its rank
    assert rows == [(i + 1, repr(t["text"]), round(t["logprob"], 4), t["rank"]) for i, t in enumerate(tokens)]
    assert f"{len(tokens)} tokens scored: total logprob {result['total_logprob']:.4f}" in text
    assert f"mean NLL {result['mean_nll']:.4f}, perplexity {result['perplexity']:.4f}" in text
    assert "first token is not scored" in text
    assert "request cli-1" in summary

    assert [row[0] for row in _rows(bos)] == list(range(len(tokens) + 1))  # the first token too
    assert "first token is not scored" not in bos
    assert bos.count("  top: ") == len(tokens) + 1
    assert len(json.loads(context)["tokens"]) == len(tokens) + 1

    assert status == 1 and bad_out == ""
    assert "INVALID_ARGUMENT" in bad_err and "top_logprobs" in bad_err
