"""Training throughput, packed vs padded rows: real (non-padding) tokens per second through plw-train.

The same Alpaca examples (short and of varied length, where padding wastes most) are prepared twice
with recipes/alpaca.yaml and the SmolLM2 tokenizer: `--pack` (rows of up to --max-length tokens,
several examples each) and `--no-pack` (one example per row; the collator pads each micro-batch to
its longest row). One epoch of each runs through the real trainer (DeepSpeed ZeRO 0, one rank, fp32,
LoRA) with micro-batches of about the same number of real tokens, on a small random Llama and on
SmolLM2-135M. Seconds per epoch are estimated from the updates after the first (which pays one-time
costs): (t_last - t_first) * n / (n - 1).

    python analysis/benchmarks/bench_layout.py [--examples 256] [--models tiny smollm2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
TOKENIZER = DATA / "tokenizers" / "smollm2-135m-instruct"
GGUF = REPO / ".cache" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def prepare(out: Path, examples: int, max_length: int, pack: bool) -> tuple[Path, dict]:
    from plw_data.config import DataConfig, build_config, load_recipe
    from plw_data.prepare.pipeline import prepare as run

    raw = out / "alpaca.json"
    if not raw.exists():
        rows = json.loads((DATA / "alpaca" / "alpaca_data_first5000.json").read_text())[:examples]
        raw.write_text(json.dumps(rows))
    over = {"tokenizer": str(TOKENIZER), "max_length": max_length, "pack": pack}
    cfg = build_config(DataConfig, load_recipe(REPO / "recipes" / "alpaca.yaml"), over)
    folder = out / ("packed" if pack else "padded")
    manifest = run([str(raw)], cfg, folder, progress=False)
    return folder, manifest["splits"]["train"]


def tiny_llama(out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab = len(AutoTokenizer.from_pretrained(str(TOKENIZER)))
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(str(out))
    return out


def epoch(model: Path, data: Path, split: dict, micro_batch: int, tmp: Path, name: str) -> dict:
    from plw_data.train import train
    from plw_data.train.config import TrainConfig

    cfg = TrainConfig(model=str(model), data=str(data), output=str(tmp / f"run-{name}"), dtype="fp32",
                      micro_batch_size=micro_batch, num_epochs=1, progress=False, overwrite=True, tokenizer=str(TOKENIZER))  # fmt: skip
    cfg.validate()
    times = [e["elapsed_s"] for e in train(cfg) if "train_loss" in e]
    n = len(times)
    seconds = (times[-1] - times[0]) * n / (n - 1) if n > 1 else times[0]
    return {"rows": split["rows"], "micro_batch_size": micro_batch, "updates": n, "real_tokens": split["tokens"],
            "epoch_seconds": round(seconds, 2), "real_tokens_per_s": round(split["tokens"] / seconds, 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=256)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not TOKENIZER.is_dir():
        print(f"skipped: {TOKENIZER} is absent", file=sys.stderr)
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-layout-") as t:
        tmp = Path(t)
        packed, p_split = prepare(tmp, a.examples, a.max_length, pack=True)
        padded, u_split = prepare(tmp, a.examples, a.max_length, pack=False)
        # about the same real tokens per micro-batch: one packed row vs as many examples as fill one
        per_example = u_split["tokens"] / u_split["rows"]
        padded_batch = max(1, round(a.max_length / per_example))
        for name in a.models:
            if name == "smollm2" and not GGUF.is_file():
                print(f"skipped smollm2: {GGUF} absent (run scripts/setup.sh)", file=sys.stderr)
                continue
            model = tiny_llama(tmp / "tiny") if name == "tiny" else GGUF
            r = {"model": name, "packed": epoch(model, packed, p_split, 1, tmp, f"{name}-packed"),
                 "padded": epoch(model, padded, u_split, padded_batch, tmp, f"{name}-padded")}  # fmt: skip
            r["speedup"] = round(r["packed"]["real_tokens_per_s"] / r["padded"]["real_tokens_per_s"], 2)
            print(json.dumps(r), flush=True)
            results.append(r)
    if a.json:
        meta = {"examples": a.examples, "max_length": a.max_length, "dataset": "alpaca first rows", "dtype": "fp32",
                "cpu_count": os.cpu_count()}  # fmt: skip
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"benchmark": "layout", "meta": meta, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
