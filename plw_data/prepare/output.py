"""The life of an output DIR written by `prepare` or `merge`: claim it, build in DIR/.plw-tmp, install.

Crash safety: everything is built in ``DIR/.plw-tmp`` and moved into place at the end; manifest.json
is written last, so a DIR with a manifest is complete, and one holding ``.plw-tmp`` without a
manifest is an interrupted run, rebuilt from scratch by the next one.
"""

from __future__ import annotations

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


def check_target(output: Path, *, overwrite: bool) -> None:
    """Refuse an output that exists, is not empty and is not a plw-data DIR (unless --overwrite)."""
    if output.exists() and not output.is_dir():
        raise ConfigError(f"{output}: exists and is not a directory")
    ours = (output / S.MANIFEST).exists() or (output / S.TMP_NAME).is_dir()
    if output.exists() and any(output.iterdir()) and not (overwrite or ours):
        raise ConfigError(f"{output}: exists, is not empty and is not a plw-data directory; use --overwrite")


def begin(output: Path) -> Path:
    """A fresh, empty work folder inside ``output``."""
    work = output / S.TMP_NAME
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work


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
