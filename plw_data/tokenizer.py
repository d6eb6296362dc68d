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


#: tokenizer_config.json classes that AutoTokenizer loads as the generic Rust-backed tokenizer
_GENERIC_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")


def generic_tokenizer_folder(path: Path) -> bool:
    """Whether AutoTokenizer would load ``path`` as the generic Rust-backed tokenizer, decided by the
    folder's own files: a tokenizer.json, a tokenizer_config.json naming the generic class and no
    custom code, and no config.json (a model type can choose another class). Such a folder loads
    through that class directly, without importing AutoTokenizer, whose import pulls in torch: 1.3 s
    of every ``prepare`` process and of each ``--num-proc`` worker, for a module prepare never uses."""
    import json

    if not (path / "tokenizer.json").is_file() or (path / "config.json").exists():
        return False
    try:
        config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("tokenizer_class") in _GENERIC_CLASSES and "auto_map" not in config


def load_tokenizer(spec: str, *, trust_remote_code: bool = False, fast: bool = True) -> Any:
    """A tokenizer from a folder, a hub name or a .gguf file; one ConfigError line when none loads.

    ``fast``: require the Rust backend (prepare needs it: masks use its char offsets)."""
    path = Path(spec)
    where, gguf = gguf_location(spec)
    try:
        if gguf:
            if not path.is_file():
                raise ConfigError(f"{spec}: tokenizer .gguf file not found")
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(where, gguf_file=gguf)
        elif path.exists() or spec.startswith((".", "/", "~")):
            if not path.is_dir():
                raise ConfigError(f"{spec}: tokenizer folder not found")
            if generic_tokenizer_folder(path):
                from transformers import PreTrainedTokenizerFast  # the class AutoTokenizer picks for it

                tok = PreTrainedTokenizerFast.from_pretrained(str(path))
            else:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        else:
            from transformers import AutoTokenizer

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


def read_chat_template(source: str) -> str:
    """A chat template from a .jinja file, or from a tokenizer folder (chat_template.jinja, or the
    chat_template key of tokenizer_config.json; a named list uses its "default" entry)."""
    import json

    p = Path(source)
    if p.is_file():
        return p.read_text(encoding="utf-8")
    if not p.is_dir():
        raise ConfigError(f"{source}: chat template file or folder not found")
    if (p / "chat_template.jinja").is_file():
        return (p / "chat_template.jinja").read_text(encoding="utf-8")
    try:
        template = json.loads((p / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError) as e:
        raise ConfigError(f"{source}: no chat_template.jinja and no readable tokenizer_config.json ({e})") from None
    if isinstance(template, list):
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
    if not isinstance(template, str):
        raise ConfigError(f"{source}: the folder holds no chat template")
    return template


def with_chat_template(tok: Any, source: str | None) -> Any:
    """``tok``, or a shallow copy of it whose chat template is read from ``source`` (the caller's
    tokenizer is left as it was); fingerprint the result to cover the template actually used."""
    if source is None:
        return tok
    import copy

    tok = copy.copy(tok)
    tok.chat_template = read_chat_template(source)
    return tok
