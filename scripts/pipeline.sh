#!/usr/bin/env bash
# One SMILE build as a shell pipeline: inspect -> dry run -> upscale -> verify -> route, each step's exit code
# deciding what happens next (0 success, 2 bad arguments or inputs, 1 any other failure, 130 interrupted).
#
#   BASE=mistralai/Mistral-7B-v0.1 \
#   EXPERTS=meta-math/MetaMath-Mistral-7B,cognitivecomputations/dolphin-2.1-mistral-7b \
#   OUT=./mistral-smile scripts/pipeline.sh --config configs/routing.yaml
#
# Arguments are `smile upscale` options (a --config file, ranks, --routing...), used by the dry run and the upscale.
# Environment:
#   BASE, EXPERTS   base model and comma-separated experts (local folders or Hub ids)          (required)
#   OUT             output folder                                                              (required)
#   REPORTS         where the reports go: inspect.json, plan.txt, summary.json, verify.json, route.json
#                   (default: OUT.reports beside OUT)
#   INSPECT_OPTIONS `smile inspect` options, e.g. "--expert-rank 64 --budget 1.2x" (default: none)
#   PROMPTS         prompts for `smile route`, one per line (default: none, the route step is skipped)
#   RETRIES         reruns of a failed upscale (exit 1) with --resume (default: 1)
#   SMILE           the smile command (default: smile)
#
# Exit code: the failing step's (2: fix the inputs, nothing was written; 130: interrupted, run the script again
# and the upscale resumes), 1 when verification fails, 0 when every step passed.
set -uo pipefail

: "${BASE:?set BASE to the base model}" "${EXPERTS:?set EXPERTS to the comma-separated experts}"
: "${OUT:?set OUT to the output folder}"
REPORTS=${REPORTS:-$OUT.reports}
RETRIES=${RETRIES:-1}
read -r -a SMILE_CMD <<<"${SMILE:-smile}"
read -r -a INSPECT_ARGS <<<"${INSPECT_OPTIONS:-}"
mkdir -p "$REPORTS"

log() { echo "pipeline: $*" >&2; }

# check STEP CODE: stop the pipeline unless CODE is 0, saying what the code means for this run.
check() {
  case $2 in
    0) log "$1: ok" ;;
    2) log "$1: bad arguments or inputs (exit 2); fix them and rerun: nothing was written"; exit 2 ;;
    130) log "$1: interrupted (exit 130); rerun this script to continue"; exit 130 ;;
    *) log "$1: failed (exit $2)"; exit "$2" ;;
  esac
}

# 1. inspect: spectra and overlaps of the task updates; writes no model. Its ranks are advisory (the config's
#    ranks decide), so only a refused input (2) or an interruption stops the pipeline here.
"${SMILE_CMD[@]}" inspect "$BASE" --experts "$EXPERTS" "${INSPECT_ARGS[@]}" --json >"$REPORTS/inspect.json"
code=$?
[ "$code" = 1 ] && { log "inspect: failed (exit 1), continuing: the dry run validates the inputs"; code=0; }
check inspect "$code"

# 2. dry run: every input validated, the plan printed; nothing written.
"${SMILE_CMD[@]}" upscale --base "$BASE" --experts "$EXPERTS" --out "$OUT" "$@" --dry-run >"$REPORTS/plan.txt"
check "dry run" $?

# 3. upscale, resuming an interrupted run (its staging folder is kept beside OUT); a failure (exit 1: disk full,
#    a killed process...) is retried with --resume, which keeps the shards already written.
staging="$(dirname "$OUT")/.$(basename "$OUT").smile-staging"
attempt=0
while :; do
  resume=()
  [ -d "$staging" ] && resume=(--resume)
  "${SMILE_CMD[@]}" upscale --base "$BASE" --experts "$EXPERTS" --out "$OUT" "$@" "${resume[@]}" --json \
    >"$REPORTS/summary.json"
  code=$?
  [ "$code" = 1 ] && [ "$attempt" -lt "$RETRIES" ] || break
  attempt=$((attempt + 1))
  log "upscale: failed (exit 1); retrying with --resume ($attempt of $RETRIES)"
done
check upscale "$code"

# 4. verify: files, checksums, config, modeling code and a forward pass; any finding fails the pipeline.
"${SMILE_CMD[@]}" verify "$OUT" --json >"$REPORTS/verify.json"
code=$?
[ "$code" = 1 ] && { log "verify: $OUT failed verification (see $REPORTS/verify.json)"; exit 1; }
check verify "$code"

# 5. route: which expert each layer picks for each prompt's tokens.
if [ -n "${PROMPTS:-}" ]; then
  args=()
  while IFS= read -r prompt; do [ -n "$prompt" ] && args+=(--prompt "$prompt"); done <<<"$PROMPTS"
  "${SMILE_CMD[@]}" route "$OUT" "${args[@]}" --json >"$REPORTS/route.json"
  check route $?
fi
log "done: $OUT (reports in $REPORTS)"
echo "$OUT"
