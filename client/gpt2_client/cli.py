"""gpt2-client: generate or score text, show the model, or check health from the command line.

    gpt2-client generate "The cat sat on the" --max-new-tokens 20 --temperature 0.8 --seed 1
    gpt2-client generate "Once upon a time" --stream --stop "." --json
    gpt2-client generate "The cat sat on the" --n 3 --seed 7 --echo
    gpt2-client generate "Date:" --regex '[0-9]{4}-[0-9]{2}-[0-9]{2}'
    gpt2-client generate "Is it? " --choice yes --choice no --logit-bias 1000=-100 --bad-word maybe
    gpt2-client generate "The cat sat on the" --trace --max-new-tokens 5 --top-k 5 --seed 1 --png steps.png
    gpt2-client score " sat on the mat" --context "The cat" --top-logprobs 3
    gpt2-client info
    gpt2-client health --target gpt2.example:50051
    gpt2-client --target dns:///gpt2.ns.svc.cluster.local:50051 --tls-ca ca.pem info

Connection options have environment twins: GPT2_CLIENT_TARGET, GPT2_CLIENT_TLS_CA,
GPT2_CLIENT_TLS_CERT, GPT2_CLIENT_TLS_KEY and GPT2_CLIENT_TOKEN (prefer it to --token, which
other users of the machine can see in the process list).

Text goes to stdout and a one-line summary to stderr (and under it a note when the model has
random weights); --json prints JSON instead (one object, or one per line with --stream). Exit
status: 0 ok, 1 the call failed (or health is not SERVING), 2 bad command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from gpt2_client.cli_inspect import add_inspect_command, cmd_generation_trace
from gpt2_client.client import Client
from gpt2_client.errors import GPT2Error, UnavailableError
from gpt2_client.results import (
    FinishReason,
    Generation,
    HealthStatus,
    ModelInfo,
    ParameterCounts,
    ScoredToken,
    ScoreResult,
    StreamChunk,
    Token,
    Usage,
)

TARGET_ENV = "GPT2_CLIENT_TARGET"
TLS_CA_ENV = "GPT2_CLIENT_TLS_CA"
TLS_CERT_ENV = "GPT2_CLIENT_TLS_CERT"
TLS_KEY_ENV = "GPT2_CLIENT_TLS_KEY"
TOKEN_ENV = "GPT2_CLIENT_TOKEN"
DEFAULT_TARGET = "localhost:50051"
UNREACHABLE_HINT = "is a server running at {target}? (start one with: make run, or gpt2-serve; set --target or {env})"


def to_json(value: Any) -> Any:
    """Dataclasses, enums and tuples as plain JSON values (enums by name)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    return value


def _print_json(value: Any) -> None:
    print(json.dumps(to_json(value), ensure_ascii=False), flush=True)


def _plural(count: int, singular: str, plural: str) -> str:
    return f"{count} {singular if count == 1 else plural}"


def _summary(
    reason: str,
    tokens: int,
    seed: int | None,
    seconds: float,
    request_id: str,
    cached: int = 0,
    truncated: int = 0,
    shifts: int = 0,
) -> str:
    """The text-mode footer; prompt tokens cached, truncated and context shifts only when nonzero."""
    parts = [f"{tokens} tokens in {seconds:.2f}s", f"seed {seed}"]
    if cached:
        parts.append(f"{cached} prompt tokens cached")
    if truncated:
        parts.append(_plural(truncated, "prompt token truncated", "prompt tokens truncated"))
    if shifts:
        parts.append(_plural(shifts, "context shift", "context shifts"))
    return f"[{reason}: {', '.join(parts)}, request {request_id}]"


def _usage_summary(reason: str, usage: Usage, seed: int | None, seconds: float, request_id: str) -> str:
    return _summary(reason, usage.completion_tokens, seed, seconds, request_id, usage.cached_prompt_tokens,
                    usage.truncated_prompt_tokens, usage.context_shifts)  # fmt: skip


# -- commands ------------------------------------------------------------------------------------


