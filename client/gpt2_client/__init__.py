"""gpt2_client: the Python client of the gpt2.v1 gRPC service (imports without torch).

    from gpt2_client import Client

    with Client("localhost:50051", timeout=30) as client:
        print(client.generate("The cat sat on the", max_new_tokens=20, temperature=0.8, seed=1).text)
        for choice in client.generate("The cat sat on the", max_new_tokens=20, n=3, seed=1).choices:
            print(choice.index, choice.seed, choice.text)
        for chunk in client.stream("Once upon a time", max_new_tokens=40, stop=["\\n"]):
            print(chunk.text, end="", flush=True)
        print(client.score("The cat sat on the mat", add_bos=True).perplexity)

``AsyncClient`` is the asyncio twin. Results are frozen dataclasses (gpt2_client.results);
failed calls raise ``GPT2Error`` subclasses (gpt2_client.errors).
"""

from gpt2_client.aio import AsyncClient
from gpt2_client.client import Client
from gpt2_client.errors import (
    CancelledError,
    DeadlineExceededError,
    FieldViolation,
    GPT2Error,
    InternalError,
    InvalidArgumentError,
    OverloadedError,
    UnauthenticatedError,
    UnavailableError,
)
from gpt2_client.params import BatchItem, GenerationParams, Prompt, ScoreItem, ScoreParams
from gpt2_client.results import (
    Choice,
    EngineLimits,
    FinishReason,
    Generation,
    HealthStatus,
    ModelInfo,
    ParameterCounts,
    ScoredToken,
    ScoreResult,
    StreamChunk,
    Timing,
    Token,
    TopLogprob,
    Usage,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "BatchItem",
    "CancelledError",
    "Choice",
    "Client",
    "DeadlineExceededError",
    "EngineLimits",
    "FieldViolation",
    "FinishReason",
    "GPT2Error",
    "Generation",
    "GenerationParams",
    "HealthStatus",
    "InternalError",
    "InvalidArgumentError",
    "ModelInfo",
    "OverloadedError",
    "ParameterCounts",
    "Prompt",
    "ScoreItem",
    "ScoreParams",
    "ScoreResult",
    "ScoredToken",
    "StreamChunk",
    "Timing",
    "Token",
    "TopLogprob",
    "UnauthenticatedError",
    "UnavailableError",
    "Usage",
]
