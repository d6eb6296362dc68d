"""Atomic checkpoint folders with a completion marker, so a partial or corrupt one is never used.

A checkpoint is written into a temporary sibling folder; when every file is in place a marker,
``CHECKPOINT_COMPLETE.json``, records the size and sha256 of each file, and the folder is swapped in
by renames (old → ``.NAME.old``, temp → NAME, old removed). A crash leaves either the previous
complete checkpoint, or (between the two renames) ``.NAME.old``, which :func:`resolve` falls back to.
:func:`verify` re-hashes every file on load, so truncation or bit rot is reported by file name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..errors import ConfigError, PLWError

MARKER = "CHECKPOINT_COMPLETE.json"
STATE = "trainer_state.json"


class CheckpointError(PLWError):
    """A checkpoint that is missing, incomplete or corrupt."""


def temp_dir(final: Path) -> Path:
    """A fresh, empty temporary folder next to ``final`` (a stale one from a crash is removed)."""
    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def seal(tmp: Path, state: dict[str, Any]) -> None:
    """Write ``trainer_state.json``, then the marker listing every file's size and sha256."""
    (tmp / STATE).write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
    files = {
        str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(tmp.rglob("*"))
        if p.is_file() and p.name != MARKER
    }
    marker = tmp / MARKER
    marker.write_text(json.dumps({"step": state.get("step"), "files": files}, indent=1), encoding="utf-8")
    _fsync(marker)


def publish(tmp: Path, final: Path) -> None:
    """Swap the sealed ``tmp`` in as ``final`` by renames."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def resolve(final: Path) -> Path:
    """``final``, or its ``.old`` twin when a crash hit between the two renames of :func:`publish`."""
    old = final.with_name(f".{final.name}.old")
    if not final.exists() and (old / MARKER).is_file():
        return old
    return final


def verify(path: Path) -> dict[str, Any]:
    """The trainer state of a complete, intact checkpoint; CheckpointError naming the problem otherwise."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: no checkpoint there (nothing to resume from)")
    marker = path / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{path}: incomplete checkpoint ({MARKER} missing; it was never finished)")
    try:
        files = json.loads(marker.read_text(encoding="utf-8"))["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / MARKER}: corrupt marker ({e})") from None
    for rel, meta in files.items():
        p = path / rel
        if not p.is_file():
            raise CheckpointError(f"{path}: corrupt checkpoint: file {rel} is missing")
        if p.stat().st_size != meta["bytes"]:
            size = p.stat().st_size
            raise CheckpointError(f"{path}: corrupt checkpoint: {rel} has {size} bytes, expected {meta['bytes']}")
        if _sha256(p) != meta["sha256"]:
            raise CheckpointError(f"{path}: corrupt checkpoint: {rel} does not match its sha256")
    try:
        return json.loads((path / STATE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / STATE}: unreadable trainer state ({e})") from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def claim_output(out: Path, *, resume: bool, overwrite: bool, is_main: bool) -> dict[str, Any]:
    """Make OUTPUT ready for a run; returns the trainer state to resume from ({} for a new run).

    A run already there is refused unless --resume (its checkpoint is verified now, before the model
    loads) or --overwrite (only the run's own files are removed). All ranks call this."""
    from .distributed import barrier

    busy = (out / "metrics.jsonl").exists() or (out / "last").exists()
    if busy and not (resume or overwrite):
        raise ConfigError(f"{out}: holds a run already; --resume continues it, --overwrite starts over")
    saved = verify(resolve(out / "last")) if resume else {}
    barrier()
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for name in ("metrics.jsonl", "metrics.png"):
                (out / name).unlink(missing_ok=True)
            for name in ("best", "last", "base", "merged"):
                shutil.rmtree(out / name, ignore_errors=True)
    barrier()
    return saved
