#!/usr/bin/env bash
# Prepare one dataset over a SLURM job array: task i prepares slice i of K, a dependent job merges them.
#
#   sbatch --array=0-7 recipes/slurm-prepare.sh train.jsonl.gz runs/race-l3 --recipe recipes/race.yaml \
#       --tokenizer ../shared/data/tokenizers/llama-3-instruct
#   # when every task has finished (or: sbatch --dependency=afterok:<array job id> with MERGE=1):
#   MERGE=1 K=8 bash recipes/slurm-prepare.sh train.jsonl.gz runs/race-l3
#
# INPUT, OUTPUT, the tokenizer and the recipe must be on a filesystem every node sees. K defaults to
# the array's size. A failed task is simply resubmitted (sbatch --array=<i> ...): a slice that
# already finished with the same options is skipped, an interrupted one is rebuilt. See docs/ray.md.
#SBATCH --job-name=plw-prepare
#SBATCH --cpus-per-task=4
#SBATCH --mem=16G
#SBATCH --time=02:00:00
set -euo pipefail
INPUT=$1
OUTPUT=$2
shift 2
K=${K:-${SLURM_ARRAY_TASK_COUNT:?run with sbatch --array=0-(K-1), or set K}}
if [[ ${MERGE:-0} == 1 ]]; then
    parts=()
    for ((i = 0; i < K; i++)); do parts+=("$OUTPUT.slices/$i"); done
    plw-data merge "${parts[@]}" --output "$OUTPUT"
    plw-data verify "$OUTPUT"
    exit
fi
I=${SLURM_ARRAY_TASK_ID:?not a SLURM array task}
plw-data prepare "$INPUT" --output "$OUTPUT.slices/$I" --num-shards "$K" --shard-index "$I" \
    --num-proc "${SLURM_CPUS_PER_TASK:-1}" --quiet "$@"
