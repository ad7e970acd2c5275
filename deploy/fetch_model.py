"""Build-time helper of deploy/Dockerfile: download one GPT-2 checkpoint into ``<dest>/<name>``.

Usage: ``fetch_model.py <hub id> <revision> <dest>``; ``openai-community/gpt2`` lands in
``<dest>/gpt2``. Only the files the server loads are fetched (config, safetensors weights,
tokenizer). This runs while the image is built, never in the running server, which is offline.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from huggingface_hub import snapshot_download

WANTED = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    repo_id, revision, dest = argv
    target = Path(dest) / repo_id.rstrip("/").rsplit("/", 1)[-1]
    snapshot_download(repo_id, revision=revision, local_dir=target, allow_patterns=WANTED)
    config = json.loads((target / "config.json").read_text())
    if config.get("model_type") != "gpt2":
        print(f"{repo_id}: model_type is {config.get('model_type')!r}, not 'gpt2'", file=sys.stderr)
        return 1
    if not any(target.glob("*.safetensors")):
        print(f"{repo_id}: no safetensors weights at revision {revision}", file=sys.stderr)
        return 1
    print(f"fetched {repo_id}@{revision} into {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
