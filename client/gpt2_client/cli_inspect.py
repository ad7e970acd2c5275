"""gpt2-client inspect: look inside GPT-2 from the command line (the Introspection service).

    gpt2-client inspect tokens "cat sat on the"
    gpt2-client inspect embed "bank is near the river bank" --png similarity.png
    gpt2-client inspect embed "cat dog king queen apple" --pca --png pca.png
    gpt2-client inspect attention "cat sat on the" --layer 0 --head 1 --scores --png head.png
    gpt2-client inspect attention "cat sat on the" --layer 5 --png heads.png
    gpt2-client inspect attention "cat sat on the" --all-layers --png overview.png
    gpt2-client inspect hidden "cat sat on the" --png norms.png
    gpt2-client inspect next "cat sat on the" --top-k 50 --temperature 0.7 --seed 1 --png next.png
    gpt2-client inspect trace "cat sat on the"

Tables go to stdout (tokens with visible whitespace: ␣ for a space, ↵ for a newline), under a
first line that says so when the server runs random weights; --json prints the whole result
instead; --png FILE also draws it (needs matplotlib: the plot extra, pip install
'gpt2-serve[plot]'). --ids reads the input as token ids ("9246 3332 319 262").
"""

# The docstring above is the help text of "gpt2-client inspect" (plain text: argparse shows it as
# it is); cli.py registers the command with add_inspect_command.

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gpt2_client.client import Client
from gpt2_client.inspect import (
    AttentionResult,
    Candidate,
    EmbedResult,
    GenerationStep,
    HiddenStatesResult,
    InputToken,
    PredictNextResult,
    TokenizeResult,
    TraceResult,
)
from gpt2_client.params import Prompt
from gpt2_client.plots import final_layer_norm_note, token_label
from gpt2_client.results import ModelInfo
from gpt2_client.tensors import TensorDtype

MAX_MATRIX_TOKENS = 16  # wider than this and a [seq, seq] matrix is summarised instead of printed
MAX_NORM_COLUMNS = 8  # more tokens than this and hidden-state norms are summarised per layer
TOP_KEYS = 3  # keys listed per query when an attention matrix is too wide to print
RANDOM_WEIGHTS_TITLE = " — random weights"  # appended to every picture's title when so

# The first line of each inspect table when the server runs random weights: what is still real.
RANDOM_WEIGHTS_LINES = {
    "tokens": "the tokenizer is GPT-2's own, so these token ids and pieces are real",
    "embed": "the token ids and the arithmetic are real; the vectors and their similarities carry no meaning",
    "attention": "the causal mask and the arithmetic are real; where the heads look carries no meaning",
    "hidden": "the arithmetic is real; the norms carry no learned meaning",
    "next": "the token ids and the arithmetic are real, the numbers carry no meaning: the next-token distribution "
            "is nearly flat{entropy}, so temperatures near 1 look alike",
}  # fmt: skip

AddCommon = Callable[[argparse.ArgumentParser, bool], None]


# -- output helpers ------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "") -> str:
    """Aligned columns: numbers right-aligned, text left-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    numeric = [all(isinstance(row[i], int | float) for row in rows) if rows else False for i in range(len(headers))]
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return (indent + "  ".join(parts)).rstrip()

    return "\n".join([line(headers), *(line(row) for row in cells)])


def _cell(value: object) -> str:
    if isinstance(value, float):
        if math.isinf(value):
            return "-inf" if value < 0 else "inf"
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.2e}"  # e.g. the probabilities of a 50257-way softmax
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def show(token: InputToken | Candidate | str) -> str:
    """A token's text with visible whitespace; raw bytes for a piece of a character."""
    if isinstance(token, InputToken) and token.partial:
        return "<" + " ".join(f"{b:02x}" for b in token.data) + ">"
    return token_label(token if isinstance(token, str) else token.text)


