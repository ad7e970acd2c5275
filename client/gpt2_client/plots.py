"""PNG plots of introspection results: attention, similarity, embedding PCA, norms, top-k, and
the steps of a generation trace.

Each ``name_figure`` function takes numpy arrays and labels and returns an unsaved matplotlib
Figure on the Agg canvas (no pyplot, no global backend change); ``name`` writes it as one PNG.
matplotlib is the optional ``plot`` extra, imported only inside the functions; this module needs
neither torch nor the service.
"""

from __future__ import annotations

import math
import os
import textwrap
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.image import AxesImage

PathLike = str | os.PathLike[str]
FloatArray = npt.NDArray[np.float64]

MAX_TOKEN_LABELS = 64  # up to this many tokens every one is labelled; past it every n-th, with its position
MIN_TICK_FONT = 4.5  # points; token labels that would be smaller are thinned instead
MAX_TICK_FONT = 8.0
TICK_LINE = 1.3  # a label needs its font size times this along the axis
MAX_LABEL_CHARS = 16  # longer token labels are cut, with "…"
MAX_LEGEND_TOKENS = 12  # more than this and norms are summarised (mean, range, last token)
MASK_COLOUR = "#e4e4e4"  # masked attention cells (a key after the query): not the colormap's 0
MASK_HATCH_COLOUR = "#a8a8a8"
MASK_LABEL = "masked (future token): no weight, by the causal mask"


def token_label(text: str) -> str:
    """A token's text made visible on an axis: spaces as ␣, newlines as ↵, tabs as →."""
    return text.replace(" ", "␣").replace("\n", "↵").replace("\r", "\\r").replace("\t", "→") or "∅"


def final_layer_norm_note(d_model: int | None = None) -> str:
    """Why the last hidden state's norm jumps (or drops): it is set by ln_f, not by the blocks."""
    size = f"√{d_model} = {math.sqrt(d_model):.1f}" if d_model else "√d_model, 27.7 for gpt2's 768"
    return (
        "The last state is after the final LayerNorm (ln_f): it rescales every vector to zero mean and unit "
        "variance, then applies its gain and bias, so its norm is set by ln_f's weights "
        f"({size} with gain 1 and bias 0, as in untrained weights), not by the growth of the residual "
        "stream before it."
    )


# -- attention ------------------------------------------------------------------------------------


def attention_heatmap(
    weights: npt.ArrayLike, tokens: Sequence[str], path: PathLike, *, title: str | None = None
) -> Path:
    """One head's attention, [seq, seq]: row = query token, column = key token."""
    return _save(attention_heatmap_figure(weights, tokens, title=title), path)


def attention_heatmap_figure(weights: npt.ArrayLike, tokens: Sequence[str], *, title: str | None = None) -> Figure:
    """``attention_heatmap``'s figure, unsaved: the cells after the query (the strict upper
    triangle) are drawn hatched grey as masked, not as the colormap's 0."""
    matrix = _matrix(weights, "weights")
    seq = matrix.shape[0]
    width, height = _square_size(seq)
    fig = _figure(width, height)
    ax = fig.add_subplot()
    image = _attention_image(ax, matrix)
    _token_ticks(ax, tokens, seq, inches=height - 2.0)
    ax.set_xlabel("key (the token attended to)")
    ax.set_ylabel("query (the token attending)")
    ax.set_title(_wrap(title or "attention", 70))
    fig.colorbar(image, ax=ax, shrink=0.8, label="attention weight")
    _mask_legend(fig)
    return fig


def attention_grid(
    weights: npt.ArrayLike,
    tokens: Sequence[str],
    path: PathLike,
    *,
    heads: Sequence[int] | None = None,
    title: str | None = None,
) -> Path:
    """Every head of one layer side by side: ``weights`` is [heads, seq, seq]."""
    return _save(attention_grid_figure(weights, tokens, heads=heads, title=title), path)


