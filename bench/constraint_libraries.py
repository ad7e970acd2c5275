"""Constrained-decoding libraries on GPT-2's 50,257-token vocabulary, measured on this machine's CPU.

Candidates: ``llguidance`` (1.9.x), ``xgrammar`` (0.2.x), ``outlines-core`` (0.2.x). For each one this
measures, on the project's own GPT-2 tokenizer (``GPT2Tokenizer.embedded()``):

1. start-up: building the library's tokenizer object for the vocabulary (and the import time);
2. compile time of a JSON schema (nested objects, arrays, enums, required fields), an ISO-date regex,
   a decimal-number regex, a 5-way choice and a small Lark grammar (where supported);
3. per-token mask time, driving a matcher through a valid output token by token (median and p99
   microseconds per mask), whether the mask call releases the GIL (2 threads vs 1) and the batch form;
4. the mask format and the cost of turning it into a torch bool mask / applying it to a logits row;
5. license, wheel tags, installed size and dependencies (``--resolve-deps``: what pip would install);
6. a correctness smoke: 50 seeded random generations per constraint (a random allowed token at each
   step; when EOS is allowed it is taken with probability 1/2), each checked with ``json.loads`` +
   ``jsonschema.validate`` / ``re.fullmatch`` / a parser; and what each library says at the end;
7. what an invalid regex / schema / grammar raises.

It is a standalone script: nothing imports it, and it needs a scratch virtualenv, never the project's
(xgrammar depends on torch, transformers and triton; the project pins torch==2.13.0+cpu)::

    python3.11 -m venv /tmp/cvenv
    /tmp/cvenv/bin/pip install llguidance==1.9.1 outlines-core==0.2.14 jsonschema numpy==2.4.6 \\
        torch==2.13.0 transformers==5.24.0 tokenizers==0.23.3 apache-tvm-ffi pydantic typing-extensions
    /tmp/cvenv/bin/pip install --no-deps xgrammar==0.2.9   # skips triton (~250 MB, GPU-only kernels)
    /tmp/cvenv/bin/python bench/constraint_libraries.py                  # ~1.5 minutes on 2 cores
    /tmp/cvenv/bin/python bench/constraint_libraries.py --quick          # 1 round, 10 generations
    /tmp/cvenv/bin/python bench/constraint_libraries.py --resolve-deps   # adds pip --dry-run reports

(A plain ``pip install llguidance xgrammar outlines-core`` makes xgrammar pull torch 2.14.1 with CUDA 13
and ~20 nvidia-* wheels, and triton.) The vocabulary comes from the project: the script runs itself
with ``--dump-vocab`` under the project's interpreter (``--project-python``, default
``.venv/bin/python`` at the repository root, with ``PYTHONPATH=service:client``) and checks that the
``tokenizers.Tokenizer`` it builds the same way from the same ``encoder.json``/``vocab.bpe`` has the
same token bytes. Writes ``bench/results/constraint_libraries.json`` and prints a summary table.
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib
import importlib.metadata
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "constraint_libraries.json"
LIBRARIES = ("llguidance", "xgrammar", "outlines-core")

# -- the constraints --------------------------------------------------------------------------------

PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z0-9._]{1,16}@[a-z0-9]{1,12}\\.[a-z]{2,4}$"},
        "tags": {
            "type": "array",
            "items": {"type": "string", "enum": ["admin", "user", "guest", "staff"]},
            "maxItems": 4,
        },
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string", "maxLength": 32},
                "city": {"type": "string", "maxLength": 24},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["street", "city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "email", "address"],
    "additionalProperties": False,
}
PERSON = {
    "name": "Ada Lovelace",
    "age": 36,
    "email": "ada@example.com",
    "tags": ["admin", "staff"],
    "address": {"street": "12 St James's Square", "city": "London", "zip": "10115"},
}
DATE_REGEX = r"\d{4}-\d{2}-\d{2}"
# Bounded repetitions, so that a random walk through the constraint ends.
DECIMAL_REGEX = r"-?(0|[1-9][0-9]{0,8})(\.[0-9]{1,6})?"
CHOICES = ["positive", "negative", "neutral", "mixed", "unknown"]
CHOICE_REGEX = "(" + "|".join(CHOICES) + ")"
LARK_GRAMMAR = """start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")"
NUMBER: /0|[1-9][0-9]{0,2}/
"""

# name -> (kind, spec, a valid output to drive the matcher with)
CONSTRAINTS: dict[str, tuple[str, str, str]] = {
    "json_schema": ("json", json.dumps(PERSON_SCHEMA), json.dumps(PERSON, separators=(",", ":"))),
    "regex_date": ("regex", DATE_REGEX, "2024-01-31"),
    "regex_decimal": ("regex", DECIMAL_REGEX, "-12345.678"),
    "choice": ("choice", json.dumps(CHOICES), "neutral"),
    "lark": ("lark", LARK_GRAMMAR, "12*(3+45)-6/789"),
}

INVALID_INPUTS: dict[str, tuple[str, str]] = {
    "regex_unclosed_group": ("regex", "(ab"),
    "regex_bad_repeat": ("regex", "a{3,1}"),
    "regex_lookahead": ("regex", "(?=a)ab"),
    "schema_not_json": ("json", "{not json"),
    "schema_bad_type": ("json", '{"type": "objectx"}'),
    "schema_unsupported_keyword": ("json", '{"type": "array", "items": {"type": "integer"}, "uniqueItems": true}'),
    "schema_dangling_ref": ("json", '{"$ref": "#/$defs/missing"}'),
    "lark_undefined_rule": ("lark", "start: foo"),
    "lark_syntax_error": ("lark", "start: (("),
}


def check_output(name: str, text: bytes) -> tuple[bool, str]:
    """Whether a generated output satisfies constraint ``name``, and why not."""
    import jsonschema

    try:
        s = text.decode("utf-8")
    except UnicodeDecodeError as e:
        return False, f"not UTF-8: {e}"
    if name == "json_schema":
        try:
            jsonschema.validate(json.loads(s), PERSON_SCHEMA)
        except (ValueError, jsonschema.ValidationError) as e:
            return False, f"{type(e).__name__}: {str(e)[:200]}"
        return True, ""
    if name == "regex_date":
        return bool(re.fullmatch(DATE_REGEX, s)), "no fullmatch"
    if name == "regex_decimal":
        return bool(re.fullmatch(DECIMAL_REGEX, s)), "no fullmatch"
    if name == "choice":
        return s in CHOICES, "not a choice"
    if name == "lark":
        return check_arithmetic(s)
    raise ValueError(name)


def check_arithmetic(s: str) -> tuple[bool, str]:
    """The Lark grammar's language: + - * / over 0..999 (no leading zeros), parentheses, no spaces."""
    if not re.fullmatch(r"[0-9+\-*/()]+", s):
        return False, "characters outside the grammar"
    if any(len(n) > 3 for n in re.findall(r"[0-9]+", s)):
        return False, "a number of more than 3 digits"
    try:
        tree = ast.parse(s, mode="eval")
    except SyntaxError as e:
        return False, f"SyntaxError: {e}"
    allowed = (ast.Expression, ast.BinOp, ast.Constant, ast.Add, ast.Sub, ast.Mult, ast.Div)
    for node in ast.walk(tree):
        if not isinstance(node, allowed) or (isinstance(node, ast.Constant) and type(node.value) is not int):
            return False, f"unexpected {type(node).__name__}"
    return True, ""


