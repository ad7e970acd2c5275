"""Streaming text: valid UTF-8 in every delta, stop strings never leaked, deltas add up."""

from __future__ import annotations

import pytest
from gpt2_service.core.detokenizer import IncrementalDetokenizer
from gpt2_service.model.tokenizer import GPT2Tokenizer

TEXTS = [
    "Hello 🤗 world, 東京タワー and café",
    "e\u0301 combining marks: a\u0308o\u0308u\u0308 and 👩\u200d👩\u200d👧 a family",
    "  leading   spaces\n\ttabs\r\nand 🎉🎉🎉 emoji",
    "中文字符和日本語のテキスト",
]


@pytest.fixture(scope="module")
def tok() -> GPT2Tokenizer:
    return GPT2Tokenizer.embedded()


def stream(tok: GPT2Tokenizer, ids: list[int], **kw: object) -> tuple[list[str], IncrementalDetokenizer, str | None]:
    detok = IncrementalDetokenizer(tok.token_bytes, tok.special_ids, **kw)  # type: ignore[arg-type]
    deltas, stop = [], None
    for token in ids:
        update = detok.add(token)
        deltas.append(update.delta)
        if update.stop is not None:
            stop = update.stop
            break
    else:
        deltas.append(detok.flush())
    return deltas, detok, stop


@pytest.mark.parametrize("text", TEXTS)
def test_no_delta_holds_a_replacement_character_and_deltas_add_up(tok: GPT2Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # characters really are split over tokens
    deltas, detok, _ = stream(tok, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == detok.text == text == tok.decode(ids)


def test_a_stop_string_split_over_three_tokens_is_neither_emitted_nor_leaked(tok: GPT2Tokenizer) -> None:
    ids = tok.encode("The answer is 42 ###END### and more text")
    assert len(tok.encode(" ###END###")) == 3
    deltas, detok, stop = stream(tok, ids, stop=["###END###"])
    assert stop == "###END###"
    assert "".join(deltas) == detok.text == "The answer is 42 "
    assert all("#" not in d for d in deltas)


def test_include_stop_in_output_keeps_the_stop_string(tok: GPT2Tokenizer) -> None:
    deltas, detok, stop = stream(tok, tok.encode("abc ###END### tail"), stop=["###END###"], include_stop_in_output=True)
    assert stop == "###END###"
    assert "".join(deltas) == detok.text == "abc ###END###"


def test_text_that_only_looks_like_a_stop_prefix_is_released(tok: GPT2Tokenizer) -> None:
    deltas, _, stop = stream(tok, tok.encode("a ### b ###EN c"), stop=["###END###"])
    assert stop is None
    assert "".join(deltas) == "a ### b ###EN c"


def test_the_earliest_of_several_stop_strings_wins(tok: GPT2Tokenizer) -> None:
    _, detok, stop = stream(tok, tok.encode("one two three four"), stop=["four", "two three"])
    assert stop == "two three"
    assert detok.text == "one "


def test_a_stop_string_made_of_a_split_emoji(tok: GPT2Tokenizer) -> None:
    deltas, detok, stop = stream(tok, tok.encode("party 🎉 time"), stop=["🎉"])
    assert stop == "🎉"
    assert detok.text == "party "
    assert all("\ufffd" not in d for d in deltas)


def test_bytes_that_never_form_a_character_become_one_replacement_like_a_full_decode(tok: GPT2Tokenizer) -> None:
    ids = [tok.encode(" 🤗")[0], tok.encode("x")[0]]  # an emoji's first bytes, then ASCII
    deltas, detok, _ = stream(tok, ids)
    assert "".join(deltas) == detok.text == tok.decode(ids) == " \ufffdx"


def test_special_tokens_add_no_text(tok: GPT2Tokenizer) -> None:
    ids = [*tok.encode("a"), tok.eos_token_id, *tok.encode("b")]
    deltas, _, _ = stream(tok, ids)
    assert "".join(deltas) == "ab"


def test_tokenizer_matches_the_lesson(tok: GPT2Tokenizer) -> None:
    assert tok.encode("cat sat on the") == [9246, 3332, 319, 262]
    assert tok.vocab_size == 50257 and tok.eos_token_id == 50256
