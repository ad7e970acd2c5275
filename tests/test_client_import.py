"""The client package is what other services install: it must import without torch (or the server)."""

from __future__ import annotations

import subprocess
import sys


def test_client_imports_without_torch_or_the_server() -> None:
    code = (
        "import sys, gpt2_client, gpt2_client.cli, gpt2_client.aio\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('torch', 'gpt2_service', 'transformers')]\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_public_names_are_exported() -> None:
    import gpt2_client

    for name in gpt2_client.__all__:
        assert hasattr(gpt2_client, name), name
