"""The client's plots: each function writes a PNG that matplotlib can read back, and its figure
says what a learner needs (the settings in the title, token labels, masked cells drawn as masked,
a caption where a number needs one). Figures are checked by their artists, not their pixels."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    "attention_overview": lambda p: plots.attention_overview(
        np.stack([causal_weights(4, 9), causal_weights(4, 9)]), TOKENS, p, layers=[0, 5], title="every layer"
    ),
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
        TOKENS[:5], [0.4, 0.2, 0.1, 0.05, 0.01], p, sampled_probabilities=[0.6, 0.3, 0.1, 0, 0], vocab_size=50257
    ),
    "generation_steps": lambda p: plots.generation_steps(
        [[0.5, 0.3, 0.2], [0.6, 0.4, 0.0]], [["a", "b", "c"], ["d", "e", "f"]], [0, None], p
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


# -- what each figure says (its artists, not its pixels) ------------------------------------------

RANDOM = " — random weights"


def words(n: int) -> list[str]:
    """Token labels as the CLI passes them (whitespace already made visible)."""
    return [f"␣w{i}" for i in range(n)]


def titles(fig: Any) -> str:
    """Every title of a figure: the suptitle and each axes' title, one string."""
    parts = [fig._suptitle.get_text()] if fig._suptitle is not None else []
    return " | ".join([*parts, *(ax.get_title() for ax in fig.axes)])


def tick_texts(labels: Any) -> list[str]:
    return [label.get_text() for label in labels if label.get_text()]


def image_axes(fig: Any) -> list[Any]:
    return [ax for ax in fig.axes if ax.get_images()]


def hatched(ax: Any) -> list[Any]:
    return [patch for patch in ax.patches if patch.get_hatch()]


def assert_sane_size(fig: Any, max_inches: float = 40.0) -> None:
    width, height = fig.get_size_inches()
    assert 4 <= width <= max_inches and 3 <= height <= max_inches, (width, height)


def test_the_heatmap_title_carries_the_settings_and_random_weights() -> None:
    fig = plots.attention_heatmap_figure(causal_weights(1, 9)[0], TOKENS, title=f"layer 5 head 1, 9 tokens{RANDOM}")
    assert "layer 5 head 1, 9 tokens — random weights" in titles(fig)
    assert_sane_size(fig)


@pytest.mark.parametrize("seq", [20, 64])
def test_the_heatmap_labels_every_token_up_to_64(seq: int) -> None:
    fig = plots.attention_heatmap_figure(causal_weights(1, seq)[0], words(seq))
    (ax,) = image_axes(fig)
    expected = words(seq)
    assert tick_texts(ax.get_xticklabels()) == expected and tick_texts(ax.get_yticklabels()) == expected
    assert all(label.get_rotation() == 90 for label in ax.get_xticklabels())
    assert min(label.get_fontsize() for label in ax.get_xticklabels()) >= plots.MIN_TICK_FONT
    assert_sane_size(fig)


def test_past_64_tokens_every_nth_is_labelled_with_its_position() -> None:
    fig = plots.attention_heatmap_figure(causal_weights(1, 200)[0], words(200))
    (ax,) = image_axes(fig)
    labels = tick_texts(ax.get_xticklabels())
    positions = [int(label.split(":")[0]) for label in labels]
    step = positions[1]
    assert labels[0] == "0:␣w0" and len(labels) <= plots.MAX_TOKEN_LABELS and step >= 200 / plots.MAX_TOKEN_LABELS
    assert positions == list(range(0, 200, step)) and labels[1] == f"{step}:␣w{step}"


def test_masked_cells_are_a_masked_array_and_a_hatched_patch_not_zeros() -> None:
    seq = 9
    fig = plots.attention_heatmap_figure(causal_weights(1, seq)[0], TOKENS)
    (ax,) = image_axes(fig)
    data = ax.get_images()[0].get_array()
    np.testing.assert_array_equal(np.ma.getmaskarray(data), np.triu(np.ones((seq, seq), dtype=bool), k=1))
    bad = ax.get_images()[0].get_cmap().get_bad()
    assert tuple(bad[:3]) != tuple(ax.get_images()[0].get_cmap()(0.0)[:3])  # not the colour of a zero weight
    (patch,) = hatched(ax)
    assert patch.get_label() == plots.MASK_LABEL
    legend_texts = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert plots.MASK_LABEL in legend_texts