def to_json(value: Any) -> Any:
    """Results as JSON values: dataclasses as objects, arrays as nested lists, bytes as hex."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, np.ndarray):
        return [to_json(v) for v in value] if value.ndim else to_json(value.item())
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no inf/nan
    if isinstance(value, np.floating):
        return to_json(float(value))
    return value


def _print_json(value: Any) -> None:
    print(json.dumps(to_json(value), ensure_ascii=False), flush=True)


def _labels(tokens: Sequence[InputToken]) -> list[str]:
    return [show(t) for t in tokens]


def _plot(draw: Callable[[], Path]) -> int:
    """Run one plots.py call; 0, or 2 when matplotlib is missing."""
    try:
        path = draw()
    except ImportError:
        print("gpt2-client: --png needs matplotlib: pip install 'gpt2-serve[plot]'", file=sys.stderr)
        return 2
    print(f"[wrote {path}]", file=sys.stderr)
    return 0


def _prompt(args: argparse.Namespace) -> Prompt:
    if not args.ids:
        text: str = args.text
        return text
    try:
        return [int(part) for part in args.text.replace(",", " ").split()]
    except ValueError:
        print(f"gpt2-client: --ids takes token ids separated by spaces or commas, got {args.text!r}", file=sys.stderr)
        raise SystemExit(2) from None


def _model_info(client: Client, args: argparse.Namespace) -> ModelInfo | None:
    """The served model, asked once per command, when a table or a picture will say random weights."""
    return client.model_info() if not args.json or args.png is not None else None


def _print_random_weights(info: ModelInfo | None, what: str, entropy: float | None = None) -> None:
    if (line := random_weights_line(info, what, entropy)) is not None:
        print(line)


def random_weights_line(info: ModelInfo | None, what: str, entropy: float | None = None) -> str | None:
    """The first line of a table when the model has random weights (``RANDOM_WEIGHTS_LINES``), else None."""
    if info is None or not info.random_weights:
        return None
    near = ""
    if entropy is not None:
        near = f" (entropy {entropy:.2f} of at most ln {info.vocab_size} = {math.log(info.vocab_size):.2f} nats)"
    note = RANDOM_WEIGHTS_LINES[what].format(entropy=near)
    return f"[random weights: an untrained model; {note}]"


def _titled(title: str, info: ModelInfo | None, why: str = "") -> str:
    """A picture's title, saying "random weights" (and ``why`` it matters) when so."""
    return title + (RANDOM_WEIGHTS_TITLE + why if info is not None and info.random_weights else "")


# -- commands ------------------------------------------------------------------------------------


def cmd_tokens(client: Client, args: argparse.Namespace) -> int:
    result: TokenizeResult = client.inspect.tokenize(_prompt(args))
    if args.json:
        _print_json({**to_json(result), "token_ids": result.token_ids})
        return 0
    _print_random_weights(client.model_info(), "tokens")
    print(f"text: {json.dumps(result.text, ensure_ascii=False)}  ({len(result.tokens)} tokens)")
    print(f"ids:  {result.token_ids}")
    rows = [(i, t.id, show(t), t.start, t.end, json.dumps(result.text[t.start : t.end], ensure_ascii=False))
            for i, t in enumerate(result.tokens)]  # fmt: skip
    if rows:
        print(table(["#", "id", "token", "start", "end", "text[start:end]"], rows))
    return 0


def cmd_embed(client: Client, args: argparse.Namespace) -> int:
    result: EmbedResult = client.inspect.embed(_prompt(args), dtype=args.dtype)
    info = _model_info(client, args)
    if args.json:
        _print_json(result)
    else:
        _print_random_weights(info, "embed")
        _print_embed(result)
    if args.png is None:
        return 0
    from gpt2_client import plots

    labels = _labels(result.tokens)
    if args.pca:
        vectors = {"token": result.token_embeddings, "position": result.position_embeddings,
                   "input": result.input_embeddings}[args.embedding]  # fmt: skip
        title = _titled(f"{args.embedding} embeddings, first two principal components", info)
        return _plot(lambda: plots.embedding_pca(vectors, labels, args.png, title=title))
    title = _titled(f"cosine similarity of the input embeddings, {len(labels)} tokens", info)
    return _plot(lambda: plots.similarity_matrix(result.cosine_similarity, labels, args.png, title=title))


