"""How large an introspection answer may be: an estimate from sizes alone, checked before any model work.

The costs are the API layer's (it knows the wire format and sets them); this module only adds them up.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

from gpt2_service.errors import FieldViolation, InvalidRequestError
from gpt2_service.model.tokenizer import TokenPiece

RESPONSE_TOO_LARGE = "RESPONSE_TOO_LARGE"


@dataclass(frozen=True)
class ResponseBudget:
    """The largest answer, in bytes, and what each part of one costs."""

    max_bytes: int
    token_bytes: int  # id, offsets and framing of one token or candidate record
    float_bytes: int  # one element of a result array
    piece_bytes: int  # a typical candidate's text
    stage_bytes: int  # one stage of a trace: name, shapes, time, statistics

    def tokens(self, tokens: Sequence[TokenPiece]) -> int:
        # a piece's bytes count twice: its own text, and the whole text or its raw bytes
        return sum(self.token_bytes + 2 * len(t.data) for t in tokens)

    def floats(self, count: int) -> int:
        return self.float_bytes * count

    def candidates(self, count: int) -> int:
        return (self.token_bytes + self.floats(3) + self.piece_bytes) * count  # logit and two probabilities

    def stages(self, count: int) -> int:
        return self.stage_bytes * count

    def check(self, num_bytes: int, narrow: Sequence[tuple[str, str]]) -> None:
        """RESPONSE_TOO_LARGE when ``num_bytes`` (an estimate or a lower bound) is over the limit,
        with a violation for each (field, advice) in ``narrow``."""
        if num_bytes <= self.max_bytes:
            return
        size = (
            f"the response would be about {_human_bytes(num_bytes)}, over the limit of {_human_bytes(self.max_bytes)}"
        )
        raise InvalidRequestError([FieldViolation(f, f"{size}: {how}") for f, how in narrow], reason=RESPONSE_TOO_LARGE)


def _human_bytes(num_bytes: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= size:
            return f"{num_bytes / size:.1f} {unit}"
    return f"{num_bytes} bytes"


# No limit, nothing counted: for in-process use, where no message has to carry the answer.
NO_LIMIT = ResponseBudget(max_bytes=sys.maxsize, token_bytes=0, float_bytes=0, piece_bytes=0, stage_bytes=0)