def _generation_params(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p,
        "typical_p": args.typical_p, "repetition_penalty": args.repetition_penalty,
        "presence_penalty": args.presence_penalty, "frequency_penalty": args.frequency_penalty,
        "seed": args.seed, "max_new_tokens": args.max_new_tokens, "min_new_tokens": args.min_new_tokens,
        "stop": args.stop, "stop_token_ids": args.stop_token_id, "ignore_eos": args.ignore_eos or None,
        "include_stop_in_output": args.include_stop or None, "top_logprobs": args.top_logprobs,
        "truncation": args.truncation, "overflow": args.overflow, "request_id": args.request_id,
        "priority": args.priority, "n": args.n, "echo": args.echo or None,
        "logit_bias": dict(args.logit_bias) or None, "allowed_token_ids": args.allowed_token_ids,
        "banned_token_ids": args.banned_token_ids, "bad_words": args.bad_word or None,
        "regex": args.regex, "json_schema": args.json_schema, "choice": args.choice, "grammar": args.grammar,
    }  # fmt: skip


UNSATISFIED_NOTE = "[the output does not match the constraint: it is only the beginning of a match]"
RANDOM_WEIGHTS_NOTE = "[random weights: the model is untrained, so the text is meaningless]"


def _print_summary(summary: str, reason: FinishReason | None) -> None:
    """The summary line on stderr, and under it what CONSTRAINT_UNSATISFIED means."""
    print(summary, file=sys.stderr)
    if reason is FinishReason.CONSTRAINT_UNSATISFIED:
        print(UNSATISFIED_NOTE, file=sys.stderr)


def _print_random_weights_note(client: Client) -> None:
    """Under a text-mode generation's summary (stderr): say so when the text comes from random
    weights. Advisory: if the model cannot be asked, the generation still succeeded."""
    try:
        random_weights = client.model_info().random_weights
    except GPT2Error:
        return
    if random_weights:
        print(RANDOM_WEIGHTS_NOTE, file=sys.stderr)


def describe_prompt(tokens: Sequence[ScoredToken]) -> str:
    """An echoed prompt: a header, then one line per scored token as ``describe_score`` has them
    (the first prompt token, which nothing precedes, is not scored: positions start at 1)."""
    total = sum(t.logprob for t in tokens)
    header = f"--- prompt: {len(tokens)} tokens scored (the first is not), total logprob {total:.4f} ---"
    return "\n".join([header, *_token_rows(tokens, start=1)])


def _choice_header(index: int, seed: int | None, reason: FinishReason | None) -> str:
    return f"--- choice {index} (seed {seed}, {reason.value if reason is not None else '?'}) ---"


def describe_top_logprobs(tokens: Sequence[Token]) -> str:
    """Generated tokens with their alternatives (generate --top-logprobs in text mode): a header,
    then one line per token: its position in the completion, its text repr'd so that whitespace
    shows, its logprob, then the most likely tokens at that position with theirs."""
    texts = [repr(t.text) for t in tokens]
    width = max((len(text) for text in texts), default=0)
    lines = ["--- generated tokens: position, token, logprob, top alternatives ---"]
    for position, (token, text) in enumerate(zip(tokens, texts, strict=True)):
        top = ", ".join(f"{x.text!r} {x.logprob:.2f}" for x in token.top_logprobs)
        lines.append(f"{position:>5}  {text:<{width}}  {token.logprob:>10.4f}  {top}".rstrip())
    return "\n".join(lines)


def _print_generation(result: Generation, echo: bool, top_logprobs: bool) -> None:
    """Text mode: the echoed prompt's table (``echo``), then the completion, then its tokens'
    alternatives (``top_logprobs``); with several choices, each after its header line."""
    if echo:
        print(describe_prompt(result.prompt_tokens))
    if len(result.choices) > 1:
        for choice in result.choices:
            print(_choice_header(choice.index, choice.seed, choice.finish_reason))
            print(choice.text)
            if top_logprobs:
                print(describe_top_logprobs(choice.tokens))
    else:
        if echo:
            print("--- completion ---")
        print(result.text)
        if top_logprobs:
            print(describe_top_logprobs(result.tokens))
    sys.stdout.flush()