# -- the vocabulary ---------------------------------------------------------------------------------


def dump_vocab(path: Path) -> None:
    """Run under the project's interpreter: the project tokenizer's token bytes and its files."""
    from gpt2_service.model.tokenizer import GPT2Tokenizer

    tok = GPT2Tokenizer.embedded()
    data = Path(tok.source)
    out = {
        "vocab_size": tok.vocab_size,
        "eos_token_id": tok.eos_token_id,
        "special_ids": sorted(tok.special_ids),
        "encoder_json": str(data / "encoder.json"),
        "vocab_bpe": str(data / "vocab.bpe"),
        "token_bytes_hex": [b.hex() for b in tok.token_bytes],
        "encoded": {name: tok.encode(valid) for name, (_, _, valid) in CONSTRAINTS.items()},
    }
    path.write_text(json.dumps(out))


class Vocab:
    """GPT-2's vocabulary as the project has it, plus a ``tokenizers.Tokenizer`` built the same way."""

    def __init__(self, dump: dict[str, Any]) -> None:
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        self.size: int = dump["vocab_size"]
        self.eos: int = dump["eos_token_id"]
        self.special_ids: list[int] = dump["special_ids"]
        self.encoder_json: str = dump["encoder_json"]
        self.vocab_bpe: str = dump["vocab_bpe"]
        self.token_bytes: list[bytes] = [bytes.fromhex(h) for h in dump["token_bytes_hex"]]
        self.encoded: dict[str, list[int]] = dump["encoded"]
        # The same construction as GPT2Tokenizer.from_vocab_and_merges.
        tok = Tokenizer(models.BPE.from_file(self.encoder_json, self.vocab_bpe))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
        self.tokenizer = tok
        if tok.get_vocab_size(with_added_tokens=True) != self.size:
            raise SystemExit("the tokenizers.Tokenizer built here has another vocabulary size")
        for name, (_, _, valid) in CONSTRAINTS.items():
            if tok.encode(valid, add_special_tokens=False).ids != self.encoded[name]:
                raise SystemExit(f"the tokenizers.Tokenizer built here encodes {name!r} differently")

    def decode(self, ids: list[int]) -> bytes:
        return b"".join(self.token_bytes[i] for i in ids)


def load_vocab(project_python: str) -> Vocab:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "vocab.json"
        env = {"PYTHONPATH": f"{ROOT / 'service'}:{ROOT / 'client'}", "PATH": "/usr/bin:/bin"}
        subprocess.run([project_python, __file__, "--dump-vocab", str(out)], check=True, env=env, cwd=ROOT)
        return Vocab(json.loads(out.read_text()))


# -- the libraries, behind one small interface --------------------------------------------------------
#
# compile(kind, spec) -> a compiled object, cached by the caller (raises on invalid input);
# new_matcher(compiled) -> (matcher, fill, advance): fill(row_ptr, row) writes the next token's bitmask
# into one int32 row of ceil(V/32) words (bit j of word i = token 32*i+j); advance(token) -> bool.


class Library:
    name = ""
    module = ""

    def __init__(self, vocab: Vocab) -> None:
        self.vocab = vocab

    def startup(self) -> None:
        raise NotImplementedError

    def compile(self, kind: str, spec: str) -> Any:
        raise NotImplementedError

    def compile_cold(self, kind: str, spec: str) -> Any:
        return self.compile(kind, spec)

    def new_matcher(self, compiled: Any, bitmask: Any) -> tuple[Any, Callable[[int], Any], Callable[[int], bool]]:
        raise NotImplementedError

    def state(self, matcher: Any) -> dict[str, Any]:
        raise NotImplementedError

    def supports(self, kind: str) -> bool:
        return True

    def batch_fill(self, matchers: list[Any], bitmask: Any) -> Callable[[], None] | None:
        return None


def row_ptr(bitmask: Any, index: int) -> int:
    """Address of row ``index`` of a contiguous int32 torch bitmask."""
    return int(bitmask.data_ptr() + index * bitmask.shape[1] * 4)


class LLGuidance(Library):
    name = "llguidance"
    module = "llguidance"

    def startup(self) -> None:
        import llguidance

        # The project's tokenizers.Tokenizer, serialized: LLTokenizer accepts tokenizer.json text.
        self.tok = llguidance.LLTokenizer(
            self.vocab.tokenizer.to_str(), n_vocab=self.vocab.size, eos_token=self.vocab.eos
        )

    def startup_wrapper(self) -> None:
        """The other route: a TokenizerWrapper around token bytes and an encode function."""
        import llguidance

        vocab = self.vocab

        class Wrapped:
            eos_token_id = vocab.eos
            bos_token_id = None
            tokens = vocab.token_bytes
            special_token_ids = vocab.special_ids

            def __call__(self, text: str | bytes) -> list[int]:
                if isinstance(text, bytes):
                    text = text.decode("utf-8", errors="replace")
                return list(vocab.tokenizer.encode(text, add_special_tokens=False).ids)

        self.tok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Wrapped()), n_vocab=vocab.size)

    def grammar(self, kind: str, spec: str) -> str:
        import llguidance

        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(spec)
        if kind == "json":
            # No free whitespace: GPT-2 has many whitespace tokens, and a JSON reply needs none.
            return llguidance.LLMatcher.grammar_from_json_schema(spec, defaults={"whitespace_flexible": False})
        if kind == "choice":
            return llguidance.grammar_from("choice", spec)
        if kind == "lark":
            return llguidance.LLMatcher.grammar_from_lark(spec)
        raise ValueError(kind)

    def compile(self, kind: str, spec: str) -> Any:
        """A template matcher (the compiled grammar); each request takes a ``deep_copy``."""
        import llguidance

        m = llguidance.LLMatcher(self.tok, self.grammar(kind, spec), log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def new_matcher(self, compiled: Any, bitmask: Any) -> tuple[Any, Callable[[int], Any], Callable[[int], bool]]:
        m = compiled.deep_copy()
        nbytes = bitmask.shape[1] * 4
        compute = m.unsafe_compute_mask_ptr

        def fill(index: int) -> None:
            compute(row_ptr(bitmask, index), nbytes)

        return m, fill, m.consume_token

    def state(self, matcher: Any) -> dict[str, Any]:
        return {
            "is_accepting": matcher.is_accepting(),
            "is_stopped": matcher.is_stopped(),
            "stop_reason": matcher.stop_reason(),
            "is_error": matcher.is_error(),
        }

    def batch_fill(self, matchers: list[Any], bitmask: Any) -> Callable[[], None] | None:
        import llguidance

        executor = llguidance.LLExecutor(num_threads=2)
        pairs = [(m, i) for i, m in enumerate(matchers)]
        ptr, one, rows = bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0]
        return functools.partial(executor.unsafe_compute_mask_ptr, pairs, ptr, one, rows)


