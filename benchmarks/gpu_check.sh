#!/usr/bin/env bash
# The GPU path, checked and measured on a fresh GPU machine in one go (about 10 minutes on an H100 with 16 cores).
#
#   benchmarks/gpu_check.sh RESULTS_DIR [--device cuda|cpu] [--layers auto|N] [--work DIR] [--budget-s S]
#
# 1. Python: uses $PYTHON (default python3) when it imports torch with CUDA (--device cpu: any torch) and the
#    project's dependencies; else installs what is missing: with no torch, or a torch without CUDA, a virtual
#    environment under WORK/venv with `pip install torch` (a CUDA build from the package registry) and the
#    project (`pip install -e .`, pytest). A machine that reaches no registry and has no usable torch stops here,
#    saying so in RESULTS_DIR/summary.txt.
# 2. The CUDA tests (`pytest -m cuda`: tests/test_cuda.py, the CUDA factorization test), against the CPU.
# 3. benchmarks/gpu_check.py: Mistral-7B-shaped inputs (--layers; auto: as many as the disk allows, 4 to 12),
#    `smile upscale --device cuda --json` warm and cold, the read/write floor cold and warm, `--device cpu` on the
#    same inputs for the ratio. Everything is written to RESULTS_DIR: gpu_check.json, summary.txt, tests.txt,
#    setup.txt, nvidia-smi.txt.
# Dry run without a GPU: benchmarks/gpu_check.sh /tmp/gpu-dry --device cpu --layers 1
set -uo pipefail

usage() { echo "usage: $0 RESULTS_DIR [--device cuda|cpu] [--layers auto|N] [--work DIR] [--budget-s S]" >&2; exit 2; }
[ $# -ge 1 ] || usage
RESULTS=$1; shift
DEVICE=cuda LAYERS=auto WORK=/tmp/smile-gpu-check BUDGET=570
while [ $# -gt 0 ]; do
  case $1 in
    --device) DEVICE=${2:?}; shift 2 ;;
    --layers) LAYERS=${2:?}; shift 2 ;;
    --work) WORK=${2:?}; shift 2 ;;
    --budget-s) BUDGET=${2:?}; shift 2 ;;
    *) usage ;;
  esac
done
case $DEVICE in cuda|cuda:*|cpu) ;; *) echo "$0: --device must be cuda, cuda:N or cpu" >&2; exit 2 ;; esac
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$RESULTS" "$WORK"
RESULTS=$(cd "$RESULTS" && pwd)
export SMILE_GPU_CHECK_DEADLINE=$(( $(date +%s) + BUDGET ))
SETUP=$RESULTS/setup.txt
: > "$SETUP"
say() { echo "$*" | tee -a "$SETUP" >&2; }
fail() { say "gpu_check: $*"; echo "gpu_check did not run: $*" > "$RESULTS/summary.txt"; exit 1; }

say "gpu_check start $(date -u '+%F %T') UTC on $(hostname), $(nproc) cores; load: $(cut -d' ' -f1-3 /proc/loadavg)"
command -v nvidia-smi > /dev/null && nvidia-smi > "$RESULTS/nvidia-smi.txt" 2>&1

PY=${PYTHON:-python3}
if [ "$DEVICE" = cpu ]; then
  TORCH_OK='import torch'
else
  TORCH_OK='import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'
fi
DEPS_OK='import transformers, safetensors, huggingface_hub, typer, rich, yaml, pydantic, pytest'
if ! "$PY" -c "$TORCH_OK" 2> /dev/null; then
  say "no usable torch in $PY ($DEVICE): installing one in $WORK/venv"
  if [ ! -x "$WORK/venv/bin/python" ]; then
    "$PY" -m venv "$WORK/venv" >> "$SETUP" 2>&1 || fail "cannot create a virtual environment with $PY"
  fi
  PY=$WORK/venv/bin/python
  if ! "$PY" -c "$TORCH_OK" 2> /dev/null; then
    timeout 300 "$PY" -m pip install -q torch >> "$SETUP" 2>&1 || fail "pip install torch failed (no registry?)"
  fi
  "$PY" -c "$TORCH_OK" || fail "the installed torch cannot use $DEVICE"
fi
if ! PYTHONPATH=$REPO "$PY" -c "$DEPS_OK" 2> /dev/null; then
  say "installing the project's dependencies into $PY"
  timeout 240 "$PY" -m pip install -q -e "$REPO" pytest hypothesis >> "$SETUP" 2>&1 \
    || fail "pip install -e $REPO failed (no registry?)"
fi
PYTHONPATH=$REPO "$PY" -c "$DEPS_OK" || fail "the project's dependencies do not import"
say "python: $("$PY" -c 'import sys, torch; print(sys.executable, "torch", torch.__version__, "cuda", torch.version.cuda)')"

# the CUDA tests (with --device cpu, their logic against a second CPU run)
export PYTHONPATH=$REPO
TEST_DEVICE=$DEVICE
(cd "$REPO" && SMILE_TEST_DEVICE=$TEST_DEVICE timeout $(( BUDGET / 4 )) "$PY" -m pytest -q -rs -m cuda -p no:cacheprovider \
  tests/test_cuda.py tests/test_factorization_and_parts.py > "$RESULTS/tests.txt" 2>&1)
TESTS_RC=$?
TESTS_LINE=$(tail -n 1 "$RESULTS/tests.txt")
say "tests (exit $TESTS_RC): $TESTS_LINE"

"$PY" "$REPO/benchmarks/gpu_check.py" --out "$RESULTS" --device "$DEVICE" --layers "$LAYERS" --work "$WORK" \
  --tests "exit $TESTS_RC: $TESTS_LINE" 2>> "$SETUP"
RC=$?
say "gpu_check end $(date -u '+%F %T') UTC (exit $RC); results in $RESULTS"
exit $RC