def _print_embed(result: EmbedResult) -> None:
    seq, d_model = result.input_embeddings.shape
    print(f"{seq} tokens, d_model {d_model}; input embedding = token embedding (wte) + position embedding (wpe)")
    norms = [np.linalg.norm(x, axis=-1) for x in (result.token_embeddings, result.position_embeddings,
                                                   result.input_embeddings)]  # fmt: skip
    rows = [(i, t.id, show(t), float(norms[0][i]), float(norms[1][i]), float(norms[2][i]),
             " ".join(f"{v:+.3f}" for v in result.token_embeddings[i, :4]))
            for i, t in enumerate(result.tokens)]  # fmt: skip
    print(table(["#", "id", "token", "|token|", "|position|", "|input|", "token embedding[:4]"], rows))
    print()
    print("cosine similarity of the input embeddings:")
    print(_matrix(result.cosine_similarity, result.tokens))
    if seq > 1:
        first, last = result.tokens[0], result.tokens[-1]
        value = float(result.cosine_similarity[0, -1])
        print(f"\nfirst vs last token ({show(first)} @0, {show(last)} @{seq - 1}): {value:.4f}")


def _matrix(matrix: npt.NDArray[np.float32], tokens: Sequence[InputToken]) -> str:
    """A [seq, seq] matrix with token labels, or a note when too wide to read."""
    seq = matrix.shape[0]
    if seq > MAX_MATRIX_TOKENS:
        return f"  ({seq}x{seq}: too wide to print; use --png or --json)"
    labels = [f"{i}:{show(t)}" for i, t in enumerate(tokens)]
    rows = [[labels[i], *(float(v) for v in matrix[i])] for i in range(seq)]
    return table(["", *labels], rows, indent="  ")


def cmd_attention(client: Client, args: argparse.Namespace) -> int:
    if args.all_layers and (args.layer is not None or args.head is not None):
        print("gpt2-client: --all-layers shows every layer and head; it takes neither --layer nor --head",
              file=sys.stderr)  # fmt: skip
        return 2
    layer = 0 if args.layer is None else args.layer
    heads = [args.head] if args.head is not None else None
    result: AttentionResult = client.inspect.attention(
        _prompt(args), layers=None if args.all_layers else [layer], heads=heads, include_scores=args.scores,
        dtype=args.dtype,
    )  # fmt: skip
    info = _model_info(client, args)
    if args.json:
        _print_json(result)
    else:
        _print_random_weights(info, "attention")
        if args.all_layers:
            _print_layers(result)
        elif args.head is not None:
            _print_one_head(result)
        else:
            _print_heads(result)
    if args.png is None:
        return 0
    from gpt2_client import plots

    labels = _labels(result.tokens)
    count = f"{len(labels)} tokens"
    if args.all_layers:
        title = _titled(f"attention, every layer and head, {count}", info)
        return _plot(lambda: plots.attention_overview(result.weights, labels, args.png, layers=result.layers,
                                                      heads=result.heads, title=title))  # fmt: skip
    if args.head is not None:
        title = _titled(f"attention, layer {layer} head {args.head}, {count}", info)
        return _plot(lambda: plots.attention_heatmap(result.weights[0, 0], labels, args.png, title=title))
    title = _titled(f"attention by head, layer {layer}, {count}", info)
    return _plot(lambda: plots.attention_grid(result.weights[0], labels, args.png, heads=result.heads, title=title))


def _print_one_head(result: AttentionResult) -> None:
    layer, head = result.layers[0], result.heads[0]
    weights = result.weights[0, 0]
    if result.scores is not None:
        print(f"layer {layer} head {head}: scaled scores q.k/sqrt(d_head), causal mask (-inf above the diagonal)")
        print(_matrix(result.scores[0, 0], result.tokens))
        print()
    print(f"layer {layer} head {head}: attention weights = softmax(scores); row = query, column = key")
    if weights.shape[0] <= MAX_MATRIX_TOKENS:
        print(_matrix(weights, result.tokens))
        return
    rows = []
    for q, token in enumerate(result.tokens):
        top = np.argsort(-weights[q, : q + 1], kind="stable")[:TOP_KEYS]
        rows.append((q, show(token), "  ".join(f"{k}:{show(result.tokens[k])} {weights[q, k]:.2f}" for k in top)))
    print(table(["#", "query", f"top {TOP_KEYS} keys (position:token weight)"], rows))


def _print_heads(result: AttentionResult) -> None:
    """Per head of one layer: where attention goes on average, the usual head types' signatures."""
    seq = result.weights.shape[-1]
    print(f"layer {result.layers[0]}: mean attention per query, by head ({seq} tokens; --head H for one head)")
    stats = _head_stats(result.weights[0])
    rows = [(head, *(float(column[i]) for column in stats)) for i, head in enumerate(result.heads)]
    print(table(["head", "self", "previous", "first token", "entropy (nats)"], rows))