class XGrammar(Library):
    name = "xgrammar"
    module = "xgrammar"

    def startup(self) -> None:
        import xgrammar

        # The project's token bytes as they are (VocabType.RAW); EOS as the stop token.
        info = xgrammar.TokenizerInfo(
            self.vocab.token_bytes,
            xgrammar.VocabType.RAW,
            vocab_size=self.vocab.size,
            stop_token_ids=[self.vocab.eos],
        )
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=2)

    def startup_hf(self) -> None:
        """The other route: from a transformers tokenizer built offline from the two files."""
        import xgrammar
        from transformers import GPT2TokenizerFast

        # transformers 5: vocab=/merges= (vocab_file=/merges_file= are silently ignored: a 1-token vocab).
        hf = GPT2TokenizerFast(vocab=self.vocab.encoder_json, merges=self.vocab.vocab_bpe)
        info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=self.vocab.size)
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=2)

    def compile(self, kind: str, spec: str) -> Any:
        c = self.compiler
        if kind == "regex":
            return c.compile_regex(spec)
        if kind == "json":
            return c.compile_json_schema(spec, any_whitespace=False, separators=(",", ":"))
        if kind == "choice":
            return c.compile_regex("(" + "|".join(re.escape(s) for s in json.loads(spec)) + ")")
        if kind == "lark":
            return c.compile_lark(spec)
        raise ValueError(kind)

    def compile_cold(self, kind: str, spec: str) -> Any:
        self.compiler.clear_cache()
        return self.compile(kind, spec)

    def new_matcher(self, compiled: Any, bitmask: Any) -> tuple[Any, Callable[[int], Any], Callable[[int], bool]]:
        import xgrammar

        m = xgrammar.GrammarMatcher(compiled)
        return m, functools.partial(m.fill_next_token_bitmask, bitmask), m.accept_token

    def state(self, matcher: Any) -> dict[str, Any]:
        return {"is_completed": matcher.is_completed(), "is_terminated": matcher.is_terminated()}

    def batch_fill(self, matchers: list[Any], bitmask: Any) -> Callable[[], None] | None:
        import xgrammar

        batch = xgrammar.BatchGrammarMatcher(max_threads=2)
        return functools.partial(batch.batch_fill_next_token_bitmask, matchers, bitmask)


class OutlinesCore(Library):
    name = "outlines-core"
    module = "outlines_core"

    def startup(self) -> None:
        import outlines_core

        eos = self.vocab.eos
        tokens: dict[bytes, list[int]] = {}
        for i, b in enumerate(self.vocab.token_bytes):
            if i != eos:
                tokens.setdefault(b, []).append(i)
        self.vocabulary = outlines_core.Vocabulary(eos, tokens)

    def supports(self, kind: str) -> bool:
        return kind != "lark"

    def compile(self, kind: str, spec: str) -> Any:
        import outlines_core

        if kind == "json":
            regex = outlines_core.json_schema.build_regex_from_schema(spec, whitespace_pattern="")
        elif kind == "regex":
            regex = spec
        elif kind == "choice":
            regex = "(" + "|".join(re.escape(s) for s in json.loads(spec)) + ")"
        else:
            raise ValueError(f"outlines-core has no {kind} grammars (regular expressions and JSON schema only)")
        return outlines_core.Index(regex, self.vocabulary)

    def new_matcher(self, compiled: Any, bitmask: Any) -> tuple[Any, Callable[[int], Any], Callable[[int], bool]]:
        import outlines_core

        g = outlines_core.Guide(compiled)
        numel = bitmask.shape[1]
        write = g.write_mask_into

        def fill(index: int) -> None:
            write(row_ptr(bitmask, index), numel, 4)

        def advance(token: int) -> bool:
            try:
                g.advance(token, return_tokens=False)
            except ValueError:
                return False
            return True

        return g, fill, advance

    def state(self, matcher: Any) -> dict[str, Any]:
        return {"is_finished": matcher.is_finished()}


ADAPTERS: dict[str, type[Library]] = {"llguidance": LLGuidance, "xgrammar": XGrammar, "outlines-core": OutlinesCore}


# -- helpers ----------------------------------------------------------------------------------------


def us(ns: float) -> float:
    return round(ns / 1000.0, 2)


def ms(ns: float) -> float:
    return round(ns / 1e6, 3)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def timed(fn: Callable[[], Any]) -> tuple[int, Any]:
    t0 = time.perf_counter_ns()
    r = fn()
    return time.perf_counter_ns() - t0, r


def allowed_ids(bitmask_row: Any, vocab_size: int) -> Any:
    import numpy as np

    bits = np.unpackbits(bitmask_row.numpy().view(np.uint8), bitorder="little")[:vocab_size]
    return np.flatnonzero(bits)


def new_bitmask(rows: int, vocab_size: int) -> Any:
    import torch

    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


# -- measurements -----------------------------------------------------------------------------------


def measure_import(module: str, repeats: int) -> dict[str, Any]:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    times = [float(subprocess.check_output([sys.executable, "-c", code], text=True)) for _ in range(repeats)]
    heavy = (
        "import sys; import "
        + module
        + "; print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))"
    )
    loads = subprocess.check_output([sys.executable, "-c", heavy], text=True).strip()
    return {
        "import_ms_median": round(statistics.median(times) * 1000, 1),
        "import_ms_all": [round(t * 1000, 1) for t in times],
        "imports": loads,
    }