def attention_grid_figure(
    weights: npt.ArrayLike, tokens: Sequence[str], *, heads: Sequence[int] | None = None, title: str | None = None
) -> Figure:
    """``attention_grid``'s figure, unsaved: masked cells hatched grey; token labels on the outer
    panels only (keys under the bottom row, queries left of the first column)."""
    stack = np.asarray(weights, dtype=np.float64)
    if stack.ndim != 3 or stack.shape[1] != stack.shape[2]:
        raise ValueError(f"weights must be [heads, seq, seq], got shape {stack.shape}")
    num_heads, seq = stack.shape[0], stack.shape[1]
    head_names = list(heads) if heads is not None else list(range(num_heads))
    if len(head_names) != num_heads:
        raise ValueError(f"{len(head_names)} head labels for {num_heads} heads")
    if len(tokens) != seq:
        raise ValueError(f"{len(tokens)} token labels for a {seq}x{seq} matrix")
    ncols = math.ceil(math.sqrt(num_heads))
    nrows = math.ceil(num_heads / ncols)
    side = min(max(2.6, 0.9 + 0.06 * seq), 4.4)  # panels grow with the tokens, to keep their labels
    labels = max((len(_short(t)) for t in tokens), default=1) * 0.06 + 0.3  # inches a rotated label takes
    fig = _figure(side * ncols + labels + 1.2, side * nrows + labels + 1.2, spacing=0.03)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    image = None
    for i, ax in enumerate(axes.flat):
        if i >= num_heads:
            ax.set_axis_off()
            continue
        image = _attention_image(ax, stack[i])
        ax.set_title(f"head {head_names[i]}", fontsize=9)
        bottom = i + ncols >= num_heads  # no panel under it
        left = i % ncols == 0
        _token_ticks(ax, tokens, seq, inches=side * 0.85, x=bottom, y=left)
        if bottom:
            ax.set_xlabel("key", fontsize=8)
        if left:
            ax.set_ylabel("query", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
    fig.suptitle(_wrap(title or "attention by head", 110))
    _mask_legend(fig)
    return fig


def attention_overview(
    weights: npt.ArrayLike,
    tokens: Sequence[str],
    path: PathLike,
    *,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    title: str | None = None,
) -> Path:
    """Every layer and head as small multiples: ``weights`` is [layers, heads, seq, seq]; a row
    per layer, a column per head."""
    return _save(attention_overview_figure(weights, tokens, layers=layers, heads=heads, title=title), path)


def attention_overview_figure(
    weights: npt.ArrayLike,
    tokens: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    title: str | None = None,
) -> Figure:
    """``attention_overview``'s figure, unsaved: panels without token labels (too small for
    them), the tokens listed in a caption under the panels, masked cells grey."""
    stack = np.asarray(weights, dtype=np.float64)
    if stack.ndim != 4 or stack.shape[2] != stack.shape[3]:
        raise ValueError(f"weights must be [layers, heads, seq, seq], got shape {stack.shape}")
    num_layers, num_heads, seq = stack.shape[0], stack.shape[1], stack.shape[2]
    layer_names = list(layers) if layers is not None else list(range(num_layers))
    head_names = list(heads) if heads is not None else list(range(num_heads))
    if len(layer_names) != num_layers or len(head_names) != num_heads:
        raise ValueError(f"{len(layer_names)} layer and {len(head_names)} head labels for weights of shape "
                         f"{stack.shape}")  # fmt: skip
    if len(tokens) != seq:
        raise ValueError(f"{len(tokens)} token labels for {seq}x{seq} matrices")
    side = min(1.1, 24.0 / num_heads, 36.0 / num_layers)
    fig = _figure(side * num_heads + 2.0, side * num_layers + 2.2, spacing=0.02)
    axes = fig.subplots(num_layers, num_heads, squeeze=False)
    image = None
    for (row, col), ax in np.ndenumerate(axes):
        image = _attention_image(ax, stack[row, col], hatch=False)
        ax.set_xticks([])
        ax.set_yticks([])
        if col == 0:
            ax.set_ylabel(f"layer {layer_names[row]}", fontsize=8)
        if row == 0:
            ax.set_title(f"head {head_names[col]}", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.4, label="attention weight")
    fig.suptitle(_wrap(title or "attention, every layer and head", 110))
    listed = " ".join(f"{i}:{_short(t)}" for i, t in enumerate(tokens))
    caption = f"Each panel: row = query, column = key ({seq} tokens); grey: masked (future token). Tokens: {listed}"
    fig.supxlabel(_wrap(caption, int(side * num_heads * 15)), fontsize=8, ha="left", x=0.02)
    return fig


def _attention_image(ax: Axes, matrix: FloatArray, hatch: bool = True) -> AxesImage:
    """A [seq, seq] attention matrix with its strict upper triangle masked: grey (the colormap's
    'bad' colour) and, with ``hatch``, one hatched staircase patch over it."""
    from matplotlib import colormaps
    from matplotlib.patches import Polygon

    seq = matrix.shape[0]
    masked = np.ma.masked_array(matrix, mask=np.triu(np.ones((seq, seq), dtype=bool), k=1))
    cmap = colormaps["viridis"].with_extremes(bad=MASK_COLOUR)
    image = ax.imshow(masked, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    if hatch and seq > 1:
        corners = [(0.5, -0.5)]
        for row in range(seq - 1):
            corners += [(row + 0.5, row + 0.5), (row + 1.5, row + 0.5)]
        corners.append((seq - 0.5, -0.5))
        ax.add_patch(Polygon(corners, closed=True, facecolor=MASK_COLOUR, edgecolor=MASK_HATCH_COLOUR, hatch="//",
                             linewidth=0, label=MASK_LABEL))  # fmt: skip
    return image


def _mask_legend(fig: Figure) -> None:
    from matplotlib.patches import Patch

    key = Patch(facecolor=MASK_COLOUR, edgecolor=MASK_HATCH_COLOUR, hatch="//", label=MASK_LABEL)
    fig.legend(handles=[key], loc="outside lower center", fontsize=8, frameon=False)


# -- embeddings and hidden states -----------------------------------------------------------------


def similarity_matrix(
    similarity: npt.ArrayLike, tokens: Sequence[str], path: PathLike, *, title: str | None = None
) -> Path:
    """A [seq, seq] cosine-similarity matrix, annotated with its values when small."""
    return _save(similarity_matrix_figure(similarity, tokens, title=title), path)


def similarity_matrix_figure(similarity: npt.ArrayLike, tokens: Sequence[str], *, title: str | None = None) -> Figure:
    """``similarity_matrix``'s figure, unsaved."""
    matrix = _matrix(similarity, "similarity")
    seq = matrix.shape[0]
    width, height = _square_size(seq)
    fig = _figure(width, height)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-1.0, vmax=1.0)
    _token_ticks(ax, tokens, seq, inches=height - 2.0)
    if seq <= 12:
        for (row, col), value in np.ndenumerate(matrix):
            color = "white" if abs(value) > 0.6 else "black"
            ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=7, color=color)
    ax.set_title(_wrap(title or "cosine similarity", 70))
    fig.colorbar(image, ax=ax, shrink=0.8)
    return fig


