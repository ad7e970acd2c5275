"""The keyword arguments of a generation, and the GenerateRequest they become (and those of a
Score, and the ScoreRequest they become).

Every parameter is optional; one left out takes the server's default (documented in
proto/gpt2/v1/generation.proto): temperature 1, no top-k/top-p/min-p/typical-p filtering, no
penalties, no logit bias, every token allowed, a server-chosen seed, the server's default
max_new_tokens, no stop strings or bad words, no constraint, one completion, no echo.

A constraint is at most one of ``regex``, ``json_schema``, ``choice`` and ``grammar`` (the
server masks the tokens that cannot continue a match, and ends with CONSTRAINT_COMPLETE once
the output matches and nothing can follow); giving two is a ValueError, before any call.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, TypedDict

from gpt2_client.proto import common_pb2
from gpt2_client.proto import generation_pb2 as pb

Prompt = str | Sequence[int]  # text, or GPT-2 token ids


class GenerationParams(TypedDict, total=False):
    """Sampling and stopping, as plain keyword arguments (``temperature=0.7, stop=["\\n"]``)."""

    temperature: float  # 0 = greedy
    top_k: int
    top_p: float
    min_p: float
    typical_p: float
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    seed: int
    logit_bias: Mapping[int, float]  # token id -> bias in [-100, 100] added to its logit (at most 1024)
    allowed_token_ids: Sequence[int]  # only these tokens may be generated (at most 4096)
    banned_token_ids: Sequence[int]  # these tokens are never generated (at most 4096)
    max_new_tokens: int
    min_new_tokens: int
    stop: str | Sequence[str]
    stop_token_ids: Sequence[int]
    ignore_eos: bool
    include_stop_in_output: bool
    bad_words: str | Sequence[str]  # strings never completed in the output (at most 64, 1-256 chars each)
    # The constraint, at most one of the four: what the whole output must match.
    regex: str  # a regular expression (Rust syntax, anchored at both ends; at most 4096 chars)
    json_schema: str | Mapping[str, Any]  # a JSON Schema (text, or a dict sent as json.dumps of it)
    choice: Sequence[str]  # the output is exactly one of these strings (1-256 distinct, non-empty)
    grammar: str  # a Lark grammar (llguidance's dialect): the output is a sentence of its start rule
    truncation: Literal["truncate_left", "reject"]  # a prompt longer than the context window
    overflow: Literal["shift", "stop"]  # a generation that fills the context window
    priority: Literal["interactive", "default", "batch"]  # its class under contention
    top_logprobs: int  # 0-20 alternatives per token
    n: int  # completions of the prompt, read once (1 to the server's max_choices); choice i has seed + i
    echo: bool  # also return the prompt's tokens with their logprobs and ranks (Generation.prompt_tokens)
    request_id: str  # echoed back and logged by the server; generated if not given


class BatchItem(GenerationParams, total=False):
    """One item of ``generate_batch``: a prompt and its own parameters."""

    prompt: Prompt


SAMPLING_KEYS = (
    "temperature", "top_k", "top_p", "min_p", "typical_p",
    "repetition_penalty", "presence_penalty", "frequency_penalty", "seed",
)  # fmt: skip
STOPPING_KEYS = ("max_new_tokens", "min_new_tokens", "ignore_eos", "include_stop_in_output")
KNOWN_KEYS = frozenset(GenerationParams.__optional_keys__)
TRUNCATION = {"truncate_left": pb.TRUNCATE_LEFT, "reject": pb.REJECT}
OVERFLOW = {"shift": pb.SHIFT, "stop": pb.STOP}
PRIORITY = {"interactive": pb.PRIORITY_INTERACTIVE, "default": pb.PRIORITY_DEFAULT, "batch": pb.PRIORITY_BATCH}
CONSTRAINT_KEYS = ("regex", "json_schema", "choice", "grammar")  # the kinds of Constraint, at most one


def _choice(table: Mapping[str, int], name: str, value: str) -> Any:
    if value not in table:
        raise ValueError(f"{name} must be one of {', '.join(table)}, got {value!r}")
    return table[value]


def _ids(name: str, value: Any) -> list[int]:
    """Token ids given as a sequence (or set) of ints; a str, bytes or mapping is a TypeError."""
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a sequence of token ids, got {type(value).__name__}")
    return list(value)


def _strings(name: str, value: Any) -> list[str]:
    """A sequence of strings; a lone str is one string (as ``stop`` takes it)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, bytes | Mapping) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a sequence of strings, got {type(value).__name__}")
    return list(value)


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    return value


