"""PNG plots of introspection results: attention, similarity, embedding PCA, norms, top-k, and
the steps of a generation trace.

Each function takes numpy arrays and labels and writes one PNG with matplotlib's Agg canvas
(no pyplot, no global backend change). matplotlib is the optional ``plot`` extra, imported only
inside the functions; this module needs neither torch nor the service.
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

PathLike = str | os.PathLike[str]
FloatArray = npt.NDArray[np.float64]

MAX_TICK_LABELS = 48  # more tokens than this and the axes show positions instead
MAX_LEGEND_TOKENS = 12  # more than this and norms are summarised (mean, range, last token)


def token_label(text: str) -> str:
    """A token's text made visible on an axis: spaces as ␣, newlines as ↵, tabs as →."""
    return text.replace(" ", "␣").replace("\n", "↵").replace("\r", "\\r").replace("\t", "→") or "∅"


def attention_heatmap(
    weights: npt.ArrayLike, tokens: Sequence[str], path: PathLike, *, title: str | None = None
) -> Path:
    """One head's attention, [seq, seq]: row = query token, column = key token."""
    matrix = _matrix(weights, "weights")
    fig = _figure(*_square_size(matrix.shape[0]))
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=1.0)
    _token_ticks(ax, tokens, matrix.shape[0])
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(_text(title or "attention"))
    fig.colorbar(image, ax=ax, shrink=0.8)
    return _save(fig, path)


def attention_grid(
    weights: npt.ArrayLike,
    tokens: Sequence[str],
    path: PathLike,
    *,
    heads: Sequence[int] | None = None,
    title: str | None = None,
) -> Path:
    """Every head of one layer side by side: ``weights`` is [heads, seq, seq]."""
    stack = np.asarray(weights, dtype=np.float64)
    if stack.ndim != 3 or stack.shape[1] != stack.shape[2]:
        raise ValueError(f"weights must be [heads, seq, seq], got shape {stack.shape}")
    num_heads, seq = stack.shape[0], stack.shape[1]
    head_names = list(heads) if heads is not None else list(range(num_heads))
    if len(head_names) != num_heads:
        raise ValueError(f"{len(head_names)} head labels for {num_heads} heads")
    ncols = math.ceil(math.sqrt(num_heads))
    nrows = math.ceil(num_heads / ncols)
    fig = _figure(2.6 * ncols + 1, 2.6 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    image = None
    for i, ax in enumerate(axes.flat):
        if i >= num_heads:
            ax.set_axis_off()
            continue
        image = ax.imshow(stack[i], cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"head {head_names[i]}", fontsize=9)
        if seq <= 16:
            _token_ticks(ax, tokens, seq, fontsize=6)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6)
    fig.suptitle(_text(title or "attention by head"))
    return _save(fig, path)


