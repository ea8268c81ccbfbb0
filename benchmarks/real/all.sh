#!/usr/bin/env bash
# One command for the whole real-model benchmark on a fresh machine (CPU): the venvs (venvs.sh), the base and the
# LoRA experts (build.py, into $SMILE_REAL_CACHE, default ~/.cache/smile-real; reused when complete), the table
# (run.py -> docs/results/real.json) and the routing diagnosis (diagnose.py -> docs/results/real_diagnosis.json).
# Extra arguments go to run.py (e.g. --limit 20 --cases base,smile-adapter-r16-faithful).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
"$here/venvs.sh"
py="${SMILE_REAL_VENV:-/work/venvs/smile-real}/bin/python"
"$py" "$here/build.py"
"$py" "$here/run.py" "$@"
"$py" "$here/diagnose.py"
