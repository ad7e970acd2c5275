"""gpt2-client, the console script, against a live server."""

from __future__ import annotations

import asyncio
import json
import os
import re

from gpt2_service.model.weights import LoadedModel

from tests.api_helpers import VENV_BIN, serve


async def _cli(*args: str, target: str | None = None) -> tuple[int, str, str]:
    env = dict(os.environ)
    if target is not None:
        env["GPT2_CLIENT_TARGET"] = target
    process = await asyncio.create_subprocess_exec(
        str(VENV_BIN / "gpt2-client"), *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_generate_json_and_stream_and_info(tiny: LoadedModel) -> None:
    async with serve(tiny) as served:
        flags = ["--max-new-tokens", "6", "--seed", "9", "--temperature", "0.8", "--top-k", "20", "--ignore-eos"]
        status, out, err = await _cli("generate", "The cat sat on the", *flags, "--json", "--target", served.target)
        assert status == 0, err
        result = json.loads(out)
        status, streamed, summary = await _cli(
            "generate", "The cat sat on the", *flags, "--stream", target=served.target
        )
        assert status == 0, summary
        status, info, err = await _cli("info", target=served.target)
        assert status == 0, err
        status, health, _ = await _cli("--json", "health", target=served.target)
    assert result["finish_reason"] == "LENGTH" and result["seed"] == 9 and len(result["token_ids"]) == 6
    assert streamed == result["text"] + "\n"  # the text, then a newline; the summary goes to stderr
    assert "[LENGTH: 6 tokens" in summary and "seed 9" in summary
    assert "random:tiny" in info and "RANDOM WEIGHTS" in info and "max_new_tokens_limit" in info
    assert re.search(r"\nbatch-invariant +yes", info) and re.search(r"\nweights +float32\n", info)
    assert json.loads(health) == {"service": "", "status": "SERVING"}


async def test_invalid_argument_exits_1_naming_the_field(tiny: LoadedModel) -> None:
    async with serve(tiny) as served:
        status, out, err = await _cli("generate", "x", "--top-p", "2", target=served.target)
    assert status == 1 and out == ""
    assert "INVALID_ARGUMENT" in err and "sampling.top_p" in err


async def test_health_of_an_unreachable_server_exits_1() -> None:
    status, _, err = await _cli("health", "--timeout", "5", "--target", "127.0.0.1:1")
    assert status == 1 and "UNAVAILABLE" in err
    assert "hint: is a server running at 127.0.0.1:1? (start one with: make run, or gpt2-serve;" in err
