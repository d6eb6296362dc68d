"""Load a tokenizer from a folder, a hub name or a .gguf file, and fingerprint it."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from .errors import ConfigError


def gguf_location(spec: str) -> tuple[str, str | None]:
    """(folder or hub name, GGUF file name or None): transformers loads a .gguf as folder + gguf_file."""
    p = Path(spec)
    return (str(p.parent), p.name) if p.suffix == ".gguf" else (spec, None)


def load_tokenizer(spec: str, *, trust_remote_code: bool = False, fast: bool = True) -> Any:
    """A tokenizer from a folder, a hub name or a .gguf file; one ConfigError line when none loads.

    ``fast``: require the Rust backend (prepare needs it: masks use its char offsets)."""
    from transformers import AutoTokenizer

    path = Path(spec)
    where, gguf = gguf_location(spec)
    try:
        if gguf:
            if not path.is_file():
                raise ConfigError(f"{spec}: tokenizer .gguf file not found")
            tok = AutoTokenizer.from_pretrained(where, gguf_file=gguf)
        elif path.exists() or spec.startswith((".", "/", "~")):
            if not path.is_dir():
                raise ConfigError(f"{spec}: tokenizer folder not found")
            tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        else:
            tok = AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code)
    except ConfigError:
        raise
    except Exception as e:  # transformers raises many kinds; the user needs one line
        raise ConfigError(f"{spec}: cannot load tokenizer: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    if fast and getattr(tok, "backend_tokenizer", None) is None:
        raise ConfigError(f"{spec}: a fast (Rust-backed) tokenizer is required")
    return tok


def special_ids(tok: Any) -> set[int]:
    """Ids that count as special: candidates for the end-of-turn token that closes a turn."""
    ids = set(tok.all_special_ids)
    ids.update(i for i, t in tok.added_tokens_decoder.items() if t.special)
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    return ids


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenizer_fingerprint(tok: Any, spec: str) -> dict[str, Any]:
    """What identifies the ids a prepared directory holds: the backend's full JSON and the template."""
    template = tok.chat_template if isinstance(tok.chat_template, str) else None
    return {
        "name_or_path": spec,
        "sha256": _sha256(tok.backend_tokenizer.to_str()),
        "vocab_size": len(tok),
        "chat_template_sha256": _sha256(template) if template else None,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
    }