def measure_startup(lib: Library, repeats: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    routes: dict[str, Callable[[], None]] = {"default": lib.startup}
    if isinstance(lib, LLGuidance):
        routes["token_bytes_wrapper"] = lib.startup_wrapper
    if isinstance(lib, XGrammar):
        routes["from_huggingface"] = lib.startup_hf
    for route, fn in routes.items():
        times = [timed(fn)[0] for _ in range(repeats)]
        out[route] = {"ms_median": ms(statistics.median(times)), "ms_all": [ms(t) for t in times]}
    lib.startup()  # leave the default route in place
    return out


def drive(lib: Library, compiled: Any, tokens: list[int], bitmask: Any) -> tuple[list[int], list[int], int, str]:
    """One request: fill + advance for each token of a valid output, then the final (EOS) mask.

    Returns the mask times, the advance times and the matcher-creation time, in ns, and an error
    ("" when none): a token of the valid output the library rejected, or EOS not allowed at the end
    (the times then stop there)."""
    clock = time.perf_counter_ns
    t0 = clock()
    _m, fill, advance = lib.new_matcher(compiled, bitmask)
    create = clock() - t0
    masks: list[int] = []
    advances: list[int] = []
    for t in tokens:
        t0 = clock()
        fill(0)
        t1 = clock()
        ok = advance(t)
        t2 = clock()
        masks.append(t1 - t0)
        if not ok:
            done = lib.vocab.decode(tokens[: len(advances)])
            return masks, advances, create, f"rejected token {t} {lib.vocab.token_bytes[t]!r} after {done!r}"
        advances.append(t2 - t1)
    t0 = clock()
    fill(0)
    masks.append(clock() - t0)
    eos_bit = (int(bitmask[0, lib.vocab.eos // 32]) >> (lib.vocab.eos % 32)) & 1
    return masks, advances, create, "" if eos_bit else "EOS not allowed after the complete valid output"


def measure_library(lib: Library, rounds: int, runs: int) -> dict[str, Any]:
    """Compile times and per-token mask times, ``rounds`` rounds of ``runs`` requests per constraint."""
    bitmask = new_bitmask(1, lib.vocab.size)
    out: dict[str, Any] = {}
    for name, (kind, spec, _valid) in CONSTRAINTS.items():
        if not lib.supports(kind):
            out[name] = {"supported": False}
            continue
        tokens = lib.vocab.encoded[name]
        compile_ns, cached_ns, create_ns, first_ns = [], [], [], []
        round_median, round_p99, pooled, adv = [], [], [], []
        for _ in range(rounds):
            t, compiled = timed(functools.partial(lib.compile_cold, kind, spec))
            compile_ns.append(t)
            cached_ns.append(timed(functools.partial(lib.compile, kind, spec))[0])
            steady: list[int] = []
            for _ in range(runs):
                masks, advances, create, error = drive(lib, compiled, tokens, bitmask)
                create_ns.append(create)
                first_ns.append(masks[0])
                steady.extend(masks[1:])
                adv.extend(advances)
            round_median.append(statistics.median(steady))
            round_p99.append(pct(steady, 0.99))
            pooled.extend(steady)
        out[name] = {
            "supported": True,
            "tokens": len(tokens),
            "valid_output_error": error,
            "compile_ms_median": ms(statistics.median(compile_ns)),
            "compile_ms_all": [ms(t) for t in compile_ns],
            "compile_again_ms_median": ms(statistics.median(cached_ns)),
            "new_matcher_us_median": us(statistics.median(create_ns)),
            "first_mask_us_median": us(statistics.median(first_ns)),
            "mask_us_median": us(statistics.median(round_median)),
            "mask_us_p99": us(statistics.median(round_p99)),
            "mask_us_pooled_median": us(statistics.median(pooled)),
            "mask_us_pooled_p99": us(pct(pooled, 0.99)),
            "mask_us_pooled_max": us(max(pooled)),
            "advance_us_median": us(statistics.median(adv)),
            "advance_us_p99": us(pct(adv, 0.99)),
        }
    if isinstance(lib, LLGuidance):
        # Without the template: a fresh LLMatcher from the grammar string per request.
        spec = CONSTRAINTS["json_schema"][1]
        grammar = lib.grammar("json", spec)
        import llguidance

        fresh, fresh_first = [], []
        for _ in range(rounds * runs):
            t, m = timed(functools.partial(llguidance.LLMatcher, lib.tok, grammar, log_level=0))
            fresh.append(t)
            fresh_first.append(
                timed(functools.partial(m.unsafe_compute_mask_ptr, bitmask.data_ptr(), bitmask.shape[1] * 4))[0]
            )
        out["json_schema"]["fresh_matcher_us_median"] = us(statistics.median(fresh))
        out["json_schema"]["fresh_matcher_first_mask_us_median"] = us(statistics.median(fresh_first))
        out["json_schema"]["grammar_from_json_schema_us_median"] = us(
            statistics.median(timed(functools.partial(lib.grammar, "json", spec))[0] for _ in range(20))
        )
    return out


def json_request(lib: Library, compiled: Any, bitmask: Any, row: int = 0) -> None:
    """One whole request of the JSON schema: a fresh matcher, fill + advance per token, the final mask.

    Masks are only ever computed for fresh states: llguidance caches the mask of a state (a second
    fill of the same state, even after advance + rollback, costs ~1 µs), so repeating one state
    would measure its cache."""
    _m, fill, advance = lib.new_matcher(compiled, bitmask)
    for t in lib.vocab.encoded["json_schema"]:
        fill(row)
        advance(t)
    fill(row)


def python_ticks(seconds: float, stop: threading.Event | None = None) -> int:
    """Pure-Python work: loop iterations in ``seconds`` (or until ``stop``)."""
    n = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline and not (stop is not None and stop.is_set()):
        n += 1
    return n


def gil_probes(work: Callable[[], Any], rounds: int, repeats: int) -> dict[str, Any]:
    """Two probes of whether ``work`` releases the GIL (medians over ``rounds``):

    - two threads x ``repeats`` calls vs one thread x 2 ``repeats`` (wall-time ratio: ~0.5 when the
      work runs in parallel on 2 free cores, ~1 when it holds the GIL);
    - a pure-Python thread's progress while another thread runs ``work`` in a loop, relative to its
      progress alone: ~1 when the work releases the GIL (given a free core), ~0.5 when it holds it
      (the threads take turns every 5 ms switch interval).
    Both need free cores: the controls (``gil_controls``) show what this machine gives at the time."""
    ratios, ticks_ratios = [], []
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        for _ in range(2 * repeats):
            work()
        serial = time.perf_counter_ns() - t0

        def loop() -> None:
            for _ in range(repeats):
                work()

        threads = [threading.Thread(target=loop) for _ in range(2)]
        t0 = time.perf_counter_ns()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        ratios.append((time.perf_counter_ns() - t0) / serial)

        window = 0.4
        alone = python_ticks(window)
        stop = threading.Event()

        def busy(stop: threading.Event = stop) -> None:
            while not stop.is_set():
                work()

        th = threading.Thread(target=busy)
        th.start()
        beside = python_ticks(window)
        stop.set()
        th.join()
        ticks_ratios.append(beside / alone)
    return {
        "two_threads_over_serial": round(statistics.median(ratios), 3),
        "python_thread_progress_beside_it": round(statistics.median(ticks_ratios), 3),
    }


def gil_controls(rounds: int) -> dict[str, Any]:
    """The probes on work known to release the GIL (hashlib on 1 MiB) and to hold it (sum(range))."""
    import hashlib

    data = b"x" * (1 << 20)
    return {
        "releases: hashlib.sha256(1 MiB)": gil_probes(lambda: hashlib.sha256(data).digest(), rounds, 100),
        "holds: sum(range(100_000))": gil_probes(lambda: sum(range(100_000)), rounds, 100),
    }


def progress_during_calls(calls: list[tuple[Callable[[], Any], Callable[[Any], Any]]]) -> dict[str, Any]:
    """A pure-Python thread's progress during each call (``call(setup())``), relative to its rate
    alone, with the switch interval at 0.2 ms (so that a call holding the GIL lets the other thread
    run only around its ends): near 0.2 or less for work that holds the GIL, as high as the free CPU
    allows (~0.5 on a loaded 2-core machine, ~1 on an idle one) for work that releases it. Only
    meaningful for calls of several ms: for a short call the other thread cannot wake up in time."""
    counter = [0]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            counter[0] += 1

    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0002)
    th = threading.Thread(target=spin)
    th.start()
    try:
        time.sleep(0.05)
        t0, c0 = time.perf_counter(), counter[0]
        time.sleep(0.2)
        rate = (counter[0] - c0) / (time.perf_counter() - t0)
        fractions, durations = [], []
        for setup, call in calls:
            arg = setup()
            c0, t0 = counter[0], time.perf_counter()
            call(arg)
            d = time.perf_counter() - t0
            fractions.append((counter[0] - c0) / (rate * d))
            durations.append(d)
    finally:
        stop.set()
        th.join()
        sys.setswitchinterval(interval)
    return {
        "call_ms_median": round(statistics.median(durations) * 1000, 2),
        "python_progress_during_call": round(statistics.median(fractions), 3),
    }


def gil_long_calls(vocab: Vocab, libs: dict[str, Library]) -> dict[str, Any]:
    """``progress_during_calls`` on controls and on each library's mask fill made long on purpose
    (a big grammar whose masks are computed lazily), and on its compilation."""
    import hashlib

    data = b"x" * (8 << 20)
    nothing: Callable[[], Any] = lambda: None  # noqa: E731
    out: dict[str, Any] = {
        "control, releases: hashlib.sha256(8 MiB)": progress_during_calls(
            [(nothing, lambda _: hashlib.sha256(data).digest())] * 7
        ),
        "control, holds: sum(range(1_000_000))": progress_during_calls(
            [(nothing, lambda _: sum(range(1_000_000)))] * 7
        ),
    }
    rng = random.Random(1)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 12))) for _ in range(30000)]
    bitmask = new_bitmask(1, vocab.size)
    if "llguidance" in libs:
        import llguidance

        tok = libs["llguidance"].tok  # type: ignore[attr-defined]
        lark = "start: " + " | ".join(f"W{i}" for i in range(3000)) + "\n"
        lark += "\n".join(f"W{i}: /{w}[a-z]{{0,8}}/" for i, w in enumerate(words[:3000]))
        lazy = llguidance.LLParserLimits(precompute_large_lexemes=False)
        out["llguidance: first unsafe_compute_mask_ptr of a fresh matcher (3000 lexemes, lazy)"] = (
            progress_during_calls(
                [
                    (
                        lambda: llguidance.LLMatcher(tok, lark, log_level=0, limits=lazy),
                        lambda m: m.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.shape[1] * 4),
                    )
                ]
                * 7
            )
        )
        big = llguidance.LLMatcher.grammar_from_regex("(" + "|".join(words) + ")")
        out["llguidance: LLMatcher() of a 30000-word alternation"] = progress_during_calls(
            [(nothing, lambda _: llguidance.LLMatcher(tok, big, log_level=0))] * 5
        )
    if "xgrammar" in libs:
        import xgrammar

        info = xgrammar.TokenizerInfo(
            vocab.token_bytes, xgrammar.VocabType.RAW, vocab_size=vocab.size, stop_token_ids=[vocab.eos]
        )
        lazy_compiler = xgrammar.GrammarCompiler(info, max_threads=1, enable_dynamic_compilation=True)
        ebnf = "root ::= " + " | ".join(f"w{i}" for i in range(30000)) + "\n"
        ebnf += "\n".join(f'w{i} ::= "{w}" [a-z]{{0,8}}' for i, w in enumerate(words))

        def fresh_matcher() -> Any:
            lazy_compiler.clear_cache()
            return xgrammar.GrammarMatcher(lazy_compiler.compile_grammar(ebnf))

        out["xgrammar: first fill_next_token_bitmask (30000 rules, enable_dynamic_compilation)"] = (
            progress_during_calls([(fresh_matcher, lambda m: m.fill_next_token_bitmask(bitmask))] * 5)
        )
        compiler = xgrammar.GrammarCompiler(info, max_threads=1)
        regex = "(" + "|".join(words[:5000]) + ")"
        out["xgrammar: compile_regex of a 5000-word alternation"] = progress_during_calls(
            [(compiler.clear_cache, lambda _: compiler.compile_regex(regex))] * 5
        )
    if "outlines-core" in libs:
        import outlines_core

        vocabulary = libs["outlines-core"].vocabulary  # type: ignore[attr-defined]
        regex = "(" + "|".join(words[:300]) + ")"
        out["outlines-core: Index() of a 300-word alternation"] = progress_during_calls(
            [(nothing, lambda _: outlines_core.Index(regex, vocabulary))] * 3
        )
        out["outlines-core: write_mask_into"] = "no long call to probe; its Rust source takes no py / allow_threads"
    return out


