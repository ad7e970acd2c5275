"""``client.inspect`` (sync and asyncio) and ``gpt2-client inspect`` against a live server: numpy
results, typed errors, readable tables that say "random weights" first when so, and PNGs that an
image reader can open, titled with their settings."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gpt2_client import AsyncClient, Client, InvalidArgumentError, plots
from gpt2_client.cli import main
from gpt2_client.inspect import AttentionResult, PredictNextResult
from gpt2_service.introspection.inspector import Inspector
from gpt2_service.model.weights import LoadedModel
from PIL import Image

from tests.api_helpers import VENV_BIN, Served, serve

CAT = "cat sat on the"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
async def served(tiny: LoadedModel) -> AsyncIterator[Served]:
    async with serve(tiny) as s:
        yield s


# -- the client ----------------------------------------------------------------------------------


async def test_sync_client_returns_numpy_results(served: Served) -> None:
    with Client(served.target, timeout=30) as client:
        tokens = await asyncio.to_thread(client.inspect.tokenize, CAT)
        text = await asyncio.to_thread(client.inspect.detokenize, tokens.token_ids)
        attention = await asyncio.to_thread(
            lambda: client.inspect.attention(CAT, layers=[1], heads=[0], dtype="bfloat16")
        )
    assert tokens.token_ids == [9246, 3332, 319, 262] and text == CAT
    assert [(t.text, t.start, t.end) for t in tokens.tokens][1] == (" sat", 3, 7)
    assert isinstance(attention, AttentionResult) and attention.weights.dtype == np.float32
    assert attention.weights.shape == (1, 1, 4, 4) and attention.scores is None
    np.testing.assert_allclose(attention.weights.sum(axis=-1), 1.0, atol=1e-2)  # bfloat16 on the wire


async def test_async_client_predict_next_equals_the_inspector(served: Served, tiny: LoadedModel) -> None:
    async with AsyncClient(served.target, timeout=30) as client:
        result = await client.inspect.predict_next(CAT, temperature=0.7, top_k=50, seed=5, num_samples=3)
        hidden = await client.inspect.hidden_states(CAT, layers=[0, 2], include_vectors=True)
        trace = await client.inspect.trace(CAT, seed=5)
    expected = Inspector(tiny).predict_next(CAT, temperature=0.7, top_k=50, seed=5, num_samples=3)
    assert isinstance(result, PredictNextResult)
    assert [c.id for c in result.candidates] == [c.id for c in expected.candidates]
    assert [c.id for c in result.sampled_tokens] == [c.id for c in expected.sampled_tokens]
    assert result.greedy_token.id == expected.greedy_token.id
    assert result.entropy == pytest.approx(expected.entropy, rel=1e-5)
    assert result.sampled_entropy == pytest.approx(expected.sampled_entropy, rel=1e-5)
    assert hidden.layers == (0, 2) and hidden.vectors is not None and hidden.vectors.shape == (2, 4, 64)
    assert trace.stages[0].name == "tokenizer" and trace.stages[-1].name == "sampling"
    assert trace.stages[1].output_stats is not None and trace.prediction.seed == 5


async def test_client_errors_name_the_field(served: Served) -> None:
    async with AsyncClient(served.target, timeout=30) as client:
        with pytest.raises(InvalidArgumentError) as caught:
            await client.inspect.attention(CAT, layers=[5])
    assert [v.field for v in caught.value.violations] == ["layers"]


# -- the command line ----------------------------------------------------------------------------


async def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``gpt2-client`` in a worker thread of this process (the server runs on this loop)."""

    def run() -> int:
        try:
            main(list(argv))
        except SystemExit as exit_:
            return int(exit_.code or 0)
        return 0

    status = await asyncio.to_thread(run)
    out, err = capsys.readouterr()
    return status, out, err


def _assert_png(path: Path) -> None:
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["tokens", CAT], ["9246", "3332", "␣sat", "start"]),
        (["tokens", "--ids", "9246, 3332 319 262"], ["cat sat on the", "␣the"]),
        (["embed", "bank is near the river bank"], ["|input|", "cosine similarity", "first vs last token"]),
        (["attention", CAT, "--layer", "1", "--head", "0", "--scores"], ["-inf", "1.0000", "row = query"]),
        (["attention", CAT, "--layer", "0"], ["head", "previous", "entropy"]),
        (["hidden", CAT], ["embeddings", "after block 0", "after block 1 + ln_f"]),
        (["next", CAT, "--top-k", "50", "--temperature", "0.7", "--seed", "1", "--num-samples", "3"],
         ["rank", "probability", "greedy:", "sampled (3, seed 1)", "nats raw,", "after temperature and filters"]),
        (["trace", CAT], ["block.1.mlp", "final_layer_norm", "lm_head", "sampling", "total"]),
    ],
    ids=["tokens", "ids", "embed", "one-head", "heads", "hidden", "next", "trace"],
)  # fmt: skip
async def test_each_command_prints_a_table(
    served: Served, capsys: pytest.CaptureFixture[str], argv: list[str], expected: list[str]
) -> None:
    status, out, err = await _cli(capsys, "--target", served.target, "inspect", *argv)
    assert status == 0, err
    for needle in expected:
        assert needle in out, f"{needle!r} missing from:\n{out}"