def build_constraint(given: Mapping[str, Any]) -> pb.Constraint | None:
    """The Constraint of the one constraint keyword in ``given`` (None-valued keys already
    dropped); None when there is none; two or more is a ValueError."""
    kinds = [key for key in CONSTRAINT_KEYS if key in given]
    if len(kinds) > 1:
        raise ValueError(f"at most one constraint (regex, json_schema, choice, grammar), got {', '.join(kinds)}")
    if not kinds:
        return None
    kind, value = kinds[0], given[kinds[0]]
    if kind == "choice":
        if isinstance(value, str):
            raise TypeError("choice must be a sequence of strings (the options), not one str")
        return pb.Constraint(choice=pb.ChoiceList(options=_strings("choice", value)))
    if kind == "json_schema" and isinstance(value, Mapping):
        return pb.Constraint(json_schema=json.dumps(dict(value)))
    if kind == "json_schema" and not isinstance(value, str):
        raise TypeError(f"json_schema must be a str or a dict, got {type(value).__name__}")
    constraint = pb.Constraint()
    setattr(constraint, kind, _text(kind, value))  # regex, json_schema or grammar
    return constraint


def build_request(prompt: Prompt, params: Mapping[str, Any]) -> pb.GenerateRequest:
    """A GenerateRequest; parameters that are None or absent are left unset (server default).
    Unknown names are a TypeError, two constraints a ValueError, before anything is sent."""
    unknown = set(params) - KNOWN_KEYS
    if unknown:
        raise TypeError(f"unknown generation parameter(s): {', '.join(sorted(unknown))}")
    given = {k: v for k, v in params.items() if v is not None}
    constraint = build_constraint(given)
    request = pb.GenerateRequest(
        request_id=given.get("request_id", ""),
        top_logprobs=given.get("top_logprobs", 0),
        n=given.get("n", 0),
        echo=given.get("echo", False),
    )
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        request.prompt_token_ids.CopyFrom(common_pb2.TokenIds(ids=list(prompt)))
    for key in SAMPLING_KEYS:
        if key in given:
            setattr(request.sampling, key, given[key])
    for key in STOPPING_KEYS:
        if key in given:
            setattr(request.stopping, key, given[key])
    stop = given.get("stop", ())
    request.stopping.stop.extend([stop] if isinstance(stop, str) else stop)
    request.stopping.stop_token_ids.extend(given.get("stop_token_ids", ()))
    request.stopping.bad_words.extend(_strings("bad_words", given.get("bad_words", ())))
    if "logit_bias" in given:
        bias = given["logit_bias"]
        if not isinstance(bias, Mapping):
            raise TypeError(f"logit_bias must be a mapping of token id to bias, got {type(bias).__name__}")
        request.sampling.logit_bias.update(bias)
    request.sampling.allowed_token_ids.extend(_ids("allowed_token_ids", given.get("allowed_token_ids", ())))
    request.sampling.banned_token_ids.extend(_ids("banned_token_ids", given.get("banned_token_ids", ())))
    if constraint is not None:
        request.constraint.CopyFrom(constraint)
    if "truncation" in given:
        request.truncation = _choice(TRUNCATION, "truncation", given["truncation"])
    if "overflow" in given:
        request.overflow = _choice(OVERFLOW, "overflow", given["overflow"])
    if "priority" in given:
        request.priority = _choice(PRIORITY, "priority", given["priority"])
    return request


def build_batch(items: Sequence[Prompt | BatchItem], params: Mapping[str, Any]) -> pb.GenerateBatchRequest:
    """Each item is a prompt (taking ``params``) or a BatchItem (its keys override ``params``; an
    item that names a constraint, not None, replaces the shared one, whichever kind either is)."""
    requests = []
    for item in items:
        if isinstance(item, Mapping):
            own_constraint = any(item.get(key) is not None for key in CONSTRAINT_KEYS)
            shared = {k: v for k, v in params.items() if not (own_constraint and k in CONSTRAINT_KEYS)}
            merged: dict[str, Any] = {**shared, **item}
            requests.append(build_request(merged.pop("prompt", ""), merged))
        else:
            requests.append(build_request(item, params))
    return pb.GenerateBatchRequest(requests=requests)