def measure_gil_and_batch(lib: Library, rounds: int, requests: int) -> dict[str, Any]:
    """The GIL probes (``gil_probes``) on whole JSON-schema requests; and the batch form (llguidance
    ``LLExecutor``, xgrammar ``BatchGrammarMatcher``, 2 threads) filling 8 rows, 8 requests in
    lockstep through the JSON, against 8 single fills."""
    compiled = lib.compile("json", CONSTRAINTS["json_schema"][1])
    mask = new_bitmask(1, lib.vocab.size)
    out: dict[str, Any] = {"work": "whole JSON-schema requests (47 tokens: fill + advance each, then the final mask)"}
    out |= gil_probes(functools.partial(json_request, lib, compiled, mask), rounds, requests)

    batch_rows = 8
    bitmask = new_bitmask(batch_rows, lib.vocab.size)
    tokens = lib.vocab.encoded["json_schema"]
    batch_ns, serial_ns = [], []
    for _ in range(rounds):
        for mode in ("batch", "serial"):
            opened = [lib.new_matcher(compiled, bitmask) for _ in range(batch_rows)]
            batch = lib.batch_fill([m for m, _, _ in opened], bitmask) if mode == "batch" else None
            if mode == "batch" and batch is None:
                continue
            total = 0
            for t in tokens:
                t0 = time.perf_counter_ns()
                if batch is not None:
                    batch()
                else:
                    for i, (_, fill, _) in enumerate(opened):
                        fill(i)
                total += time.perf_counter_ns() - t0
                for _, _, advance in opened:
                    advance(t)
            (batch_ns if mode == "batch" else serial_ns).append(total / len(tokens))
    out["rows"] = batch_rows
    out["serial_8_fills_us_per_step"] = us(statistics.median(serial_ns))
    if batch_ns:
        out["batch_8_rows_us_per_step"] = us(statistics.median(batch_ns))
    return out


