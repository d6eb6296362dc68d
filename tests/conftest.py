"""Shared fixtures: real data and tokenizers come from ../shared/data and are never copied here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CHAT_TOKENIZERS = [
    "llama-2-chat",
    "llama-3-instruct",
    "mistral-7b-instruct-v0.1",
    "qwen2.5-instruct",
    "phi-3-mini-instruct",
    "smollm2-135m-instruct",
]


def require_shared(rel: str) -> Path:
    """Path under ../shared/data, or skip: the data is licensed for reading, never for committing."""
    path = SHARED_DATA / rel
    if not path.exists():
        pytest.skip(f"real data {path} is absent (tests read it from ../shared/data)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return require_shared("")


def tokenizer_dir(name: str) -> Path:
    return require_shared(f"tokenizers/{name}")


_TOKENIZERS: dict[str, object] = {}


def load_tokenizer(name: str):
    """Session-cached real tokenizer from ../shared/data/tokenizers/NAME."""
    if name not in _TOKENIZERS:
        from transformers import AutoTokenizer

        _TOKENIZERS[name] = AutoTokenizer.from_pretrained(str(tokenizer_dir(name)))
    return _TOKENIZERS[name]


# -- shared fixtures: a tiny random Llama and a prepared directory built by `prepare` itself ---------

SMOL = "smollm2-135m-instruct"
SMOL_VOCAB = 49152  # len(SmolLM2's tokenizer): the tiny model needs no shared data to be built


def tiny_llama_config(**overrides):
    """The tests' tiny Llama: 2 layers of width 64 over the SmolLM2 vocabulary, tied embeddings."""
    from transformers import LlamaConfig

    base = {
        "vocab_size": SMOL_VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,  # as SmolLM2
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    return LlamaConfig(**{**base, **overrides})


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A folder holding the tiny Llama with random weights (seed 0), loadable with from_pretrained."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(str(out))
    return out


def race_rows(n: int, *, words: int = 30, split: str = "dev") -> list[dict]:
    """The first ``n`` RACE questions of ``split``, articles cut to ``words`` words (keeps rows short)."""
    import gzip
    import json

    rows = []
    with gzip.open(require_shared(f"race/{split}.jsonl.gz"), "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            row["article"] = " ".join(row["article"].split()[:words])
            rows.append(row)
            if len(rows) == n:
                break
    return rows


RACE_TRAIN_ROWS, RACE_EVAL_ROWS = 24, 6


@pytest.fixture(scope="session")
def race_dir(tmp_path_factory) -> Path:
    """A DIR made by `prepare` from real RACE dev questions with the SmolLM2 tokenizer and chat template:
    24 train questions (articles cut to 20 words) packed two per row into 12 rows of at most 256 tokens,
    6 eval questions (--eval-input) in 3 rows; the answer letter + <|im_end|> is the completion."""
    import json

    from plw_data.config import DataConfig
    from plw_data.prepare.pipeline import prepare

    work = tmp_path_factory.mktemp("race")
    rows = race_rows(RACE_TRAIN_ROWS + RACE_EVAL_ROWS, words=20)
    for name, part in (("train", rows[:RACE_TRAIN_ROWS]), ("eval", rows[RACE_TRAIN_ROWS:])):
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    cfg = DataConfig(
        tokenizer=str(tokenizer_dir(SMOL)),
        prompt_template="{article}\n\nQuestion: {question}\n{options}\nAnswer with the letter.",
        completion_template="{answer}",
        max_length=256,
        eval_input=[str(work / "eval.jsonl")],
    )
    cfg.validate()
    prepare([str(work / "train.jsonl")], cfg, work / "prepared", progress=False)
    return work / "prepared"
