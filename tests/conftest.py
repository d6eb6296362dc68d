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