def _print_layers(result: AttentionResult) -> None:
    """Per layer (--all-layers): the heads' mean entropy, and which head attends most to the
    previous token, to the first token and to itself, with that mean weight."""
    seq = result.weights.shape[-1]
    uniform = float(np.mean(np.log(np.arange(1, seq + 1))))
    print(f"every layer: mean attention per query ({seq} tokens; uniform attention over each prefix would have "
          f"entropy {uniform:.2f} nats)")  # fmt: skip
    rows = []
    for i, layer in enumerate(result.layers):
        own, previous, first, entropy = _head_stats(result.weights[i])

        def most(values: npt.NDArray[np.float64]) -> str:
            best = int(np.argmax(values))
            return f"head {result.heads[best]} ({values[best]:.2f})"

        rows.append((layer, float(entropy.mean()), most(previous), most(first), most(own)))
    print(table(["layer", "mean entropy (nats)", "most on previous", "most on first token", "most on self"], rows))
    print("(each cell: the head with the largest mean weight on that token over the queries, and the weight; "
          "--layer L shows every head of a layer)")  # fmt: skip


def _head_stats(weights: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.float64], ...]:
    """For weights [heads, seq, seq]: per head, the mean weight of a query on itself, on the
    previous token and on the first token, and the mean entropy of its rows (nats)."""
    w = weights.astype(np.float64)
    seq = w.shape[-1]
    own = np.diagonal(w, axis1=-2, axis2=-1).mean(axis=-1)
    previous = np.diagonal(w, offset=-1, axis1=-2, axis2=-1).mean(axis=-1) if seq > 1 else np.zeros(w.shape[0])
    first = w[:, :, 0].mean(axis=-1)
    entropy = -(w * np.log(np.where(w > 0, w, 1.0))).sum(axis=-1).mean(axis=-1)
    return own, previous, first, entropy


def cmd_hidden(client: Client, args: argparse.Namespace) -> int:
    result: HiddenStatesResult = client.inspect.hidden_states(
        _prompt(args), layers=args.layers or None, last_token_only=args.last_token_only, dtype=args.dtype
    )
    if args.json and args.png is None:
        _print_json(result)
        return 0
    info = client.model_info()  # n_layer names the states, d_model sizes ln_f's norm
    if args.json:
        _print_json(result)
    else:
        _print_random_weights(info, "hidden")
        _print_hidden(result, info)
    if args.png is None:
        return 0
    from gpt2_client import plots

    labels = [show(result.tokens[p]) for p in result.positions]
    return _plot(lambda: plots.hidden_state_norms(
        result.norms, args.png, layers=result.layers, tokens=labels,
        title=_titled(f"hidden-state norms by layer, {len(result.tokens)} tokens", info),
        final_layer_norm=result.layers[-1] == info.n_layer, d_model=info.d_model,
    ))  # fmt: skip


def _print_hidden(result: HiddenStatesResult, info: ModelInfo) -> None:
    print("L2 norm of each hidden state (Hugging Face's output_hidden_states indices)")
    names = [_state_name(layer, info.n_layer) for layer in result.layers]
    if len(result.positions) <= MAX_NORM_COLUMNS:
        headers = ["state", "", *(f"{p}:{show(result.tokens[p])}" for p in result.positions)]
        rows = [[layer, name, *(float(v) for v in norms)]
                for layer, name, norms in zip(result.layers, names, result.norms, strict=True)]  # fmt: skip
    else:
        headers = ["state", "", "mean", "min", "max", f"last ({show(result.tokens[result.positions[-1]])})"]
        rows = [[layer, name, float(n.mean()), float(n.min()), float(n.max()), float(n[-1])]
                for layer, name, n in zip(result.layers, names, result.norms, strict=True)]  # fmt: skip
    print(table(headers, rows))
    if info.n_layer in result.layers:
        print()
        print(textwrap.fill(final_layer_norm_note(info.d_model), 100))


def _state_name(layer: int, n_layer: int) -> str:
    """Hidden state ``layer``: 0 = the input embeddings, i = the residual stream after block i-1
    (blocks numbered from 0, as in ``attention --layer``), n_layer = after the final LayerNorm."""
    if layer == 0:
        return "embeddings"
    if layer == n_layer:
        return f"after block {layer - 1} + ln_f"
    return f"after block {layer - 1}"