def measure_conversion(vocab: Vocab, repeats: int) -> dict[str, Any]:
    """Cost of turning a (1, 1571) int32 bitmask into a torch bool mask of 50,257 / applying it to a
    float32 logits row, with torch at 1 thread (the variants interleaved, medians), in two states."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    lib = LLGuidance(vocab)
    lib.startup()
    compiled = lib.compile("json", CONSTRAINTS["json_schema"][1])
    out: dict[str, Any] = {"torch_threads": 1}
    for state, prefix in (
        ("sparse (JSON start: 1 token allowed)", []),
        ("dense (inside a JSON string)", vocab.encoded["json_schema"][:3]),
    ):
        out[state] = conversion_in_state(lib, compiled, prefix, repeats)
    torch.set_num_threads(threads)
    return out


def conversion_in_state(lib: LLGuidance, compiled: Any, prefix: list[int], repeats: int) -> dict[str, Any]:
    """The conversions of one real bitmask (llguidance's, after ``prefix``), each checked against it."""
    import numpy as np
    import torch

    v = lib.vocab.size
    bitmask = new_bitmask(1, v)
    m, fill, advance = lib.new_matcher(compiled, bitmask)
    for t in prefix:
        fill(0)
        advance(t)
    fill(0)
    shifts = torch.arange(32, dtype=torch.int32)
    lut = torch.tensor(np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little").astype(bool))
    logits = torch.randn(1, v)
    expected = torch.zeros(v, dtype=torch.bool)
    expected[torch.from_numpy(allowed_ids(bitmask[0], v))] = True
    neg_inf = torch.tensor(float("-inf"))
    work = torch.empty(1, v)

    def torch_shift(bitmask: Any = bitmask) -> Any:
        return ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().view(1, -1)[:, :v]

    def numpy_unpackbits(bitmask: Any = bitmask) -> Any:
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")[:v]
        return torch.from_numpy(bits.view(np.bool_)).view(1, -1)

    def torch_lut(bitmask: Any = bitmask) -> Any:
        return lut[bitmask.view(torch.uint8).long()].view(1, -1)[:, :v]

    def allowed_index(bitmask: Any = bitmask) -> Any:
        return np.flatnonzero(np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")[:v])

    def copy_only(logits: Any = logits) -> Any:
        work.copy_(logits)
        return work

    def unpack_masked_fill(logits: Any = logits) -> Any:
        work.copy_(logits)
        return work.masked_fill_(~numpy_unpackbits(), float("-inf"))

    def unpack_where(logits: Any = logits) -> Any:
        return torch.where(numpy_unpackbits(), logits, neg_inf, out=work)

    def shift_masked_fill(logits: Any = logits) -> Any:
        work.copy_(logits)
        return work.masked_fill_(~torch_shift(), float("-inf"))

    def logit_bias(m: Any = m) -> Any:
        return torch.frombuffer(bytearray(m.compute_logit_bias()), dtype=torch.uint8)[:v].bool()

    variants: dict[str, Callable[[], Any]] = {
        "numpy unpackbits -> torch bool": numpy_unpackbits,
        "torch shift & 1 -> bool": torch_shift,
        "torch 256x8 lookup table -> bool": torch_lut,
        "numpy unpackbits + flatnonzero -> allowed ids": allowed_index,
        "copy logits row (baseline)": copy_only,
        "copy + unpackbits + masked_fill_(-inf)": unpack_masked_fill,
        "unpackbits + torch.where(out=)": unpack_where,
        "copy + torch shift + masked_fill_(-inf)": shift_masked_fill,
        "llguidance compute_logit_bias (computes the mask) + frombuffer + bool": logit_bias,
    }
    try:
        import xgrammar

        def xgr_apply(logits: Any = logits, bitmask: Any = bitmask) -> Any:
            work.copy_(logits)
            xgrammar.apply_token_bitmask_inplace(work, bitmask, vocab_size=v)
            return work

        variants["copy + xgrammar.apply_token_bitmask_inplace (its CPU kernel)"] = xgr_apply
    except ImportError:
        pass
    times: dict[str, list[int]] = {name: [] for name in variants}
    for name, fn in variants.items():
        r = fn()
        if "baseline" in name:
            continue
        if isinstance(r, np.ndarray):  # allowed ids
            got = torch.zeros(v, dtype=torch.bool)
            got[torch.from_numpy(r)] = True
        else:
            got = r.view(-1) if r.dtype == torch.bool else torch.isfinite(r.view(-1))
        if not torch.equal(got, expected):
            raise RuntimeError(f"{name} disagrees with the bitmask")
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn)[0])
    entry: dict[str, Any] = {"allowed_tokens": int(expected.sum())}
    entry |= {name: us(statistics.median(ts)) for name, ts in times.items()}
    entry["the library's own fill at this state (cached: same state again)"] = us(
        statistics.median(timed(functools.partial(fill, 0))[0] for _ in range(repeats))
    )
    return entry


def smoke(lib: Library, generations: int, max_tokens: int, seed: int) -> dict[str, Any]:
    """Random allowed tokens (seeded); EOS, when allowed, with probability 1/2; check each output."""
    vocab = lib.vocab
    bitmask = new_bitmask(1, vocab.size)
    out: dict[str, Any] = {}
    for name, (kind, spec, _valid) in CONSTRAINTS.items():
        if not lib.supports(kind):
            out[name] = {"supported": False}
            continue
        compiled = lib.compile(kind, spec)
        counts = {"passed": 0, "invalid": 0, "hit_token_cap": 0, "empty_mask": 0, "rejected_allowed_token": 0}
        examples: list[str] = []
        failures: list[str] = []
        lengths: list[int] = []
        end_states: list[dict[str, Any]] = []
        for k in range(generations):
            rng = random.Random(seed * 1000 + k)
            m, fill, advance = lib.new_matcher(compiled, bitmask)
            ids: list[int] = []
            status = "hit_token_cap"
            for _ in range(max_tokens):
                fill(0)
                allowed = allowed_ids(bitmask[0], vocab.size)
                if len(allowed) == 0:
                    status = "empty_mask"
                    break
                eos_allowed = bool(allowed[-1] == vocab.eos)
                others = allowed[:-1] if eos_allowed else allowed
                if eos_allowed and (len(others) == 0 or rng.random() < 0.5):
                    before = lib.state(m)
                    accepted = advance(vocab.eos)
                    if k < 3:
                        end_states.append({"before_eos": before, "eos_advance": accepted, "after_eos": lib.state(m)})
                    status = "eos"
                    break
                t = int(others[rng.randrange(len(others))])
                if not advance(t):
                    status = "rejected_allowed_token"
                    break
                ids.append(t)
            lengths.append(len(ids))
            text = vocab.decode(ids)
            if status != "eos":
                counts[status] += 1
                failures.append(f"{status}: {text[:120]!r}")
                continue
            ok, why = check_output(name, text)
            if ok:
                counts["passed"] += 1
                if len(examples) < 3:
                    examples.append(text.decode("utf-8"))
            else:
                counts["invalid"] += 1
                failures.append(f"{why}: {text[:160]!r}")
        out[name] = {
            "supported": True,
            "generations": generations,
            **counts,
            "median_tokens": statistics.median(lengths),
            "examples": examples,
            "failures": failures[:5],
            "end_states": end_states,
        }
    return out


def end_of_constraint(lib: Library) -> dict[str, Any]:
    """What the library says mid-way, when accepting but able to go on, and when nothing but EOS fits."""
    vocab = lib.vocab
    bitmask = new_bitmask(1, vocab.size)
    out: dict[str, Any] = {}
    for name, prefix in (("regex_decimal", "12"), ("regex_date", "2024-01-31")):
        kind, spec, _ = CONSTRAINTS[name]
        m, fill, advance = lib.new_matcher(lib.compile(kind, spec), bitmask)
        states = {"start": lib.state(m)}
        for t in vocab.tokenizer.encode(prefix, add_special_tokens=False).ids:
            fill(0)
            advance(t)
        fill(0)
        allowed = allowed_ids(bitmask[0], vocab.size)
        states[f"after {prefix!r}"] = {
            **lib.state(m),
            "allowed_tokens": len(allowed),
            "eos_allowed": bool(len(allowed) and allowed[-1] == vocab.eos),
        }
        states["advance(EOS)"] = advance(vocab.eos)
        states["after EOS"] = lib.state(m)
        try:
            fill(0)
            states["mask after EOS: allowed tokens"] = len(allowed_ids(bitmask[0], vocab.size))
        except Exception as e:
            states["mask after EOS"] = f"{type(e).__name__}: {str(e)[:200]}"
        states["advance(a digit) after EOS"] = advance(vocab.tokenizer.token_to_id("1"))
        states["after a token after EOS"] = lib.state(m)
        out[name] = states
    return out


def regex_semantics(lib: Library) -> dict[str, Any]:
    """Differences found on the way: what ``\\d`` matches (Unicode digits: the lead bytes of
    non-ASCII digits are allowed tokens too); whether an optional group after a complete match can
    still be entered (outlines-core 0.2.14 drops the transition: ``1(\\.5)?`` rejects "1.5"); and
    whether a JSON string admits raw control characters (xgrammar 0.2.9 does under maxLength)."""
    vocab = lib.vocab
    bitmask = new_bitmask(1, vocab.size)
    out: dict[str, Any] = {}
    for regex in (r"\d", "[0-9]"):
        _m, fill, _advance = lib.new_matcher(lib.compile("regex", regex), bitmask)
        fill(0)
        out[f"first-token choices for {regex}"] = len(allowed_ids(bitmask[0], vocab.size))
    for regex, text in ((r"1(\.5)?", "1.5"), (r"[0-9]+(\.[0-9]+)?", "12.5"), ("1(ab)?", "1ab")):
        _m, fill, advance = lib.new_matcher(lib.compile("regex", regex), bitmask)
        ids = [vocab.tokenizer.token_to_id(ch) for ch in text]  # one token per character
        ok = True
        for t in ids:
            fill(0)
            ok = ok and bool((allowed_ids(bitmask[0], vocab.size) == t).any()) and advance(t)
        out[f"{regex} accepts {text!r} (one token per character)"] = ok
    # Raw control characters (U+0000-U+001F) are not allowed in a JSON string (json.loads rejects them).
    control = {i for i, b in enumerate(vocab.token_bytes) if i != vocab.eos and any(c < 0x20 for c in b)}
    quote = vocab.tokenizer.token_to_id('"')
    for schema in ('{"type": "string"}', '{"type": "string", "maxLength": 20}'):
        _m, fill, advance = lib.new_matcher(lib.compile("json", schema), bitmask)
        fill(0)
        advance(quote)
        fill(0)
        allowed = control.intersection(allowed_ids(bitmask[0], vocab.size).tolist())
        out[f"tokens with raw control characters allowed inside {schema}"] = len(allowed)
    return out


def invalid_inputs(lib: Library) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (kind, spec) in INVALID_INPUTS.items():
        if not lib.supports(kind):
            out[name] = "not supported"
            continue
        try:
            lib.compile_cold(kind, spec)
        except Exception as e:
            out[name] = {"raises": f"{type(e).__module__}.{type(e).__qualname__}", "message": str(e)[:400]}
        else:
            out[name] = "accepted"
    if isinstance(lib, LLGuidance):
        import llguidance

        g = llguidance.LLMatcher.grammar_from_regex("(ab")
        m = llguidance.LLMatcher(lib.tok, g, log_level=0)
        out["note"] = (
            "LLMatcher(...) never raises on grammar errors: is_error() is True and get_error() has the message; "
            "LLMatcher.validate_grammar(grammar, tokenizer) returns it as a string ('' when valid); "
            "grammar_from_json_schema raises ValueError only when the text is not JSON."
        )
        out["example_is_error"] = m.is_error()
        out["example_validate_grammar"] = llguidance.LLMatcher.validate_grammar(g, lib.tok)[:200]
    return out


def schema_features(lib: Library) -> dict[str, str]:
    probes = {
        "format_email": {"type": "string", "format": "email"},
        "format_date_time": {"type": "string", "format": "date-time"},
        "uniqueItems": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
        "oneOf": {"oneOf": [{"type": "integer"}, {"type": "string"}]},
        "ref_defs": {"$defs": {"a": {"type": "integer"}}, "type": "object", "properties": {"x": {"$ref": "#/$defs/a"}}},
        "exclusiveMinimum": {"type": "number", "exclusiveMinimum": 0},
        "multipleOf": {"type": "integer", "multipleOf": 5},
        "const": {"const": "x"},
        "patternProperties": {"type": "object", "patternProperties": {"^a": {"type": "integer"}}},
    }
    out = {}
    for name, schema in probes.items():
        try:
            lib.compile("json", json.dumps(schema))
            out[name] = "compiles"
        except Exception as e:
            out[name] = f"{type(e).__name__}: {str(e)[:120]}"
    return out


def package_facts(dist_name: str) -> dict[str, Any]:
    dist = importlib.metadata.distribution(dist_name)
    meta = dist.metadata
    wheel = dist.read_text("WHEEL") or ""
    size = 0
    for f in dist.files or []:
        if f.size:
            size += int(f.size)
    return {
        "version": dist.version,
        "license": meta.get("License-Expression") or meta.get("License"),
        "license_classifiers": [c for c in meta.get_all("Classifier") or [] if c.startswith("License")],
        "requires_python": meta.get("Requires-Python"),
        "requires_dist": [r for r in meta.get_all("Requires-Dist") or [] if "extra ==" not in r],
        "wheel_tags": [line.split(":", 1)[1].strip() for line in wheel.splitlines() if line.startswith("Tag:")],
        "installed_mb": round(size / 2**20, 1),
    }


def resolve_deps(requirement: str, *extra: str) -> dict[str, Any]:
    """What ``pip install`` would bring into an empty environment (a dry run against the package index)."""
    with tempfile.TemporaryDirectory() as d:
        report = Path(d) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
        cmd += ["--report", str(report), requirement, *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            return {"error": proc.stderr[-1000:]}
        data = json.loads(report.read_text())
    items = sorted(f"{i['metadata']['name']}=={i['metadata']['version']}" for i in data["install"])
    return {
        "count": len(items),
        "packages": items,
        "nvidia_or_cuda": [i for i in items if i.lower().startswith(("nvidia", "cuda"))],
        "torch": [i for i in items if i.lower().startswith(("torch==", "triton=="))],
    }


# -- main -------------------------------------------------------------------------------------------


def tokenizer_notes(vocab: Vocab) -> dict[str, Any]:
    """transformers 5 builds GPT2TokenizerFast from the two files with vocab=/merges=; the older
    vocab_file=/merges_file= keywords are accepted and ignored (a 1-token tokenizer, no error)."""
    try:
        from transformers import GPT2TokenizerFast
    except ImportError:
        return {"transformers": "not installed"}
    old = GPT2TokenizerFast(vocab_file=vocab.encoder_json, merges_file=vocab.vocab_bpe)
    new = GPT2TokenizerFast(vocab=vocab.encoder_json, merges=vocab.vocab_bpe)
    return {
        "GPT2TokenizerFast(vocab_file=, merges_file=) vocab size": len(old),
        "GPT2TokenizerFast(vocab=, merges=) vocab size": len(new),
        "GPT2TokenizerFast(vocab=, merges=) encodes like the project": all(
            new.encode(valid) == vocab.encoded[name] for name, (_, _, valid) in CONSTRAINTS.items()
        ),
    }


def summary_table(results: dict[str, Any]) -> str:
    rows = [
        "| | " + " | ".join(LIBRARIES) + " |",
        "|---|" + "---|" * len(LIBRARIES),
    ]

    def row(label: str, fn: Callable[[dict[str, Any]], Any]) -> None:
        cells = []
        for lib in LIBRARIES:
            try:
                cells.append(str(fn(results["libraries"][lib])))
            except (KeyError, TypeError):
                cells.append("n/a")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")

    row("startup ms", lambda r: r["startup"]["default"]["ms_median"])
    row("import ms", lambda r: r["import"]["import_ms_median"])
    for name in CONSTRAINTS:
        row(f"compile {name} ms", lambda r, n=name: r["timing"][n]["compile_ms_median"])
    for name in CONSTRAINTS:
        row(
            f"mask {name} µs median / p99",
            lambda r, n=name: f"{r['timing'][n]['mask_us_median']} / {r['timing'][n]['mask_us_p99']}",
        )
    row("first mask json µs", lambda r: r["timing"]["json_schema"]["first_mask_us_median"])
    row("2 threads / serial (requests)", lambda r: r["gil"]["two_threads_over_serial"])
    row("Python thread's progress beside it", lambda r: r["gil"]["python_thread_progress_beside_it"])
    for name in CONSTRAINTS:
        row(f"smoke {name}", lambda r, n=name: f"{r['smoke'][n]['passed']}/{r['smoke'][n]['generations']}")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dump-vocab", type=Path, help="(internal) write the project tokenizer's vocabulary and exit")
    ap.add_argument("--project-python", default=str(ROOT / ".venv" / "bin" / "python"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=10, help="requests per constraint per round")
    ap.add_argument("--generations", type=int, default=50)
    ap.add_argument("--max-tokens", type=int, default=400)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--quick", action="store_true", help="1 round of 3 requests, 10 generations")
    ap.add_argument("--resolve-deps", action="store_true", help="also record pip --dry-run resolutions")
    ap.add_argument("--libraries", nargs="*", default=list(LIBRARIES))
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.dump_vocab:
        dump_vocab(args.dump_vocab)
        return
    if args.quick:
        args.rounds, args.runs, args.generations = 1, 3, 10

    import numpy
    import torch

    vocab = load_vocab(args.project_python)
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    results: dict[str, Any] = {
        "machine": {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": numpy.__version__},
        "settings": {k: v for k, v in vars(args).items() if k not in ("dump_vocab", "out")} | {"out": str(args.out)},
        "vocab": {
            "size": vocab.size,
            "eos": vocab.eos,
            "encoded_tokens": {k: len(v) for k, v in vocab.encoded.items()},
        },
        "constraints": {
            name: {"kind": kind, "spec": spec, "valid": valid} for name, (kind, spec, valid) in CONSTRAINTS.items()
        },
        "libraries": {},
    }
    libs: dict[str, Library] = {}
    for name in args.libraries:
        lib = ADAPTERS[name](vocab)
        entry: dict[str, Any] = {"package": package_facts(name)}
        print(f"[{name}] import and startup", flush=True)
        entry["import"] = measure_import(lib.module, 3)
        entry["startup"] = measure_startup(lib, 3 if args.quick else 5)
        results["libraries"][name] = entry
        libs[name] = lib
    # Timing in rounds, the libraries' order rotating, so that a noisy stretch hits all of them.
    per_round: dict[str, list[dict[str, Any]]] = {n: [] for n in libs}
    names = list(libs)
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            print(f"[round {r + 1}/{args.rounds}] {name} compile + per-token masks", flush=True)
            per_round[name].append(measure_library(libs[name], 1, args.runs))
    for name, lib in libs.items():
        entry = results["libraries"][name]
        entry["timing"] = merge_rounds(per_round[name])
        print(f"[{name}] GIL, batch, end states, invalid inputs, schema features, smoke", flush=True)
        entry["gil"] = measure_gil_and_batch(lib, max(3, args.rounds), 5 if args.quick else 20)
        entry["end_of_constraint"] = end_of_constraint(lib)
        entry["invalid_inputs"] = invalid_inputs(lib)
        entry["regex_semantics"] = regex_semantics(lib)
        entry["schema_features"] = schema_features(lib)
        entry["smoke"] = smoke(lib, args.generations, args.max_tokens, args.seed)
    print("GIL probes", flush=True)
    results["gil_controls"] = gil_controls(max(3, args.rounds))
    results["gil_long_calls"] = gil_long_calls(vocab, libs)
    results["conversion_us"] = measure_conversion(vocab, 200 if args.quick else 1000)
    if args.resolve_deps:
        print("pip --dry-run resolutions", flush=True)
        results["resolve_deps"] = {
            "llguidance": resolve_deps("llguidance==1.9.1"),
            "outlines-core": resolve_deps("outlines-core==0.2.14"),
            "xgrammar": resolve_deps("xgrammar==0.2.9"),
            "xgrammar with torch==2.13.0": resolve_deps("xgrammar==0.2.9", "torch==2.13.0"),
        }
    results["machine"]["loadavg_before_after"] = [load_before, Path("/proc/loadavg").read_text().split()[:3]]
    results["tokenizer_notes"] = tokenizer_notes(vocab)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(summary_table(results))
    print(f"wrote {args.out}")


def merge_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per constraint: the median over rounds of each per-round figure, and the per-round values."""
    out: dict[str, Any] = {}
    for name in rounds[0]:
        first = rounds[0][name]
        if not first.get("supported"):
            out[name] = first
            continue
        merged: dict[str, Any] = {"supported": True, "tokens": first["tokens"]}
        merged["valid_output_error"] = first["valid_output_error"]
        for key, value in first.items():
            if key in ("supported", "tokens") or key.endswith("_all"):
                continue
            if isinstance(value, int | float) and not isinstance(value, bool):
                values = [r[name][key] for r in rounds]
                merged[key] = round(statistics.median(values), 3)
                merged[key + "_rounds"] = values
        out[name] = merged
    return out


if __name__ == "__main__":
    main()