# What generate --trace takes (TraceGeneration's options); the other flags have no traced twin.
TRACE_PARAMS = frozenset({"temperature", "top_k", "top_p", "min_p", "typical_p", "seed", "max_new_tokens", "stop",
                          "ignore_eos"})  # fmt: skip


def cmd_generate(client: Client, args: argparse.Namespace) -> int:
    params = _generation_params(args)
    if args.trace:
        unsupported = [name for name, value in params.items() if name not in TRACE_PARAMS and value not in (None, [])]
        if args.stream or unsupported:
            flags = ", ".join("--" + name.replace("_", "-") for name in ["stream"] * args.stream + unsupported)
            print(f"gpt2-client: --trace takes the prompt, --temperature, --top-k, --top-p, --min-p, --typical-p, "
                  f"--seed, --max-new-tokens, --stop, --ignore-eos and --candidates; not {flags}",
                  file=sys.stderr)  # fmt: skip
            return 2
        return cmd_generation_trace(client, args.prompt, {name: params[name] for name in TRACE_PARAMS},
                                    args.candidates, args.png, args.json)  # fmt: skip
    if args.png is not None or args.candidates is not None:
        print("gpt2-client: --png and --candidates go with --trace", file=sys.stderr)
        return 2
    top_logprobs = args.top_logprobs is not None  # else the output is as it always was
    if not args.stream:
        result: Generation = client.generate(args.prompt, **params)
        if args.json:
            _print_json(result)
        else:
            _print_generation(result, args.echo, top_logprobs)
            reason = result.finish_reason.name if len(result.choices) == 1 else f"{len(result.choices)} choices"
            _print_summary(_usage_summary(reason, result.usage, result.seed, result.timing.total_seconds,
                                          result.request_id),
                           result.finish_reason if len(result.choices) == 1 else None)  # fmt: skip
            _print_random_weights_note(client)
        return 0
    chunks = client.stream(args.prompt, **params)
    if args.json:
        for chunk in chunks:
            _print_json(chunk)
        return 0
    if (args.n or 1) > 1:
        status = _stream_choices(chunks, args.echo, top_logprobs)
        _print_random_weights_note(client)
        return status
    last: StreamChunk | None = None
    tokens: list[Token] = []
    for chunk in chunks:
        if last is None and args.echo:
            print(describe_prompt(chunk.prompt_tokens))
            print("--- completion ---")
        last = chunk
        tokens += chunk.tokens
        print(chunk.text, end="", flush=True)
    if last is not None:
        print(flush=True)
        if top_logprobs:
            print(describe_top_logprobs(tokens), flush=True)
    if last is not None and last.usage is not None and last.timing is not None:
        reason = last.finish_reason.name if last.finish_reason is not None else "?"
        _print_summary(_usage_summary(reason, last.usage, last.seed, last.timing.total_seconds, last.request_id),
                       last.finish_reason)  # fmt: skip
    _print_random_weights_note(client)
    return 0


def _stream_choices(chunks: Iterable[StreamChunk], echo: bool, top_logprobs: bool) -> int:
    """A text-mode stream of several choices, whose chunks interleave: each choice's text is
    collected and every choice printed, in index order, once the stream ends (as ``generate``
    without --stream prints them); the summary adds up the choices' tokens and context shifts."""
    texts: dict[int, list[str]] = {}
    tokens: dict[int, list[Token]] = {}
    lasts: dict[int, StreamChunk] = {}
    prompt_tokens: tuple[ScoredToken, ...] = ()
    for chunk in chunks:
        texts.setdefault(chunk.choice_index, []).append(chunk.text)
        tokens.setdefault(chunk.choice_index, []).extend(chunk.tokens)
        prompt_tokens += chunk.prompt_tokens
        if chunk.finished:
            lasts[chunk.choice_index] = chunk
    if echo:
        print(describe_prompt(prompt_tokens))
    for index in sorted(texts):
        last = lasts.get(index)
        print(_choice_header(index, last.seed if last else None, last.finish_reason if last else None))
        print("".join(texts[index]), flush=True)
        if top_logprobs:
            print(describe_top_logprobs(tokens[index]), flush=True)
    if lasts:
        first = lasts[min(lasts)]
        usages = [c.usage for c in lasts.values() if c.usage is not None]
        seconds = max((c.timing.total_seconds for c in lasts.values() if c.timing is not None), default=0.0)
        cached = first.usage.cached_prompt_tokens if first.usage is not None else 0
        truncated = first.usage.truncated_prompt_tokens if first.usage is not None else 0  # one prompt
        print(_summary(f"{len(lasts)} choices", sum(u.completion_tokens for u in usages), first.seed, seconds,
                       first.request_id, cached, truncated, sum(u.context_shifts for u in usages)),
              file=sys.stderr)  # fmt: skip
    return 0


