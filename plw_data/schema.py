"""The prepared-directory format, in one place: what `prepare`/`merge` write and everything else reads.

docs/format.md describes it for users; this module is its executable form. Every reader and
writer takes column names, Arrow types, category codes, manifest keys and file names from here.

A prepared DIR::

    DIR/manifest.json          written last: a DIR with a manifest is complete
    DIR/dropped.jsonl          one line per input row not kept
    DIR/run.json               timings of the run (not part of the identity of the data)
    DIR/<split>/               Arrow IPC stream shards + state.json + dataset_info.json
                               (`datasets.load_from_disk(DIR/<split>)`)

One packed row (``seq_lengths`` [5, 3]: two examples, P prompt, C completion, T template)::

    input_ids        t  p  p  t  c  |  t  p  c
    template_mask    1  0  0  1  0  |  1  0  0
    prompt_mask      0  1  1  0  0  |  0  1  0
    completion_mask  0  0  0  0  1  |  0  0  1
    example_index    [   17         ,   4     ]   one entry per example: its input row
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

FORMAT_VERSION = 1

# -- categories: every token has exactly one ------------------------------------------------
TEMPLATE, PROMPT, COMPLETION = 0, 1, 2
CATEGORY_NAMES = ("template", "prompt", "completion")  # indexed by code
#: Encoder/staging code of a completion token inside an assistant turn's reasoning. On disk it is a
#: completion token (completion_mask 1) that also has reasoning_mask 1.
REASONING = 3
IGNORE_INDEX = -100  # label of a token that is not a target (transformers' convention)

# -- columns ----------------------------------------------------------------------------------
INPUT_IDS = "input_ids"
TEMPLATE_MASK, PROMPT_MASK, COMPLETION_MASK = "template_mask", "prompt_mask", "completion_mask"
MASK_COLUMNS = (TEMPLATE_MASK, PROMPT_MASK, COMPLETION_MASK)  # indexed by category code
SEQ_LENGTHS = "seq_lengths"
EXAMPLE_INDEX = "example_index"

#: Every row's columns, in file order: name -> Arrow value type of its list.
COLUMNS: dict[str, pa.DataType] = {
    INPUT_IDS: pa.int32(),
    PROMPT_MASK: pa.uint8(),
    COMPLETION_MASK: pa.uint8(),
    TEMPLATE_MASK: pa.uint8(),
    SEQ_LENGTHS: pa.int32(),
    EXAMPLE_INDEX: pa.int64(),
}
SCHEMA = pa.schema([(name, pa.list_(t)) for name, t in COLUMNS.items()])

#: Optional columns, after the required ones in this order when present. A DIR has one of them only
#: when some example needs it, so older directories (and data without reasoning, per-message weights
#: or sources) are unchanged.
REASONING_MASK = "reasoning_mask"  # per token, uint8: 1 on reasoning tokens (a subset of completion)
MESSAGE_WEIGHT = "message_weight"  # per token, float32 multiplier from a message's "weight"; null row = all 1
SOURCE_INDEX = "source_index"  # per example, int16: the example's source in manifest["sources"] order
OPTIONAL_COLUMNS: dict[str, pa.DataType] = {
    REASONING_MASK: pa.uint8(),
    MESSAGE_WEIGHT: pa.float32(),
    SOURCE_INDEX: pa.int16(),
}
#: Columns with one value per token (the rest have one per example, aligned with seq_lengths).
TOKEN_COLUMNS = (INPUT_IDS, PROMPT_MASK, COMPLETION_MASK, TEMPLATE_MASK, REASONING_MASK, MESSAGE_WEIGHT)


def schema_with(optional: list[str] | tuple[str, ...] = ()) -> pa.Schema:
    """The Arrow schema of a split holding the required columns plus ``optional`` ones."""
    extra = [(name, pa.list_(t)) for name, t in OPTIONAL_COLUMNS.items() if name in optional]
    return pa.schema([*SCHEMA, *extra])

# -- files ------------------------------------------------------------------------------------
MANIFEST = "manifest.json"
DROPPED = "dropped.jsonl"
RUN = "run.json"
TMP_NAME = ".plw-tmp"  # a DIR holding it is a prepare/merge that did not finish
SLICES_NAME = ".plw-slices"  # the slices of a prepare --ray run, before they are merged (docs/ray.md)
STATE = "state.json"
DATASET_INFO = "dataset_info.json"
#: ``{"splits": [...]}`` at the top of DIR: ``datasets.load_from_disk(DIR)`` returns a DatasetDict of the splits.
DATASET_DICT = "dataset_dict.json"

# -- manifest keys (docs/format.md), per level --------------------------------------------------
TOP_KEYS = ("format_version", "created_by", "config", "tokenizer", "inputs", "counts", "splits")
TOKENIZER_KEYS = ("name_or_path", "sha256", "vocab_size", "chat_template_sha256")
INPUT_KEYS = ("path", "sha256", "rows")
COUNT_KEYS = ("input_rows", "kept", "dropped")
SPLIT_TOTALS = ("rows", "examples", "tokens", "prompt_tokens", "completion_tokens", "template_tokens")
SPLIT_KEYS = (*SPLIT_TOTALS, "max_length", "packed", "fill", "lower_bound_rows", "shards")
SHARD_KEYS = ("file", "rows", "bytes", "sha256")


def lower_bound_rows(total_tokens: int, max_length: int) -> int:
    """No packing of ``total_tokens`` into rows of ``max_length`` can use fewer rows than this."""
    return -(-int(total_tokens) // int(max_length))


def fill(tokens: int, rows: int, max_length: int) -> float:
    """Fraction of the rows' capacity holding tokens."""
    return tokens / (rows * max_length) if rows else 0.0