def test_the_grid_labels_its_outer_panels_at_20_tokens() -> None:
    fig = plots.attention_grid_figure(causal_weights(12, 20), words(20), title=f"attention by head, layer 5{RANDOM}")
    panels = image_axes(fig)
    assert len(panels) == 12 and "layer 5 — random weights" in titles(fig)
    expected = words(20)
    ncols = 4
    for i, ax in enumerate(panels):
        assert tick_texts(ax.get_yticklabels()) == (expected if i % ncols == 0 else [])
        assert tick_texts(ax.get_xticklabels()) == (expected if i >= 12 - ncols else [])
        assert len(hatched(ax)) == 1
    assert_sane_size(fig)


def test_the_grid_at_64_tokens_keeps_readable_labels() -> None:
    fig = plots.attention_grid_figure(causal_weights(12, 64), words(64))
    first = image_axes(fig)[0]
    labels = first.get_yticklabels()
    assert len(tick_texts(labels)) >= 16 and min(label.get_fontsize() for label in labels) >= plots.MIN_TICK_FONT
    assert_sane_size(fig)


def test_the_overview_is_layers_by_heads_small_multiples() -> None:
    weights = np.stack([causal_weights(12, 20)] * 3)
    fig = plots.attention_overview_figure(
        weights, words(20), layers=[0, 6, 11], title=f"every layer, 20 tokens{RANDOM}"
    )
    panels = image_axes(fig)
    assert len(panels) == 3 * 12
    assert [ax.get_ylabel() for ax in panels[::12]] == ["layer 0", "layer 6", "layer 11"]
    assert [ax.get_title() for ax in panels[:12]] == [f"head {h}" for h in range(12)]
    assert all(np.ma.getmaskarray(ax.get_images()[0].get_array())[0, 1] for ax in panels)
    assert "20 tokens — random weights" in titles(fig)
    assert any("masked" in t.get_text() for t in fig.texts)
    assert_sane_size(fig)


def test_the_overview_rejects_a_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"\[layers, heads, seq, seq\]"):
        plots.attention_overview_figure(causal_weights(2, 4), ["a"] * 4)


def test_the_next_token_chart_has_a_log_panel_and_a_filtered_panel() -> None:
    fig = plots.top_k_bar_figure(
        TOKENS[:4], [1.4e-4, 1.3e-4, 1.2e-4, 1.1e-4], sampled_probabilities=[0.5, 0.5, 0, 0],
        title=f"T=0.7, top-k 2, top-p off, seed 1{RANDOM}", vocab_size=50257,
    )  # fmt: skip
    raw, final = fig.axes
    assert raw.get_xscale() == "log" and final.get_xscale() == "linear"
    assert raw.get_xlim()[0] <= 1e-5 and raw.get_xlim()[1] == 1.0 and final.get_xlim() == (0.0, 1.0)
    assert not fig.legends and raw.get_legend() is None and final.get_legend() is None  # panel titles instead
    assert raw.get_title() and final.get_title()
    assert "T=0.7, top-k 2, top-p off, seed 1 — random weights" in titles(fig)
    assert [t.get_text() for t in final.texts].count("× filtered out") == 2
    assert "1.40e-04" in [t.get_text() for t in raw.texts]
    assert tick_texts(raw.get_yticklabels()) == TOKENS[:4]
    assert "1/50,257" in raw.get_xlabel()
    assert_sane_size(fig)


def test_the_next_token_chart_without_sampling_is_one_log_panel() -> None:
    fig = plots.top_k_bar_figure(TOKENS[:3], [0.5, 0.2, 0.1])
    (ax,) = fig.axes
    assert ax.get_xscale() == "log"


def test_hidden_state_norms_explain_the_final_layer_norm_in_a_caption() -> None:
    norms = np.abs(np.random.default_rng(3).normal(size=(13, 4))) * 5
    fig = plots.hidden_state_norms_figure(norms, tokens=TOKENS[:4], title=f"norms{RANDOM}", d_model=768)
    captions = [t.get_text() for t in fig.texts]
    assert any("final LayerNorm" in c and "√768 = 27.7" in c for c in captions), captions
    assert "random weights" in titles(fig)
    assert_sane_size(fig)
    without = plots.hidden_state_norms_figure(norms[:3], layers=[0, 1, 2], final_layer_norm=False)
    assert not any("LayerNorm" in t.get_text() for t in without.texts)


def test_each_png_is_its_figure_saved(tmp_path: Path) -> None:
    path = plots.attention_overview(np.stack([causal_weights(2, 4)]), ["a", "b", "c", "d"], tmp_path / "o.png")
    assert_png(path)