def cmd_next(client: Client, args: argparse.Namespace) -> int:
    result: PredictNextResult = client.inspect.predict_next(
        _prompt(args), temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        num_samples=args.num_samples, num_candidates=args.candidates,
    )  # fmt: skip
    info = _model_info(client, args)
    settings = _trace_settings(_sampling(args), result.seed)
    if args.json:
        _print_json(result)
    else:
        _print_random_weights(info, "next", result.entropy)
        _print_prediction(result, settings)
    if args.png is None:
        return 0
    from gpt2_client import plots

    labels = [show(c) for c in result.candidates]
    title = (f"next token after {json.dumps(_input_text(result.tokens), ensure_ascii=False)}: {settings}; "
             f"{_entropies(result.entropy, result.sampled_entropy)}")  # fmt: skip
    return _plot(lambda: plots.top_k_bar(
        labels, [c.probability for c in result.candidates], args.png,
        sampled_probabilities=[c.sampled_probability for c in result.candidates],
        title=_titled(title, info, ": nearly flat"), vocab_size=info.vocab_size if info is not None else None,
    ))  # fmt: skip


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}


def _input_text(tokens: Sequence[InputToken]) -> str:
    text = "".join(t.text for t in tokens)
    return text if len(text) <= 40 else "…" + text[-39:]


def _entropies(raw: float, sampled: float) -> str:
    """The two entropies side by side: how much temperature and the filters narrow the choice."""
    return f"entropy {raw:.3f} nats raw, {sampled:.3f} after temperature and filters"


def _print_prediction(result: PredictNextResult, settings: str) -> None:
    print(f"next token after {json.dumps(_input_text(result.tokens), ensure_ascii=False)} "
          f"({len(result.tokens)} tokens): {settings}")  # fmt: skip
    print(_entropies(result.entropy, result.sampled_entropy))
    rows = [(rank, c.id, show(c), c.logit, c.probability, c.sampled_probability)
            for rank, c in enumerate(result.candidates, start=1)]  # fmt: skip
    print(table(["rank", "id", "token", "logit", "probability", "after temperature/filters"], rows))
    greedy = result.greedy_token
    print(f"greedy: {show(greedy)} (id {greedy.id}, p={_cell(greedy.probability)})")
    if result.sampled_tokens:
        drawn = " ".join(show(c) for c in result.sampled_tokens)
        print(f"sampled ({len(result.sampled_tokens)}, seed {result.seed}): {drawn}")


def cmd_trace(client: Client, args: argparse.Namespace) -> int:
    result: TraceResult = client.inspect.trace(
        _prompt(args), temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        num_samples=args.num_samples, num_candidates=args.candidates,
    )  # fmt: skip
    if args.json:
        _print_json(result)
        return 0
    _print_random_weights(client.model_info(), "next", result.prediction.entropy)
    print(f"one forward pass over {len(result.tokens)} tokens: " + " ".join(show(t) for t in result.tokens))
    rows = []
    for stage in result.stages:
        stats = stage.output_stats
        numbers: list[object] = (
            [stats.mean, stats.std, stats.l2_norm, stats.min, stats.max] if stats is not None else [""] * 5
        )
        rows.append([stage.name, _shape(stage.input_shape), _shape(stage.output_shape),
                     stage.seconds * 1000, *numbers])  # fmt: skip
    print(table(["stage", "input", "output", "ms", "mean", "std", "l2 norm", "min", "max"], rows))
    print(f"total {result.seconds * 1000:.2f} ms")
    print()
    _print_prediction(result.prediction, _trace_settings(_sampling(args), result.prediction.seed))
    return 0


def _shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _trace_settings(options: dict[str, Any], seed: int | None) -> str:
    """The sampler's settings as a title says them: T, k and p always, min-p and typical-p when set."""
    temperature = options.get("temperature")
    temperature = 1.0 if temperature is None else temperature
    top_k, top_p = options.get("top_k") or 0, options.get("top_p")
    parts = [f"T={temperature:g}" + (" (greedy)" if temperature == 0 else ""),
             f"top-k {top_k}" if top_k else "top-k off",
             f"top-p {top_p:g}" if top_p is not None and top_p < 1 else "top-p off"]  # fmt: skip
    if options.get("min_p"):
        parts.append(f"min-p {options['min_p']:g}")
    if options.get("typical_p") is not None and options["typical_p"] < 1:
        parts.append(f"typical-p {options['typical_p']:g}")
    if seed is not None and temperature != 0:  # greedy steps draw nothing
        parts.append(f"seed {seed}")
    return ", ".join(parts)