# -- files: checksums and atomic writes ---------------------------------------------------------


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_write(path: Path, data: bytes) -> None:
    """Write a small file atomically: temp name, fsync, rename."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    """The manifest's and run.json's layout: indented, newline-terminated, written atomically."""
    fsync_write(path, (json.dumps(obj, indent=2) + "\n").encode())


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The parsed manifest of a prepared DIR, unchecked (`prepare.verify.load_manifest` checks it)."""
    from .errors import PLWError

    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise PLWError(f"{path}: missing: not a prepared directory, or prepare did not finish")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PLWError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(m, dict):
        raise PLWError(f"{path}: expected a JSON object")
    return m


# -- split folders (datasets.load_from_disk layout) ------------------------------------------------


def features_json(optional: list[str] | tuple[str, ...] = ()) -> tuple[dict[str, Any], dict[bytes, bytes]]:
    """The `datasets` feature description of a split's schema (dataset_info.json and the Arrow schema
    metadata), in the installed version's own dialect. Written out for datasets >= 4 rather than
    imported: `import datasets` costs prepare about a second of CPU."""
    from importlib.metadata import version

    schema = schema_with(optional)
    if int(version("datasets").split(".")[0]) < 4:  # older dialects: ask the library
        import datasets

        features = datasets.Features({f.name: datasets.Sequence(datasets.Value(str(f.type.value_type))) for f in schema})
        return features.to_dict(), features.arrow_schema.metadata
    dtype = {"float": "float32", "double": "float64", "halffloat": "float16"}
    described = {
        f.name: {"feature": {"dtype": dtype.get(str(f.type.value_type), str(f.type.value_type)), "_type": "Value"}, "_type": "List"}
        for f in schema
    }
    return described, {b"huggingface": json.dumps({"info": {"features": described}}).encode()}


def shards_fingerprint(shards: list[dict[str, Any]]) -> str:
    return hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()[:16]


def write_split_metadata(folder: Path, shards: list[dict[str, Any]], features: dict[str, Any]) -> None:
    """state.json and dataset_info.json: what `datasets.load_from_disk` reads besides the shards."""
    state = {
        "_data_files": [{"filename": s["file"]} for s in shards],
        "_fingerprint": shards_fingerprint(shards),
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    info = {"citation": "", "description": "", "features": features, "homepage": "", "license": ""}
    fsync_write(folder / DATASET_INFO, json.dumps(info, indent=2).encode())
    fsync_write(folder / STATE, json.dumps(state, indent=2).encode())


def split_files(folder: Path) -> list[Path]:
    state = json.loads((folder / STATE).read_text())
    return [folder / f["filename"] for f in state["_data_files"]]


def iter_record_batches(folder: Path, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """Memory-mapped read of a split, batch by batch."""
    for path in split_files(folder):
        with pa.memory_map(str(path), "r") as source:
            for batch in pa.ipc.open_stream(source):
                yield batch.select(columns) if columns else batch


def flat_values(batch: pa.RecordBatch, name: str) -> np.ndarray:
    """All values of a list column of one record batch, concatenated."""
    return batch.column(name).flatten().to_numpy(zero_copy_only=False)


def categories(prompt_mask: np.ndarray, completion_mask: np.ndarray) -> np.ndarray:
    """Per-token category codes from the masks (template where neither is set)."""
    return (np.asarray(prompt_mask, np.int8) * PROMPT + np.asarray(completion_mask, np.int8) * COMPLETION).astype(np.int8)