def _token_rows(tokens: Sequence[ScoredToken], start: int) -> list[str]:
    """One line per scored token (its position, from ``start``, its text repr'd so that
    whitespace shows, its logprob, its rank), and one of its alternatives after it if any."""
    texts = [repr(t.text) for t in tokens]
    width = max((len(text) for text in texts), default=0)
    lines = []
    for position, (token, text) in enumerate(zip(tokens, texts, strict=True), start=start):
        lines.append(f"{position:>5}  {text:<{width}}  {token.logprob:>10.4f}  rank {token.rank}")
        if token.top_logprobs:
            top = ", ".join(f"{x.text!r} {x.logprob:.4f}" for x in token.top_logprobs)
            lines.append(f"{'':>5}  top: {top}")
    return lines


def describe_score(result: ScoreResult, first_token_scored: bool) -> str:
    """One line per scored token (its position in the input, its text repr'd so that whitespace
    shows, its logprob, its rank, then its alternatives if any), and a footer."""
    lines = _token_rows(result.tokens, start=0 if first_token_scored else 1)
    lines.append(
        f"{len(result.tokens)} tokens scored: total logprob {result.total_logprob:.4f}, "
        f"mean NLL {result.mean_nll:.4f}, perplexity {result.perplexity:.4f}"
    )
    if not first_token_scored:
        lines.append("(the first token is not scored: nothing precedes it; --context or --add-bos scores it)")
    return "\n".join(lines)


def cmd_score(client: Client, args: argparse.Namespace) -> int:
    context = args.context or None  # an empty --context is no context
    result = client.score(args.text, context=context, add_bos=args.add_bos, top_logprobs=args.top_logprobs,
                          priority=args.priority, request_id=args.request_id)  # fmt: skip
    if args.json:
        _print_json(result)
    else:
        print(describe_score(result, first_token_scored=context is not None or args.add_bos), flush=True)
        print(f"[{result.usage.prompt_tokens} tokens read in {result.timing.total_seconds:.2f}s, "
              f"request {result.request_id}]", file=sys.stderr)  # fmt: skip
    return 0


def _describe(info: ModelInfo) -> str:
    counts, limits = info.parameter_counts, info.limits
    rows = [
        ("model", info.name + ("   ** RANDOM WEIGHTS: output is meaningless **" if info.random_weights else "")),
        ("source", info.source),
        ("architecture", f"{info.n_layer} layers, {info.n_head} heads, d_model {info.d_model}, d_ff {info.d_ff}"),
        ("vocabulary", f"{info.vocab_size} tokens (eos {info.eos_token_id})"),
        ("context window", f"{info.context_window} positions"),
        ("dtype / device", f"{info.dtype} on {info.device}"),
        ("weights", info.weights),
        ("batch-invariant", "yes: seeded results do not depend on the batch" if info.batch_invariant else "no"),
        *_parameter_rows(counts),
        ("limits", ""),
    ]
    rows += [(f"  {f.name}", str(getattr(limits, f.name))) for f in dataclasses.fields(limits)]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}".rstrip() for name, value in rows)