def describe_generation_trace(
    steps: Sequence[GenerationStep], prompt: str, options: dict[str, Any], num_candidates: int, info: ModelInfo | None
) -> str:
    """generate --trace in text mode: a header, then per step the context length, the top
    candidates (logit, raw p, p after temperature, after each filter in use; the chosen token
    marked >), the draw (uniform number and its index in the seed's stream) and the events."""
    temperature = options.get("temperature")
    temperature = 1.0 if temperature is None else temperature
    columns: list[tuple[str, Callable[[Any], float]]] = [
        ("logit", lambda c: c.logit), ("raw p", lambda c: c.probability),
        (f"p(T={temperature:g})", lambda c: c.after_temperature),
    ]  # fmt: skip
    if options.get("top_k"):
        columns.append(("p(top-k)", lambda c: c.after_top_k))
    if options.get("top_p") is not None and options["top_p"] < 1:
        columns.append(("p(top-p)", lambda c: c.after_top_p))
    if options.get("min_p"):
        columns.append(("p(min-p)", lambda c: c.after_min_p))
    if options.get("typical_p") is not None and options["typical_p"] < 1:
        columns.append(("p(typical-p)", lambda c: c.after_typical_p))
    note = random_weights_line(info, "next", steps[0].entropy if steps else None)
    lines = [note] if note is not None else []
    seed = steps[0].seed if steps else None
    shown = json.dumps(prompt if len(prompt) <= 40 else "…" + prompt[-39:], ensure_ascii=False)
    lines.append(f"generation trace of {shown}: {_trace_settings(options, seed)}")
    for step in steps:
        lines.append("")
        lines.append(f"step {step.step}: context {step.context_length} tokens, "
                     f"{_entropies(step.entropy, step.sampled_entropy)}")  # fmt: skip
        if step.shifted:
            lines.append(f"  [context shift: the window was full; the earliest tokens were dropped, the model "
                         f"now sees the last {step.context_length}]")  # fmt: skip
        rows = [[">" if c.id == step.chosen.id else "", c.rank, c.id, show(c.text), *(get(c) for _, get in columns)]
                for c in step.candidates[:num_candidates]]  # fmt: skip
        lines.append(table(["", "rank", "id", "token", *(name for name, _ in columns)], rows, indent="  "))
        chosen = step.chosen
        what = f"{show(chosen.text)} (id {chosen.id}, rank {chosen.rank}, raw p {_cell(chosen.probability)}"
        if step.uniform is None:
            lines.append(f"  greedy: {what}; temperature 0, no draw)")
        else:
            lines.append(f"  drew {what}, final p {_cell(chosen.sampled_probability)}) with u={step.uniform:.4f} "
                         f"(draw {step.draw_index} of seed {step.seed})")  # fmt: skip
        lines.append(f"  text so far: {json.dumps(step.text_so_far, ensure_ascii=False)}")
        if step.stop is not None:
            lines.append(f"  [stop: {step.stop}]")
    return "\n".join(lines)


def cmd_generation_trace(
    client: Client,
    prompt: str,
    options: dict[str, Any],
    candidates: int | None,
    png: Path | None,
    as_json: bool,
) -> int:
    """``gpt2-client generate ... --trace``: TraceGeneration with the prompt and the sampling flags."""
    num_candidates = 5 if candidates is None else candidates
    steps = client.inspect.trace_generation(prompt, num_candidates=num_candidates, **options)
    info = client.model_info()
    if as_json:
        _print_json(steps)
    else:
        print(describe_generation_trace(steps, prompt, options, num_candidates, info), flush=True)
    if png is None or not steps:
        return 0
    from gpt2_client import plots

    ids = [[c.id for c in step.candidates] for step in steps]
    chosen = [
        row.index(step.chosen.id) if step.chosen.id in row else None for row, step in zip(ids, steps, strict=True)
    ]
    rows = [f"{step.step}: ctx {step.context_length}" + (" (shift)" if step.shifted else "")
            + ("" if i is not None else f" → {show(step.chosen.text)} rank {step.chosen.rank}")
            for step, i in zip(steps, chosen, strict=True)]  # fmt: skip
    title = _titled(f"generation step by step: {_trace_settings(options, steps[0].seed)}", info, ": nearly flat")
    return _plot(lambda: plots.generation_steps(
        [[c.after_typical_p for c in step.candidates] for step in steps],
        [[show(c.text) for c in step.candidates] for step in steps], chosen, png, step_labels=rows, title=title,
    ))  # fmt: skip