@pytest.mark.parametrize(
    "argv",
    [
        ["embed", "bank is near the river bank"],
        ["embed", "cat dog king queen apple", "--pca"],
        ["attention", CAT, "--layer", "1", "--head", "1"],
        ["attention", CAT, "--layer", "0"],
        ["hidden", CAT],
        ["next", CAT, "--top-k", "5", "--temperature", "0.7"],
    ],
    ids=["similarity", "pca", "heatmap", "grid", "norms", "top-k"],
)
async def test_each_png_option_writes_a_png(
    served: Served, capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str]
) -> None:
    path = tmp_path / "out.png"
    status, _, err = await _cli(capsys, "--target", served.target, "inspect", *argv, "--png", str(path))
    assert status == 0, err
    assert f"[wrote {path}]" in err
    _assert_png(path)


async def test_json_output_holds_arrays_as_lists(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = await _cli(capsys, "--target", served.target, "--json", "inspect", "attention", CAT, "--scores")
    assert status == 0, err
    result = json.loads(out)
    assert np.asarray(result["weights"]).shape == (1, 2, 4, 4) and result["scores"][0][0][0][1] == "-inf"


async def test_a_bad_layer_exits_1_naming_the_field(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = await _cli(capsys, "--target", served.target, "inspect", "attention", CAT, "--layer", "9")
    assert status == 1 and out == ""
    assert "INVALID_ARGUMENT" in err and "layers: 9 out of range" in err


async def test_the_console_script_draws_the_lesson_s_next_token_chart(served: Served, tmp_path: Path) -> None:
    path = tmp_path / "next.png"
    process = await asyncio.create_subprocess_exec(
        str(VENV_BIN / "gpt2-client"), "inspect", "next", CAT, "--top-k", "50", "--temperature", "0.7",
        "--candidates", "5", "--png", str(path), "--target", served.target,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    assert process.returncode == 0, err.decode()
    assert out.decode().count("\n") >= 7  # header, title, five candidates, greedy, sample
    _assert_png(path)


# -- random weights, titles, every layer ---------------------------------------------------------

TINY_LAYERS, TINY_HEADS = 2, 2  # random:tiny


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The figures the CLI draws, kept as plots._save writes them."""
    pytest.importorskip("matplotlib")
    kept: list[Any] = []
    save = plots._save

    def keep(fig: Any, path: Any) -> Path:
        kept.append(fig)
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return kept


def _titles(fig: Any) -> str:
    suptitle = [fig._suptitle.get_text()] if fig._suptitle is not None else []
    return " | ".join([*suptitle, *(ax.get_title() for ax in fig.axes)])


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["tokens", CAT], "these token ids and pieces are real"),
        (["embed", CAT], "similarities carry no meaning"),
        (["attention", CAT], "the causal mask and the arithmetic are real"),
        (["hidden", CAT], "the norms carry no learned meaning"),
        (["next", CAT], "nearly flat (entropy "),
        (["trace", CAT], "nearly flat (entropy "),
    ],
    ids=["tokens", "embed", "attention", "hidden", "next", "trace"],
)
async def test_random_weights_are_the_first_line_of_every_table_and_absent_from_json(
    served: Served, capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    status, out, err = await _cli(capsys, "--target", served.target, "inspect", *argv)
    assert status == 0, err
    first = out.splitlines()[0]
    assert first.startswith("[random weights: an untrained model; ") and first.endswith("]") and says in first
    status, out, err = await _cli(capsys, "--target", served.target, "--json", "inspect", *argv)
    assert status == 0, err
    assert "random weights" not in out
    json.loads(out)  # one JSON document, nothing before it


async def test_hidden_explains_the_final_layer_norm_under_its_table(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = await _cli(capsys, "--target", served.target, "inspect", "hidden", CAT)
    assert status == 0, err
    assert "after block 1 + ln_f" in out and "final LayerNorm (ln_f)" in out and "√64 = 8.0" in out
    status, out, err = await _cli(capsys, "--target", served.target, "inspect", "hidden", CAT, "--layers", "0", "1")
    assert status == 0, err
    assert "LayerNorm" not in out  # no state after ln_f asked for


async def test_all_layers_prints_a_summary_per_layer(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = await _cli(capsys, "--target", served.target, "inspect", "attention", CAT, "--all-layers")
    assert status == 0, err
    lines = out.splitlines()
    assert lines[1].startswith("every layer: mean attention per query (4 tokens; uniform attention")
    assert lines[2].split() == ["layer", "mean", "entropy", "(nats)", "most", "on", "previous", "most", "on", "first",
                                "token", "most", "on", "self"]  # fmt: skip
    assert [line.split()[0] for line in lines[3 : 3 + TINY_LAYERS]] == ["0", "1"]
    assert all(line.count("head ") == 3 for line in lines[3 : 3 + TINY_LAYERS])


async def test_all_layers_png_draws_layers_by_heads_titled_with_random_weights(
    served: Served, capsys: pytest.CaptureFixture[str], tmp_path: Path, figures: list[Any]
) -> None:
    path = tmp_path / "overview.png"
    status, _, err = await _cli(capsys, "--target", served.target, "inspect", "attention", CAT, "--all-layers",
                                "--png", str(path))  # fmt: skip
    assert status == 0, err
    _assert_png(path)
    (fig,) = figures
    assert len([ax for ax in fig.axes if ax.get_images()]) == TINY_LAYERS * TINY_HEADS
    assert "every layer and head, 4 tokens — random weights" in _titles(fig)


@pytest.mark.parametrize("flag", [["--head", "0"], ["--layer", "1"]], ids=["head", "layer"])
async def test_all_layers_with_a_layer_or_head_is_a_usage_error(
    served: Served, capsys: pytest.CaptureFixture[str], flag: list[str]
) -> None:
    status, out, err = await _cli(capsys, "--target", served.target, "inspect", "attention", CAT, "--all-layers", *flag)
    assert status == 2 and out == ""
    assert "--all-layers shows every layer and head; it takes neither --layer nor --head" in err


@pytest.mark.parametrize(
    ("argv", "title"),
    [
        (["attention", CAT, "--layer", "1", "--head", "0"], "attention, layer 1 head 0, 4 tokens — random weights"),
        (["attention", CAT, "--layer", "1"], "attention by head, layer 1, 4 tokens — random weights"),
        (["hidden", CAT], "hidden-state norms by layer, 4 tokens — random weights"),
        (["embed", CAT], "cosine similarity of the input embeddings, 4 tokens — random weights"),
        (["next", CAT, "--temperature", "0.7", "--top-k", "5", "--seed", "3"],
         'next token after "cat sat on the": T=0.7, top-k 5, top-p off, seed 3; entropy {raw} nats raw, '
         "{sampled} after temperature and filters — random weights: nearly flat"),
    ],
    ids=["heatmap", "grid", "norms", "similarity", "top-k"],
)  # fmt: skip
async def test_each_picture_s_title_carries_its_settings_and_random_weights(
    served: Served, capsys: pytest.CaptureFixture[str], tmp_path: Path, figures: list[Any], argv: list[str], title: str
) -> None:
    status, _, err = await _cli(capsys, "--target", served.target, "--json", "inspect", *argv,
                                "--png", str(tmp_path / "out.png"))  # fmt: skip
    assert status == 0, err
    (fig,) = figures
    if "{raw}" in title:  # the next-token chart's: both entropies, as PredictNext gives them
        async with AsyncClient(served.target) as client:
            result = await client.inspect.predict_next(CAT, temperature=0.7, top_k=5, seed=3)
        title = title.format(raw=f"{result.entropy:.3f}", sampled=f"{result.sampled_entropy:.3f}")
    assert " ".join(title.split()) in " ".join(_titles(fig).split())  # long titles wrap


@pytest.mark.parametrize("stream", [[], ["--stream"]], ids=["unary", "stream"])
async def test_generate_notes_random_weights_on_stderr_only(
    served: Served, capsys: pytest.CaptureFixture[str], stream: list[str]
) -> None:
    argv = ["--target", served.target, "generate", CAT, "--max-new-tokens", "3", "--seed", "1", *stream]
    status, out, err = await _cli(capsys, *argv, "--json")
    assert status == 0, err
    text = "".join(json.loads(line)["text"] for line in out.splitlines())
    assert "random weights" not in out + err
    status, out, err = await _cli(capsys, *argv)
    assert status == 0, err
    assert out == text + "\n"  # stdout is exactly the text
    assert err.splitlines()[-1] == "[random weights: the model is untrained, so the text is meaningless]"