# -- Score ---------------------------------------------------------------------------------------


class ScoreParams(TypedDict, total=False):
    """The keyword arguments of a Score request besides its input (proto ScoreRequest)."""

    context: str  # conditioned on, not scored
    context_token_ids: Sequence[int]  # the same, as token ids (at most one of the two)
    add_bos: bool  # prepend <|endoftext|> so that the first token is scored too
    top_logprobs: int  # 0-20 most likely tokens at each scored position
    priority: Literal["interactive", "default", "batch"]  # its class under contention
    request_id: str  # echoed back and logged by the server; generated if not given


class ScoreItem(ScoreParams, total=False):
    """One item of ``score_batch``: its input (``text`` or ``token_ids``) and its own parameters."""

    text: str
    token_ids: Sequence[int]


SCORE_KEYS = frozenset(ScoreItem.__optional_keys__)
_CONTEXT_KEYS = frozenset({"context", "context_token_ids"})


def _token_ids(name: str, value: Any) -> common_pb2.TokenIds:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of token ids, got {type(value).__name__}")
    return common_pb2.TokenIds(ids=list(value))


def build_score_request(params: Mapping[str, Any]) -> pb.ScoreRequest:
    """A ScoreRequest from ScoreItem keys (None = absent). Exactly one of text / token_ids, at
    most one of context / context_token_ids: anything else is a ValueError, before any call."""
    unknown = set(params) - SCORE_KEYS
    if unknown:
        raise TypeError(f"unknown score parameter(s): {', '.join(sorted(unknown))}")
    given = {k: v for k, v in params.items() if v is not None}
    if ("text" in given) == ("token_ids" in given):
        raise ValueError("score needs exactly one of text and token_ids")
    if all(key in given for key in _CONTEXT_KEYS):
        raise ValueError("score takes at most one of context and context_token_ids")
    request = pb.ScoreRequest(
        request_id=given.get("request_id", ""),
        add_bos=bool(given.get("add_bos", False)),
        top_logprobs=given.get("top_logprobs", 0),
    )
    if "text" in given:
        if not isinstance(given["text"], str):
            raise TypeError(f"text must be a str (token ids go in token_ids=), got {type(given['text']).__name__}")
        request.text = given["text"]
    else:
        request.token_ids.CopyFrom(_token_ids("token_ids", given["token_ids"]))
    if "context" in given:
        if not isinstance(given["context"], str):
            raise TypeError(
                f"context must be a str (token ids go in context_token_ids=), got {type(given['context']).__name__}"
            )
        request.context_text = given["context"]
    elif "context_token_ids" in given:
        request.context_token_ids.CopyFrom(_token_ids("context_token_ids", given["context_token_ids"]))
    if "priority" in given:
        request.priority = _choice(PRIORITY, "priority", given["priority"])
    return request


def build_score_batch(items: Sequence[Prompt | ScoreItem], params: Mapping[str, Any]) -> pb.ScoreBatchRequest:
    """Each item is a text, token ids, or a ScoreItem (its keys override ``params``; one that is
    None is not given; an item that names a context replaces the shared one, whichever form
    either takes)."""
    if isinstance(items, str | bytes):
        raise TypeError("score_batch takes a sequence of items, not one text")
    if "text" in params or "token_ids" in params:
        raise TypeError("score_batch takes its inputs as items, not as text= or token_ids=")
    requests = []
    for item in items:
        if isinstance(item, Mapping):
            own = {k: v for k, v in item.items() if v is not None}
            shared = {k: v for k, v in params.items() if not (k in _CONTEXT_KEYS and own.keys() & _CONTEXT_KEYS)}
            requests.append(build_score_request({**shared, **own}))
        elif isinstance(item, str):
            requests.append(build_score_request({**params, "text": item}))
        else:
            requests.append(build_score_request({**params, "token_ids": item}))
    return pb.ScoreBatchRequest(requests=requests)
