"""The data side of a run: prepared splits, micro-batches, and the tokenizer's closing tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .. import schema as S
from ..errors import ConfigError, PLWError
from .config import TrainConfig

def verify_data(cfg: TrainConfig) -> None:
    """Refuse data `plw-data verify` would refuse (docs/guarantees.md): the DIR behind --data
    and behind --eval-data, cheaply (no row pass; sha256 unless --no-verify-data). A tampered shard,
    a missing manifest or a DIR killed mid-install stops the run before any training."""
    from ..prepare.verify import verify_quick

    dirs = [Path(cfg.data)]
    if cfg.eval_data:
        dirs.append(Path(cfg.eval_data).parent)
    for d in dict.fromkeys(dirs):
        verify_quick(d, checksums=cfg.verify_data)


def load_split(path: Path, what: str):
    from datasets import load_from_disk

    if not path.is_dir():
        raise ConfigError(f"{path}: {what} split not found (expected a folder from plw-data prepare)")
    try:
        ds = load_from_disk(str(path))
    except Exception as e:  # datasets raises several types for a foreign folder
        raise ConfigError(f"{path}: cannot load the {what} split: {e}") from None
    missing = set(S.COLUMNS) - set(ds.column_names)
    if missing:
        raise ConfigError(f"{path}: the {what} split lacks field(s) {', '.join(sorted(missing))}")
    if len(ds) == 0:
        raise ConfigError(f"{path}: the {what} split is empty")
    return ds


def eval_path(cfg: TrainConfig) -> Path | None:
    if cfg.eval_data:
        return Path(cfg.eval_data)
    default = Path(cfg.data) / "eval"
    return default if default.is_dir() else None


def collate_rows(collate, dataset, indices: np.ndarray, fallback: int):
    """Collate ``indices`` of ``dataset``; an empty slot becomes one row with every target removed."""
    if len(indices):
        return collate(dataset[[int(i) for i in indices]])
    batch = collate(dataset[[fallback]])
    batch["labels"].fill_(S.IGNORE_INDEX)
    batch["loss_weights"].zero_()
    return batch


def target_weight(batch) -> float:
    w = batch["loss_weights"][:, 1:].double() * (batch["labels"][:, 1:] != S.IGNORE_INDEX)
    return float(w.sum())


def model_kwargs(batch, device, *, with_weights: bool) -> dict[str, Any]:
    keys = ["input_ids", "position_ids", "labels", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"]
    if with_weights:
        keys.append("loss_weights")
    return {k: batch[k].to(device) if hasattr(batch[k], "to") else batch[k] for k in keys if k in batch}


# --------------------------------------------------------------------------- special tokens


def closing_ids(model_config, tok) -> list[int]:
    """EOS ids of the model (config, generation config) and the special ids of ``tok`` (may be None)."""
    ids: set[int] = set()
    for src in (model_config, getattr(model_config, "generation_config", None)):
        eos = getattr(src, "eos_token_id", None)
        ids.update([eos] if isinstance(eos, int) else list(eos or []))
    if tok is not None:
        ids.update(int(i) for i in tok.all_special_ids)
        if tok.eos_token_id is not None:
            ids.add(int(tok.eos_token_id))
    return sorted(ids)


def _tokenizer_source(cfg: TrainConfig) -> str:
    """--tokenizer, else the prepared data's tokenizer (manifest) when local, else the model's."""
    if cfg.tokenizer:
        return cfg.tokenizer
    try:
        name = S.read_manifest(cfg.data)["tokenizer"]["name_or_path"]
    except (PLWError, KeyError, TypeError):
        name = None
    return name if isinstance(name, str) and Path(name).exists() else str(cfg.model)


def run_tokenizer(cfg: TrainConfig):
    """The run's tokenizer (see ``--tokenizer``), or None when none loads."""
    from ..tokenizer import load_tokenizer

    try:
        return load_tokenizer(_tokenizer_source(cfg), fast=False)
    except PLWError:
        if cfg.tokenizer:
            raise ConfigError(f"--tokenizer {cfg.tokenizer}: cannot load a tokenizer") from None
        return None


def tokenizer_files(tok) -> dict[str, bytes]:
    """The files ``tok.save_pretrained`` writes, as bytes: each checkpoint gets them without the
    tokenizer itself (46 MB of live memory for SmolLM2's, more for larger vocabularies) staying
    alive through training."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def eval_sources(eval_dir: Path) -> tuple[list[str], np.ndarray] | None:
    """Source names and example_index bounds of the DIR an eval split belongs to (None: no mixture)."""
    from ..prepare.mixture import source_ranges

    manifest = Path(eval_dir).parent / S.MANIFEST
    return source_ranges(S.read_manifest(manifest.parent)) if manifest.is_file() else None