def pca_2d(vectors: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    """The rows of ``vectors`` [n, d] projected on their first two principal components (SVD of
    the centred data), and the fraction of variance each component explains. Pure numpy."""
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"vectors must be [n, d], got shape {x.shape}")
    centred = x - x.mean(axis=0, keepdims=True)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    components = min(2, vt.shape[0])
    projected = np.zeros((x.shape[0], 2))
    projected[:, :components] = centred @ vt[:components].T
    variance = singular**2
    explained = np.zeros(2)
    total = variance.sum()
    if total > 0:
        explained[:components] = variance[:components] / total
    return projected, explained


def embedding_pca(vectors: npt.ArrayLike, tokens: Sequence[str], path: PathLike, *, title: str | None = None) -> Path:
    """A 2-D PCA scatter of token vectors [n, d], each point labelled with its token."""
    return _save(embedding_pca_figure(vectors, tokens, title=title), path)


def embedding_pca_figure(vectors: npt.ArrayLike, tokens: Sequence[str], *, title: str | None = None) -> Figure:
    """``embedding_pca``'s figure, unsaved."""
    points, explained = pca_2d(vectors)
    if len(tokens) != points.shape[0]:
        raise ValueError(f"{len(tokens)} labels for {points.shape[0]} vectors")
    fig = _figure(6.5, 5.5)
    ax = fig.add_subplot()
    ax.scatter(points[:, 0], points[:, 1], c=np.arange(len(points)), cmap="viridis", s=30)
    for (x, y), label in zip(points, tokens, strict=True):
        ax.annotate(_text(label), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.margins(x=0.15, y=0.08)  # room for the labels right of the outermost points
    ax.set_xlabel(f"PC 1 ({explained[0]:.0%} of variance)")
    ax.set_ylabel(f"PC 2 ({explained[1]:.0%} of variance)")
    ax.set_title(_wrap(title or "embeddings, first two principal components", 70))
    ax.grid(alpha=0.3)
    return fig


def hidden_state_norms(
    norms: npt.ArrayLike,
    path: PathLike,
    *,
    layers: Sequence[int] | None = None,
    tokens: Sequence[str] | None = None,
    title: str | None = None,
    final_layer_norm: bool = True,
    d_model: int | None = None,
) -> Path:
    """L2 norms of hidden states by layer: ``norms`` is [layers, positions]. One line per token
    when there are few, else the mean, the min-max range and the last token."""
    return _save(hidden_state_norms_figure(norms, layers=layers, tokens=tokens, title=title,
                                           final_layer_norm=final_layer_norm, d_model=d_model), path)  # fmt: skip


def hidden_state_norms_figure(
    norms: npt.ArrayLike,
    *,
    layers: Sequence[int] | None = None,
    tokens: Sequence[str] | None = None,
    title: str | None = None,
    final_layer_norm: bool = True,
    d_model: int | None = None,
) -> Figure:
    """``hidden_state_norms``'s figure, unsaved; with ``final_layer_norm`` (the last state is
    after ln_f), a caption under it says why that point jumps (``final_layer_norm_note``)."""
    values = np.asarray(norms, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2:
        raise ValueError(f"norms must be [layers, positions], got shape {values.shape}")
    num_layers, num_positions = values.shape
    x = list(layers) if layers is not None else list(range(num_layers))
    labels = list(tokens) if tokens is not None else [str(i) for i in range(num_positions)]
    if len(x) != num_layers or len(labels) != num_positions:
        raise ValueError(f"{len(x)} layer and {len(labels)} token labels for norms of shape {values.shape}")
    fig = _figure(7.5, 5.2 if final_layer_norm else 4.5)
    ax = fig.add_subplot()
    if num_positions <= MAX_LEGEND_TOKENS:
        for position in range(num_positions):
            ax.plot(x, values[:, position], marker="o", markersize=3, label=_text(labels[position]))
    else:
        ax.fill_between(x, values.min(axis=1), values.max(axis=1), alpha=0.2, label="min-max over tokens")
        ax.plot(x, values.mean(axis=1), marker="o", markersize=3, label="mean over tokens")
        ax.plot(x, values[:, -1], marker="o", markersize=3, label=f"last token ({_text(labels[-1])})")
    ax.set_xticks(x)
    ax.set_xlabel("hidden state (0 = embeddings, i = after block i-1" + (", last = after ln_f)" if final_layer_norm
                                                                           else ")"))  # fmt: skip
    ax.set_ylabel("L2 norm")
    ax.set_title(_wrap(title or "hidden-state norms by layer", 80))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    if final_layer_norm:
        fig.supxlabel(_wrap(final_layer_norm_note(d_model), 120), fontsize=8, ha="left", x=0.02, color="0.25")
    return fig


# -- the next token -------------------------------------------------------------------------------


def top_k_bar(
    labels: Sequence[str],
    probabilities: npt.ArrayLike,
    path: PathLike,
    *,
    sampled_probabilities: npt.ArrayLike | None = None,
    title: str | None = None,
    vocab_size: int | None = None,
) -> Path:
    """Next-token candidates as horizontal bars, most probable on top: the raw probability on a
    log scale (with ``vocab_size``, a dotted line at the uniform 1/vocab_size); with
    ``sampled_probabilities``, the distribution after temperature and filtering in a second panel
    (linear, 0 to 1) sharing the token labels."""
    return _save(top_k_bar_figure(labels, probabilities, sampled_probabilities=sampled_probabilities, title=title,
                                  vocab_size=vocab_size), path)  # fmt: skip


def top_k_bar_figure(
    labels: Sequence[str],
    probabilities: npt.ArrayLike,
    *,
    sampled_probabilities: npt.ArrayLike | None = None,
    title: str | None = None,
    vocab_size: int | None = None,
) -> Figure:
    """``top_k_bar``'s figure, unsaved: each bar labelled with its value, and the candidates a
    filter removed marked "filtered out" in the second panel."""
    raw = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    if len(labels) != raw.shape[0]:
        raise ValueError(f"{len(labels)} labels for {raw.shape[0]} probabilities")
    sampled = None if sampled_probabilities is None else np.asarray(sampled_probabilities, dtype=np.float64)
    if sampled is not None and sampled.shape != raw.shape:
        raise ValueError(f"sampled_probabilities has shape {sampled.shape}, probabilities {raw.shape}")
    fig = _figure(11.0 if sampled is not None else 7.0, 1.9 + 0.32 * len(labels))
    axes = fig.subplots(1, 2 if sampled is not None else 1, sharey=True, squeeze=False)[0]
    rows = np.arange(len(labels))
    ax = axes[0]
    uniform = 1.0 / vocab_size if vocab_size else None
    positive = [*raw[raw > 0], *([uniform] if uniform else [])]
    low = 10.0 ** (math.floor(math.log10(min(positive))) - 1) if positive else 1e-6
    ax.set_xscale("log")
    ax.barh(rows, np.maximum(raw, low) - low, left=low, height=0.7, color="tab:blue")
    for row, value in enumerate(raw):
        _bar_value(ax, row, value, log=True)
    ax.set_xlim(low, 1.0)
    xlabel = "probability (log scale)"
    if uniform:
        ax.axvline(uniform, color="0.3", linestyle=":", linewidth=1.2)
        xlabel = f"probability (log scale; dotted: uniform, 1/{vocab_size:,} = {uniform:.2e})"
    ax.set_xlabel(xlabel)
    ax.set_title("softmax of the raw logits", fontsize=10)
    ax.set_yticks(rows, [_short(label) for label in labels])
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    if sampled is not None:
        ax = axes[1]
        ax.barh(rows, sampled, height=0.7, color="tab:orange")
        for row, value in enumerate(sampled):
            if value > 0:
                _bar_value(ax, row, value, log=False)
            else:
                ax.text(0.01, row, "× filtered out", va="center", fontsize=7, color="0.45", style="italic")
        ax.set_xlim(0.0, 1.0)
        ax.set_xlabel("probability (linear)")
        ax.set_title("after temperature and filters (what is sampled)", fontsize=10)
        ax.tick_params(axis="y", left=False)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(_wrap(title or "next-token candidates", 110 if sampled is not None else 70), fontsize=11)
    return fig


def _bar_value(ax: Axes, row: int, value: float, log: bool) -> None:
    """The bar's value as text: inside a long bar, after the end of a short one."""
    text = f"{value:.2e}" if 0 < value < 1e-3 else f"{value:.3f}"
    inside = value > (0.2 if log else 0.8)
    x = value / 1.1 if log and inside else value - 0.01 if inside else value * 1.15 if log else value + 0.01
    ax.text(x, row, text, va="center", ha="right" if inside else "left", fontsize=7,
            color="white" if inside else "black")  # fmt: skip


# -- generation -----------------------------------------------------------------------------------


def generation_steps(
    probabilities: npt.ArrayLike,
    labels: Sequence[Sequence[str]],
    chosen: Sequence[int | None],
    path: PathLike,
    *,
    step_labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """A generation trace as a heatmap: one row per step, one column per candidate rank (most
    probable first), colour = the candidate's final probability (after temperature and the
    filters), each cell labelled with its token; ``chosen[i]`` is the column of step i's token
    (outlined), None when it was not among the candidates."""
    return _save(generation_steps_figure(probabilities, labels, chosen, step_labels=step_labels, title=title), path)


def generation_steps_figure(
    probabilities: npt.ArrayLike,
    labels: Sequence[Sequence[str]],
    chosen: Sequence[int | None],
    *,
    step_labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Figure:
    """``generation_steps``'s figure, unsaved."""
    from matplotlib.patches import Rectangle

    values = np.asarray(probabilities, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"probabilities must be [steps, candidates], got shape {values.shape}")
    num_steps, num_candidates = values.shape
    if len(labels) != num_steps or any(len(row) != num_candidates for row in labels) or len(chosen) != num_steps:
        raise ValueError(f"labels and chosen must match probabilities of shape {values.shape}")
    rows = list(step_labels) if step_labels is not None else [f"step {i}" for i in range(num_steps)]
    fig = _figure(min(max(8.0, 2.5 + 0.9 * num_candidates), 24.0), min(1.8 + 0.45 * num_steps, 30.0))
    ax = fig.add_subplot()
    top = float(values.max()) if values.size and values.max() > 0 else 1.0
    image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=top, aspect="auto")
    for (row, col), value in np.ndenumerate(values):
        color = "black" if value > 0.6 * top else "white"
        ax.text(col, row, _text(labels[row][col]), ha="center", va="center", fontsize=7, color=color)
    for row, col in enumerate(chosen):
        if col is not None:
            ax.add_patch(Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_xticks(range(num_candidates), [str(r) for r in range(1, num_candidates + 1)], fontsize=8)
    ax.set_yticks(range(num_steps), [_text(r) for r in rows], fontsize=8)
    ax.set_xlabel("candidate rank in the raw distribution (red outline: the token chosen)")
    ax.set_title(_wrap(title or "generation, step by step", 80), fontsize=10)
    fig.colorbar(image, ax=ax, shrink=0.8, label="final probability")
    return fig


# -- helpers --------------------------------------------------------------------------------------


def _figure(width: float, height: float, spacing: float | None = None) -> Figure:
    """A figure on the Agg canvas with constrained layout; ``spacing``: the space between panels,
    as a fraction of the figure (tighter than the default for small multiples)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.layout_engine import ConstrainedLayoutEngine

    layout = ConstrainedLayoutEngine() if spacing is None else ConstrainedLayoutEngine(
        w_pad=0.02, h_pad=0.02, wspace=spacing, hspace=spacing)  # fmt: skip
    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: PathLike) -> Path:
    out = Path(path)
    with warnings.catch_warnings():
        # Tokens may hold characters the default font lacks (emoji, CJK); they draw as boxes.
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from", category=UserWarning)
        fig.savefig(out, format="png", dpi=120)
    return out


def _matrix(values: npt.ArrayLike, name: str) -> FloatArray:
    matrix = np.asarray(values, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"{name} must be a square [seq, seq] matrix, got shape {matrix.shape}")
    return matrix


def _square_size(seq: int) -> tuple[float, float]:
    side = min(4.5 + 0.16 * seq, 14.0)
    return side + 1.4, side + 0.6


def _token_ticks(ax: Axes, tokens: Sequence[str], seq: int, *, inches: float, x: bool = True, y: bool = True) -> None:
    """Token labels along ``inches`` of axis: every token up to MAX_TOKEN_LABELS, the font shrunk
    to fit (rotated on x); past that, or where even MIN_TICK_FONT would overlap, every n-th token
    with its position ("12:␣cat"). An axis not asked for gets no ticks."""
    if len(tokens) != seq:
        raise ValueError(f"{len(tokens)} token labels for a {seq}x{seq} matrix")
    spacing = max(inches, 0.5) * 72 / seq  # points per token along the axis
    step = max(1, math.ceil(seq / MAX_TOKEN_LABELS), math.ceil(MIN_TICK_FONT * TICK_LINE / spacing))
    fontsize = min(MAX_TICK_FONT, spacing * step / TICK_LINE)
    where = list(range(0, seq, step))
    labels = [_short(tokens[i]) if step == 1 else f"{i}:{_short(tokens[i])}" for i in where]
    if x:
        ax.set_xticks(where, labels, rotation=90, fontsize=fontsize)
    else:
        ax.set_xticks([])
    if y:
        ax.set_yticks(where, labels, fontsize=fontsize)
    else:
        ax.set_yticks([])


def _short(text: str) -> str:
    text = _text(text)
    return text if len(text) <= MAX_LABEL_CHARS else text[: MAX_LABEL_CHARS - 1] + "…"


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.wrap(_text(text), width)) or _text(text)


def _text(text: str) -> str:
    """Plain text for matplotlib: no mathtext ($), no control characters."""
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text).replace("$", r"\$")