# -- command line --------------------------------------------------------------------------------


def add_inspect_command(commands: Any, add_common: AddCommon) -> None:
    """``gpt2-client inspect <what> TEXT``; ``add_common(parser, suppress)`` adds cli.py's
    connection and output flags to each subcommand."""
    inspect = commands.add_parser("inspect", help="look inside the model: tokens, embeddings, attention, ...",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_common(inspect, True)
    what = inspect.add_subparsers(dest="what", required=True, metavar="{tokens,embed,attention,hidden,next,trace}")

    def add(name: str, help: str, run: Callable[[Client, argparse.Namespace], int], png: str | None) -> Any:
        p = what.add_parser(name, help=help, description=help)
        p.add_argument("text", help="the input text (or token ids with --ids)")
        p.add_argument("--ids", action="store_true", help='TEXT is token ids, e.g. "9246 3332 319 262"')
        if png is not None:
            p.add_argument("--png", type=Path, metavar="FILE", help=f"also draw {png} into FILE (needs matplotlib)")
        add_common(p, True)
        p.set_defaults(run=run, png=None)
        return p

    add("tokens", "token ids, pieces and character offsets", cmd_tokens, None)

    embed = add("embed", "token + position embeddings and their cosine similarity", cmd_embed,
                "the cosine-similarity matrix (or, with --pca, a 2-D PCA of the embeddings)")  # fmt: skip
    embed.add_argument("--pca", action="store_true", help="--png draws a 2-D PCA of the embeddings instead")
    embed.add_argument("--embedding", choices=["token", "position", "input"], default="token",
                       help="which embeddings the PCA projects (default: token)")  # fmt: skip
    _add_dtype(embed)

    attention = add("attention", "causal self-attention: one head, every head of a layer, or every layer",
                    cmd_attention, "a heatmap of --head, a grid of every head of --layer, or with --all-layers "
                    "layers x heads small multiples")  # fmt: skip
    attention.add_argument("--layer", type=int, help="the block (default 0)")
    attention.add_argument("--head", type=int, help="one head (default: every head of the layer)")
    attention.add_argument("--all-layers", action="store_true",
                           help="every layer and head: a summary per layer (not with --layer or --head)")  # fmt: skip
    attention.add_argument("--scores", action="store_true", help="also the scaled scores before softmax (masked)")
    _add_dtype(attention)

    hidden = add("hidden", "hidden-state norms by layer (0 = embeddings ... last = after ln_f)", cmd_hidden,
                 "the norms by layer")  # fmt: skip
    hidden.add_argument("--layers", type=int, nargs="+", help="hidden states to show (default: all)")
    hidden.add_argument("--last-token-only", action="store_true", help="only the last position")
    _add_dtype(hidden)

    next_token = add("next", "the LM head: most likely next tokens, temperature, top-k/top-p, draws", cmd_next,
                     "the candidates' probabilities as bars")  # fmt: skip
    _add_sampling(next_token, candidates=10)

    trace = add("trace", "the dataflow of one forward pass, stage by stage", cmd_trace, None)
    _add_sampling(trace, candidates=5)


def _add_dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=[d.value for d in TensorDtype], default="float32",
                   help="how tensors travel (float16/bfloat16 halve the bytes; default float32)")  # fmt: skip


def _add_sampling(p: argparse.ArgumentParser, candidates: int) -> None:
    p.add_argument("--candidates", type=int, default=candidates, help=f"candidates to list (default {candidates})")
    p.add_argument("--temperature", type=float, help="softmax temperature (default 1; 0 = greedy)")
    p.add_argument("--top-k", type=int, help="keep the k most likely tokens before sampling (default off)")
    p.add_argument("--top-p", type=float, help="nucleus filter (default off)")
    p.add_argument("--seed", type=int, help="seed of the draws (server picks one if unset)")
    p.add_argument("--num-samples", type=int, help="draws from the filtered distribution (default 1)")
