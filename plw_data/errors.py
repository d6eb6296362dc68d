"""Errors that reach the user as one clear line (file, row, field) and a non-zero exit."""

from __future__ import annotations


class PLWError(Exception):
    """Base class: the CLI prints str(e) on one line and exits 2."""


class ConfigError(PLWError):
    """A bad option, recipe key or missing file."""


class RowError(PLWError):
    """A bad input row; `reason` is the drop reason recorded in dropped.jsonl."""

    def __init__(self, reason: str, detail: str, *, field: str | None = None):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.field = field

    def __reduce__(self):
        # Workers of `prepare --num-proc N` send RowErrors to the parent; the default exception
        # pickling replays only args=(detail,) and would fail to rebuild, hanging the pool.
        return (type(self), (self.reason, self.detail), {"field": self.field})

    def located(self, file: str, row: int | str) -> str:
        """``row``: a 0-based row, or how to name it (`prepare.sources.row_label`: "line N")."""
        where = f"{file}: {row if isinstance(row, str) else f'row {row}'}"
        if self.field:
            where += f", field {self.field!r}"
        return f"{where}: {self.reason}: {self.detail}"
