#!/usr/bin/env bash
#SBATCH --job-name=smile-part
#SBATCH --cpus-per-task=4
#SBATCH --mem=8G
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
# A SMILE build as a Slurm job array: part i of N writes its shards (`smile upscale --shard i/N --resume`), and a
# job that depends on the whole array (afterok) runs `smile assemble`. Every part reads the inputs and writes into
# the same staging folder beside OUT, so OUT's folder must be on storage every node sees.
#
#   CONFIG=configs/budgeted-ranks.yaml OUT=/shared/mistral-smile PARTS=4 scripts/slurm_array.sh
#
# Run on a login node (no SLURM_ARRAY_TASK_ID), it submits the array and the dependent assemble job with sbatch and
# prints their job ids. Inside the array (SLURM_ARRAY_TASK_ID set) it runs part SLURM_ARRAY_TASK_ID; with the
# argument `assemble` it runs the assembly. --resume makes a requeued or resubmitted part keep the shards it had
# completed; a part that finds nothing to resume starts from scratch.
# Environment (exported to the jobs):
#   CONFIG   a `smile upscale` config file (base, experts, ranks, ...)                       (required)
#   OUT      output folder                                                                   (required)
#   PARTS    number of parts N = array size (default: 4; use --max-shard-size so that there are >= N shards)
#   SMILE    the smile command (default: smile)
# Extra arguments are `smile upscale` options for every part (they override the config file).
set -euo pipefail

: "${CONFIG:?set CONFIG to a smile upscale config file}" "${OUT:?set OUT to the output folder}"
PARTS=${PARTS:-4}
read -r -a SMILE_CMD <<<"${SMILE:-smile}"
export CONFIG OUT PARTS SMILE="${SMILE:-smile}"

if [ "${1:-}" = assemble ]; then
  exec "${SMILE_CMD[@]}" assemble "$OUT"
fi

if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
  part=$((SLURM_ARRAY_TASK_ID - ${SLURM_ARRAY_TASK_MIN:-0}))
  exec "${SMILE_CMD[@]}" upscale --config "$CONFIG" --out "$OUT" "$@" --shard "$part/$PARTS" --resume
fi

# Login node: submit the array, then the assembly once every part has succeeded.
script=$(realpath "$0")
array=$(sbatch --parsable --export=ALL --array="0-$((PARTS - 1))" "$script" "$@")
array=${array%%;*}  # --parsable prints "jobid[;cluster]"
assemble=$(sbatch --parsable --export=ALL --job-name=smile-assemble --dependency="afterok:$array" \
  --cpus-per-task=1 "$script" assemble)
echo "submitted: parts $array (array 0-$((PARTS - 1))), assemble ${assemble%%;*} (after all parts succeed)"
