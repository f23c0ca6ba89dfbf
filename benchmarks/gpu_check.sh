#!/usr/bin/env bash
# The prepared GPU check of the NPR engine (docs/performance.md, "GPU check"): one H100/H200, no network,
# no weights, <= 8 minutes. Random-init Qwen3-0.6B / Qwen3-4B shapes in bf16. Arguments go to
# benchmarks/gpu_check.py (--help); `--device cpu --tiny` is the dry run CI exercises.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
exec "$PYTHON" benchmarks/gpu_check.py "$@"
