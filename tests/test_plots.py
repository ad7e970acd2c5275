"""The client's plots: each function writes a PNG that matplotlib can read back."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from gpt2_client import plots

pytest.importorskip("matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TOKENS = ["bank", " is", " near", " the", " river", " bank", "\n", "$x$", "🤗"]


def causal_weights(num_heads: int, seq: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    scores = np.where(np.tril(np.ones((seq, seq), dtype=bool)), rng.normal(size=(num_heads, seq, seq)), -np.inf)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return weights / weights.sum(axis=-1, keepdims=True)


def assert_png(path: Path) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


PLOTS: dict[str, Callable[[Path], Path]] = {
    "attention_heatmap": lambda p: plots.attention_heatmap(causal_weights(1, 9)[0], TOKENS, p, title="layer 0 head 1"),
    "attention_grid": lambda p: plots.attention_grid(causal_weights(4, 9), TOKENS, p, title="layer 3"),
    "attention_grid_long": lambda p: plots.attention_grid(causal_weights(3, 60), [f"t{i}" for i in range(60)], p),
    "similarity_matrix": lambda p: plots.similarity_matrix(
        np.corrcoef(np.random.default_rng(1).normal(size=(9, 16))), TOKENS, p
    ),
    "embedding_pca": lambda p: plots.embedding_pca(np.random.default_rng(2).normal(size=(9, 64)), TOKENS, p),
    "hidden_state_norms": lambda p: plots.hidden_state_norms(
        np.abs(np.random.default_rng(3).normal(size=(13, 9))) * 10, p, tokens=TOKENS
    ),
    "hidden_state_norms_many_tokens": lambda p: plots.hidden_state_norms(
        np.random.default_rng(4).random((13, 64)), p, layers=list(range(13))
    ),
    "top_k_bar": lambda p: plots.top_k_bar(TOKENS[:5], [0.4, 0.2, 0.1, 0.05, 0.01], p),
    "top_k_bar_sampled": lambda p: plots.top_k_bar(
        TOKENS[:5], [0.4, 0.2, 0.1, 0.05, 0.01], p, sampled_probabilities=[0.6, 0.3, 0.1, 0, 0]
    ),
}


@pytest.mark.parametrize("name", PLOTS)
def test_plot_writes_a_png_matplotlib_reads_back(tmp_path: Path, name: str) -> None:
    path = PLOTS[name](tmp_path / f"{name}.png")
    assert path == tmp_path / f"{name}.png"
    assert_png(path)


def test_pca_2d_finds_the_direction_of_largest_variance() -> None:
    rng = np.random.default_rng(5)
    along = rng.normal(size=(50, 1)) * 10
    vectors = along @ np.array([[1.0, 2.0, 2.0]]) / 3 + rng.normal(size=(50, 3)) * 0.01
    points, explained = plots.pca_2d(vectors)
    assert points.shape == (50, 2)
    assert explained[0] > 0.99 and explained.sum() <= 1 + 1e-9
    correlation = np.corrcoef(points[:, 0], along[:, 0])[0, 1]
    assert abs(correlation) > 0.999


def test_pca_2d_of_a_single_vector_is_the_origin() -> None:
    points, explained = plots.pca_2d(np.ones((1, 8)))
    assert points.tolist() == [[0.0, 0.0]] and explained.tolist() == [0.0, 0.0]


def test_mismatched_labels_are_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="token labels"):
        plots.attention_heatmap(causal_weights(1, 4)[0], ["a", "b"], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"\[heads, seq, seq\]"):
        plots.attention_grid(np.zeros((4, 4)), ["a"] * 4, tmp_path / "x.png")


def test_token_label_makes_whitespace_visible() -> None:
    assert plots.token_label(" bank\n") == "␣bank↵"
    assert plots.token_label("") == "∅"


def test_plots_import_neither_torch_nor_the_service() -> None:
    code = (
        "import sys, gpt2_client.plots;"
        "bad = [m for m in ('torch', 'gpt2_service', 'matplotlib') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