def _parameter_rows(counts: ParameterCounts) -> list[tuple[str, str]]:
    """The parameter counts as rows whose numbers add up to the total printed under them. GPT-2's
    LM head is tied to the token embedding (weight sharing: logits = h @ wte.T), so it has no
    weights of its own and its line shows no number to add; were it untied (its parameters
    counted in the total), it would be a number like the others."""
    parts = {f.name: getattr(counts, f.name) for f in dataclasses.fields(counts) if f.name not in ("lm_head", "total")}
    tied = counts.lm_head == counts.token_embedding and sum(parts.values()) == counts.total
    if not tied:
        parts["lm_head"] = counts.lm_head
    width = len(f"{max([counts.total, *parts.values()]):,}")
    summary = "total (the LM head is tied to the token embedding: weight sharing, no weights of its own)"
    rows = [("parameters", f"{counts.total:,} {summary if tied else 'total'}")]
    rows += [(f"  {name}", f"{value:>{width},}") for name, value in parts.items()]
    if tied:
        rows.append(("  lm_head", f"{'-':>{width}}  (tied to token_embedding: the same {counts.lm_head:,} weights)"))
    added = sum(parts.values())
    check = "the sum of the lines above" if added == counts.total else f"the lines above add up to {added:,}"
    rows.append(("  total", f"{counts.total:>{width},}  ({check})"))
    return rows


def cmd_info(client: Client, args: argparse.Namespace) -> int:
    info = client.model_info()
    if args.json:
        _print_json(info)
    else:
        print(_describe(info))
    return 0


def cmd_health(client: Client, args: argparse.Namespace) -> int:
    status = client.health(args.service)
    if args.json:
        _print_json({"service": args.service, "status": status})
    else:
        print(status.name)
    return 0 if status is HealthStatus.SERVING else 1


# -- command line --------------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse without prefix matching: --max-new-token is an error, not --max-new-tokens
    (allow_abbrev=False); the parsers of the subcommands are of this class too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