def similarity_matrix(
    similarity: npt.ArrayLike, tokens: Sequence[str], path: PathLike, *, title: str | None = None
) -> Path:
    """A [seq, seq] cosine-similarity matrix, annotated with its values when small."""
    matrix = _matrix(similarity, "similarity")
    seq = matrix.shape[0]
    fig = _figure(*_square_size(seq))
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-1.0, vmax=1.0)
    _token_ticks(ax, tokens, seq)
    if seq <= 12:
        for (row, col), value in np.ndenumerate(matrix):
            color = "white" if abs(value) > 0.6 else "black"
            ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=7, color=color)
    ax.set_title(_text(title or "cosine similarity"))
    fig.colorbar(image, ax=ax, shrink=0.8)
    return _save(fig, path)


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
    points, explained = pca_2d(vectors)
    if len(tokens) != points.shape[0]:
        raise ValueError(f"{len(tokens)} labels for {points.shape[0]} vectors")
    fig = _figure(6.5, 5.5)
    ax = fig.add_subplot()
    ax.scatter(points[:, 0], points[:, 1], c=np.arange(len(points)), cmap="viridis", s=30)
    for (x, y), label in zip(points, tokens, strict=True):
        ax.annotate(_text(label), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(f"PC 1 ({explained[0]:.0%} of variance)")
    ax.set_ylabel(f"PC 2 ({explained[1]:.0%} of variance)")
    ax.set_title(_text(title or "embeddings, first two principal components"))
    ax.grid(alpha=0.3)
    return _save(fig, path)


def hidden_state_norms(
    norms: npt.ArrayLike,
    path: PathLike,
    *,
    layers: Sequence[int] | None = None,
    tokens: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """L2 norms of hidden states by layer: ``norms`` is [layers, positions]. One line per token
    when there are few, else the mean, the min-max range and the last token."""
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
    fig = _figure(7.0, 4.5)
    ax = fig.add_subplot()
    if num_positions <= MAX_LEGEND_TOKENS:
        for position in range(num_positions):
            ax.plot(x, values[:, position], marker="o", markersize=3, label=_text(labels[position]))
    else:
        ax.fill_between(x, values.min(axis=1), values.max(axis=1), alpha=0.2, label="min-max over tokens")
        ax.plot(x, values.mean(axis=1), marker="o", markersize=3, label="mean over tokens")
        ax.plot(x, values[:, -1], marker="o", markersize=3, label=f"last token ({_text(labels[-1])})")
    ax.set_xticks(x)
    ax.set_xlabel("hidden state (0 = embeddings, last = after the final LayerNorm)")
    ax.set_ylabel("L2 norm")
    ax.set_title(_text(title or "hidden-state norms by layer"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def top_k_bar(
    labels: Sequence[str],
    probabilities: npt.ArrayLike,
    path: PathLike,
    *,
    sampled_probabilities: npt.ArrayLike | None = None,
    title: str | None = None,
) -> Path:
    """Next-token candidates as horizontal bars, most probable on top; with
    ``sampled_probabilities``, the distribution after temperature and filtering beside it."""
    raw = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    if len(labels) != raw.shape[0]:
        raise ValueError(f"{len(labels)} labels for {raw.shape[0]} probabilities")
    sampled = None if sampled_probabilities is None else np.asarray(sampled_probabilities, dtype=np.float64)
    if sampled is not None and sampled.shape != raw.shape:
        raise ValueError(f"sampled_probabilities has shape {sampled.shape}, probabilities {raw.shape}")
    fig = _figure(7.0, 1.5 + 0.35 * len(labels))
    ax = fig.add_subplot()
    rows = np.arange(len(labels))
    height = 0.4 if sampled is not None else 0.8
    ax.barh(rows - (height / 2 if sampled is not None else 0), raw, height=height, label="probability")
    if sampled is not None:
        ax.barh(rows + height / 2, sampled, height=height, label="after temperature and filters")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_yticks(rows, [_text(label) for label in labels])
    ax.invert_yaxis()
    ax.set_xlabel("probability")
    ax.set_title(_text(title or "next-token candidates"))
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


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
    ax.set_title("\n".join(textwrap.wrap(_text(title or "generation, step by step"), 80)), fontsize=10)
    fig.colorbar(image, ax=ax, shrink=0.8, label="final probability")
    return fig


# -- helpers --------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
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
    side = min(4.0 + 0.18 * seq, 14.0)
    return side + 1.2, side


def _token_ticks(ax: Axes, tokens: Sequence[str], seq: int, fontsize: float = 8) -> None:
    if len(tokens) != seq:
        raise ValueError(f"{len(tokens)} token labels for a {seq}x{seq} matrix")
    if seq > MAX_TICK_LABELS:
        return  # positions only: labels this dense cannot be read
    labels = [_text(t) for t in tokens]
    ax.set_xticks(range(seq), labels, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(seq), labels, fontsize=fontsize)


def _text(text: str) -> str:
    """Plain text for matplotlib: no mathtext ($), no control characters."""
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text).replace("$", r"\$")
