"""The life of an output DIR written by `prepare` or `merge`: claim it, build in DIR/.plw-tmp, install.

Crash safety: everything is built in ``DIR/.plw-tmp`` and moved into place at the end; manifest.json
is written last, so a DIR with a manifest is complete, and one holding ``.plw-tmp`` without a
manifest is an interrupted run, rebuilt from scratch by the next one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from .. import schema as S
from ..errors import ConfigError

#: What `prepare`/`merge` write at the top of a DIR (besides the split folders).
OWN_FILES = (S.MANIFEST, S.DROPPED, S.RUN, S.DATASET_DICT)


def is_interrupted(output: Path) -> bool:
    return (output / S.TMP_NAME).is_dir() and not (output / S.MANIFEST).exists()


def is_ours(output: Path) -> bool:
    """Whether ``output`` was written by `prepare`/`merge`: it holds our staging folder, or a manifest
    with a format_version whose created_by names plw-data. Only such a DIR may be replaced."""
    if (output / S.TMP_NAME).is_dir() or (output / S.SLICES_NAME).is_dir():
        return True
    try:
        m = json.loads((output / S.MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(m, dict) and "format_version" in m and str(m.get("created_by", "")).startswith("plw-data")


def _listing(output: Path, limit: int = 5) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in output.iterdir())
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_target(output: Path, *, overwrite: bool) -> None:
    """Refuse an output that is a file, lies under a file, or exists, is not empty and was not written
    by plw-data (whatever ``overwrite`` says: no command deletes a file it did not write)."""
    for path in (output, *output.parents):
        if path.exists() and not path.is_dir():
            raise ConfigError(f"--output {output}: {path} is a file, not a directory")
    if not output.exists():
        return
    try:
        empty = not any(output.iterdir())
    except OSError as e:
        raise ConfigError(f"--output {output}: cannot read the directory: {e.strerror or e}") from None
    if empty or is_ours(output):
        return
    raise ConfigError(
        f"--output {output}: not a plw-data directory (no plw-data {S.MANIFEST}) and not empty: it holds "
        f"{_listing(output)}; {'--overwrite only replaces a plw-data directory; ' if overwrite else ''}"
        "choose a new or empty directory"
    )


def begin(output: Path) -> Path:
    """A fresh, empty work folder inside ``output``."""
    work = output / S.TMP_NAME
    try:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    except OSError as e:
        raise ConfigError(f"--output {output}: cannot write there: {e.strerror or e}") from None
    return work


def discard(work: Path, output: Path, *, remove_output: bool) -> None:
    """After a failed run (a PLWError): remove the work folder it made, and ``output`` when this run
    created it and it is empty again. A killed run cannot get here; its ``work`` marks the DIR as
    interrupted and the next run rebuilds it."""
    shutil.rmtree(work, ignore_errors=True)
    if remove_output:
        try:
            output.rmdir()  # only when empty
        except OSError:
            pass


def install(work: Path, output: Path, manifest: dict[str, Any], run: dict[str, Any] | None = None) -> None:
    """Move the finished splits into place, then run.json, then the manifest; remove ``work`` last."""
    stale = output / S.MANIFEST
    if stale.exists():
        stale.unlink()  # from here on the DIR is incomplete until the new manifest lands
    for name in ("train", "eval", *OWN_FILES):  # an earlier run's splits and files
        target = output / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    for item in work.iterdir():
        os.replace(item, output / item.name)
    if run is not None:
        S.write_json(output / S.RUN, run)
    S.write_json(output / S.DATASET_DICT, {"splits": list(manifest["splits"])})
    S.write_json(output / S.MANIFEST, manifest)
    work.rmdir()  # only now: until the manifest lands, TMP_NAME marks DIR as an interrupted run
