#!/usr/bin/env bash
# Set up (idempotent) and run the test suite. Real data is read from ../shared/data when present.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q "$@"
