"""Generate the Python code of the gpt2.v1 protos into client/gpt2_client/proto/ (``make proto``).

protoc writes ``from gpt2.v1 import common_pb2`` (the proto package path); the generated modules
live in the ``gpt2_client.proto`` package instead, so those imports are rewritten. The .proto
files themselves stay as other languages expect them. ``--check`` generates into memory and
exits 1 when the committed files differ (the staleness test runs it).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO_PACKAGE_DIR = PROTO_ROOT / "gpt2" / "v1"
OUT_DIR = ROOT / "client" / "gpt2_client" / "proto"
PYTHON_PACKAGE = "gpt2_client.proto"

INIT = '''"""Generated protobuf and gRPC code of the gpt2.v1 API. Do not edit: run ``make proto``."""
'''

# `from gpt2.v1 import x_pb2 as ...` (protoc, grpc) and `import gpt2.v1.x_pb2` / `gpt2.v1.x_pb2.Y`
# (mypy-protobuf stubs).
_FROM_IMPORT = re.compile(r"^from gpt2\.v1 import ", re.MULTILINE)
_DOTTED = re.compile(r"\bgpt2\.v1\.(\w+_pb2)\b")


def _plugin(name: str) -> str:
    """A protoc plugin installed next to this Python (the venv's bin/)."""
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found; install the dev extra (mypy-protobuf)")
    return found


def _rewrite(text: str) -> str:
    text = _FROM_IMPORT.sub(f"from {PYTHON_PACKAGE} import ", text)
    return _DOTTED.sub(rf"{PYTHON_PACKAGE}.\1", text)


def generate() -> dict[str, str]:
    """File name -> content of every generated module (imports already rewritten)."""
    protos = sorted(PROTO_PACKAGE_DIR.glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable, "-m", "grpc_tools.protoc",
            f"--proto_path={PROTO_ROOT}",
            f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
            f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
            f"--python_out={tmp}", f"--grpc_python_out={tmp}",
            f"--mypy_out={tmp}", f"--mypy_grpc_out={tmp}",
            *(str(p.relative_to(PROTO_ROOT)) for p in protos),
        ]  # fmt: skip
        done = subprocess.run(command, cwd=PROTO_ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"protoc failed:\n{done.stderr}")
        generated = Path(tmp) / "gpt2" / "v1"
        files = {p.name: _rewrite(p.read_text()) for p in sorted(generated.iterdir()) if p.is_file()}
    files["__init__.py"] = INIT
    return files


def stale_files(files: dict[str, str]) -> list[str]:
    """Names whose committed copy differs from ``files``, or that should not be there."""
    committed = {p.name for p in OUT_DIR.glob("*") if p.is_file()} if OUT_DIR.is_dir() else set()
    differ = [n for n, text in files.items() if not (OUT_DIR / n).is_file() or (OUT_DIR / n).read_text() != text]
    return sorted(set(differ) | (committed - set(files)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed code is stale; write nothing")
    args = parser.parse_args()
    files = generate()
    stale = stale_files(files)
    if args.check:
        if stale:
            print("stale generated code (run `make proto`): " + ", ".join(stale), file=sys.stderr)
            raise SystemExit(1)
        return
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name in {p.name for p in OUT_DIR.glob("*") if p.is_file()} - set(files):
        (OUT_DIR / name).unlink()
    for name, text in files.items():
        (OUT_DIR / name).write_text(text)
    print(f"wrote {len(files)} files to {OUT_DIR.relative_to(ROOT)}" + (f" ({len(stale)} changed)" if stale else ""))


if __name__ == "__main__":
    main()
