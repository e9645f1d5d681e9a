#!/usr/bin/env bash
# The wheels the GPU benchmark needs beyond what the GPU machine's Python 3.12 has (torch with
# CUDA, transformers, peft, safetensors, opencv, pyarrow): diffusers at this project's pinned
# version and its small pure-Python dependencies, into ./wheels (git-ignored, about 7 MB).
#
#   bash bench/device_wheels.sh
#
# Then, on the GPU machine, with ./wheels carried along:
#
#   pip install --no-index --find-links wheels diffusers importlib_metadata
#   python bench/diffusion_throughput.py --size full --frames 64 --json "$OUT/diffusion.json"
set -euo pipefail
cd "$(dirname "$0")/.."
pinned() { grep -i "^$1==" constraints.txt | head -1; }
mkdir -p wheels
.venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform any -d wheels \
    "$(pinned diffusers)" "$(pinned importlib_metadata || echo importlib_metadata)" "$(pinned zipp || echo zipp)"
du -sh wheels