class SubcommandParser(Parser):
    """A subcommand's parser: it reports what it does not know itself, with its own usage line
    (argparse hands a subcommand's unknown arguments back to the top-level parser, whose error
    shows the top-level usage); exit status 2 as ever."""

    def parse_known_args(  # type: ignore[override]  # the stub's overloads, one behaviour
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


def _env(name: str) -> str | None:
    return os.environ.get(name) or None  # set but empty = unset


def _add_common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Connection and output options; accepted before or after the command."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    group = parser.add_argument_group("connection and output")
    group.add_argument("--target", default=default(os.environ.get(TARGET_ENV, DEFAULT_TARGET)),
                       help=f"server address, gRPC target, or comma-separated ip:port list [env {TARGET_ENV}] "
                            f"(default: {DEFAULT_TARGET})")  # fmt: skip
    group.add_argument("--timeout", type=float, default=default(None), help="deadline of the call in seconds")
    group.add_argument("--json", action="store_true", default=default(False), help="print JSON instead of text")
    group.add_argument("--tls", action="store_true", default=default(False), help="use TLS with the system's roots")
    group.add_argument(
        "--tls-ca",
        type=Path,
        default=default(_env(TLS_CA_ENV)),
        help=f"PEM file of the CA that signed the server certificate (implies TLS) [env {TLS_CA_ENV}]",
    )
    group.add_argument(
        "--tls-cert",
        type=Path,
        default=default(_env(TLS_CERT_ENV)),
        help=f"PEM client certificate chain, for mutual TLS (with --tls-key) [env {TLS_CERT_ENV}]",
    )
    group.add_argument(
        "--tls-key",
        type=Path,
        default=default(_env(TLS_KEY_ENV)),
        help=f"PEM client private key, for mutual TLS [env {TLS_KEY_ENV}]",
    )
    group.add_argument(
        "--token",
        default=default(_env(TOKEN_ENV)),
        help=f"bearer token sent with every call [env {TOKEN_ENV}: safer, ps shows flags to other users]",
    )


def _logit_bias(value: str) -> tuple[int, float]:
    """ID=BIAS, as --logit-bias takes it."""
    token, sep, bias = value.partition("=")
    try:
        if not sep:
            raise ValueError
        pair = int(token), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ID=BIAS (a token id and a number), got {value!r}") from None
    if pair[0] < 0:
        raise argparse.ArgumentTypeError(f"a token id is >= 0, got {value!r}")
    return pair


def _id_list(value: str) -> list[int]:
    """Comma-separated token ids (1,2,3)."""
    try:
        ids = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {value!r}") from None
    if any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError(f"token ids are >= 0, got {value!r}")
    return ids


def _read(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read the {what} file {path!r}: {exc}") from None


def _json_schema(value: str) -> str:
    """Inline JSON (it starts with "{"), else the path of a file holding the schema."""
    return value if value.lstrip().startswith("{") else _read(value, "JSON schema")


def _grammar(value: str) -> str:
    """The path of an existing file holding the grammar, else the grammar itself."""
    try:
        is_file = "\n" not in value and Path(value).is_file()
    except (OSError, ValueError):  # too long a name, a NUL: not a path
        is_file = False
    return _read(value, "grammar") if is_file else value


def _add_generate(commands: Any) -> None:
    p = commands.add_parser("generate", help="generate a completion", description="Generate a completion.")
    p.add_argument("prompt", nargs="?", default="", help="the text to continue (default: empty = <|endoftext|>)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--max-new-tokens", type=int, help="most tokens to generate (server default if unset)")
    p.add_argument("--min-new-tokens", type=int)
    p.add_argument("--temperature", type=float, help="0 = greedy (default 1)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--min-p", type=float)
    p.add_argument("--typical-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--presence-penalty", type=float)
    p.add_argument("--frequency-penalty", type=float)
    p.add_argument("--seed", type=int, help="seed for reproducible sampling (server picks one if unset)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stop-token-id", type=int, action="append", default=[], help="stop token id (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past <|endoftext|>")
    p.add_argument("--include-stop", action="store_true", help="keep the matched stop string in the output")
    p.add_argument("--top-logprobs", type=int, help="alternatives per token to report (0-20)")
    p.add_argument("--n", type=int, help="completions of the prompt, each printed after a header (default 1; "
                   "up to the server's max_choices); choice i samples with seed + i")  # fmt: skip
    p.add_argument("--echo", action="store_true", help="also print the prompt's tokens with their logprobs and ranks")
    p.add_argument("--truncation", choices=["truncate_left", "reject"])
    p.add_argument("--overflow", choices=["shift", "stop"])
    p.add_argument("--priority", choices=["interactive", "default", "batch"], help="its class when the server is busy")
    p.add_argument("--request-id")
    trace = p.add_argument_group("the autoregressive loop, step by step (the Introspection service)")
    trace.add_argument("--trace", action="store_true",
                       help="instead of generating, trace each step: the context length, the top candidates "
                            "before and after temperature and the filters, the token drawn, its uniform number "
                            "and draw index, stop and context-shift events (takes the sampling flags, "
                            "--max-new-tokens up to 64, --seed, --stop, --ignore-eos)")  # fmt: skip
    trace.add_argument("--candidates", type=int, help="with --trace: candidates shown per step (default 5, at most 50)")
    trace.add_argument("--png", type=Path, metavar="FILE",
                       help="with --trace: also draw the steps into FILE (needs matplotlib)")  # fmt: skip
    tokens = p.add_argument_group("token constraints")
    tokens.add_argument("--logit-bias", metavar="ID=BIAS", type=_logit_bias, action="append", default=[],
                        help="add BIAS (-100 to 100) to the logit of token ID; -100 in effect bans it, "
                             "100 in effect forces it (repeatable)")  # fmt: skip
    tokens.add_argument("--allowed-token-ids", metavar="IDS", type=_id_list, action="extend",
                        help="only these comma-separated token ids may be generated, e.g. 11,13,262")  # fmt: skip
    tokens.add_argument("--banned-token-ids", metavar="IDS", type=_id_list, action="extend",
                        help="these comma-separated token ids are never generated")  # fmt: skip
    tokens.add_argument("--bad-word", metavar="WORD", action="append", default=[],
                        help="a string never completed in the output, with or without a space before it "
                             "(repeatable)")  # fmt: skip
    group = p.add_argument_group("constraint (at most one): what the whole output must match")
    kinds = group.add_mutually_exclusive_group()
    kinds.add_argument("--regex", metavar="PATTERN",
                       help="a regular expression (Rust syntax, anchored at both ends)")  # fmt: skip
    kinds.add_argument("--json-schema", metavar="FILE_OR_JSON", type=_json_schema,
                       help="a JSON Schema: inline JSON if it starts with {, else a file holding it; "
                            "the output is one JSON value valid under it")  # fmt: skip
    kinds.add_argument("--choice", metavar="OPTION", action="append",
                       help="the output is exactly one of the options (repeat it for each)")  # fmt: skip
    kinds.add_argument("--grammar", metavar="FILE_OR_TEXT", type=_grammar,
                       help="a Lark grammar (llguidance's dialect): a file holding it, else the grammar "
                            "itself; the output is a sentence of its start rule")  # fmt: skip
    _add_common(p, suppress=True)
    p.set_defaults(run=cmd_generate)


def _add_score(commands: Any) -> None:
    p = commands.add_parser(
        "score",
        help="the log-probability of each token of a text",
        description="The log-probability the model gives each token of TEXT, its rank, and the text's perplexity. "
        "Without --context or --add-bos the first token is not scored (nothing precedes it).",
    )
    p.add_argument("text", help="the text to score")
    p.add_argument("--context", help="text read before TEXT and not scored (a prompt, a question)")
    p.add_argument("--add-bos", action="store_true", help="prepend <|endoftext|> so that the first token is scored")
    p.add_argument("--top-logprobs", type=int, default=0, help="most likely tokens to show per position (0-20)")
    p.add_argument("--priority", choices=["interactive", "default", "batch"], help="its class when the server is busy")
    p.add_argument("--request-id")
    _add_common(p, suppress=True)
    p.set_defaults(run=cmd_score)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="gpt2-client", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=SubcommandParser)
    _add_generate(commands)
    _add_score(commands)
    info = commands.add_parser("info", help="show the served model and the server's limits",
                               description="The served model (architecture, parameters by component, weights) "
                               "and the server's limits.")  # fmt: skip
    _add_common(info, suppress=True)
    info.set_defaults(run=cmd_info)
    health = commands.add_parser("health", help="check the server's health (exit 0 if SERVING)",
                                 description="Check the server's health: exit 0 if SERVING, else 1.")  # fmt: skip
    health.add_argument("--service", default="", help='service to ask about (default: "" = the whole server)')
    _add_common(health, suppress=True)
    health.set_defaults(run=cmd_health)
    add_inspect_command(commands, _add_common)
    return parser


def unreachable(exc: GPT2Error) -> bool:
    """Whether a call failed because nothing could be connected to (connection refused, no route):
    UNAVAILABLE from gRPC itself, whose message then reads "failed to connect to all addresses;
    last error: ... Connection refused", not the server's own UNAVAILABLE (loading, draining),
    which carries a reason."""
    message = exc.message.lower()
    connect = "failed to connect" in message or "connection refused" in message
    return isinstance(exc, UnavailableError) and not exc.reason and connect


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    target: str | list[str] = args.target
    if "," in args.target and not args.target.startswith(("ipv4:", "ipv6:")):
        target = [part.strip() for part in args.target.split(",")]
    try:
        client = Client(
            target,
            timeout=args.timeout,
            tls=args.tls,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            token=args.token,
        )
    except (ValueError, OSError) as exc:
        print(f"gpt2-client: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        with client:
            status = args.run(client, args)
    except GPT2Error as exc:
        code = exc.code.name if exc.code is not None else "ERROR"
        print(f"error: {code}: {exc.message}" if not exc.violations else f"error: {code}:", file=sys.stderr)
        for violation in exc.violations:
            print(f"  {violation.field}: {violation.description}", file=sys.stderr)
        if unreachable(exc):
            print("hint: " + UNREACHABLE_HINT.format(target=args.target, env=TARGET_ENV), file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        status = 130
    raise SystemExit(status)


if __name__ == "__main__":
    main()
