"""Bounds on the work one row can cause: a chat template's rendering time and output size.

A chat template is code (Jinja) shipped with a tokenizer: a loop nest or a ``'x' * 10**10`` in it
would hang or exhaust memory on one row. :func:`render_chat_template` renders one conversation under
a wall-clock limit (a SIGALRM timer; only in the main thread, where `prepare` and `rg-stats` render)
and an output-size limit (checked while Jinja produces the text, and on ``*``/``**`` before the
operation runs); beyond either the row is dropped as ``template_error`` (docs/guarantees.md).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterable
from typing import Any

from jinja2.sandbox import SandboxedEnvironment

from ..config import DataConfig
from ..errors import RowError

#: Seconds one conversation may take to render (normal rendering takes well under a millisecond).
TEMPLATE_SECONDS = 5.0

_budget = threading.local()  # .max_chars and .deadline while a limited render runs in this thread


class _LimitExceeded(Exception):
    pass


def _over(chars: int) -> None:
    limit = getattr(_budget, "max_chars", None)
    if limit is not None and chars > limit:
        raise _LimitExceeded(f"renders over {limit:,} characters")
    deadline = getattr(_budget, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise _LimitExceeded(f"took over {TEMPLATE_SECONDS:g}s to render")


def _bounded_concat(pieces: Iterable[str]) -> str:
    out, size = [], 0
    for piece in pieces:
        size += len(piece)
        _over(size)
        out.append(piece)
    return "".join(out)


def _bounded_binop(self: SandboxedEnvironment, context: Any, operator: str, left: Any, right: Any) -> Any:
    if operator == "*" and isinstance(right, int) and hasattr(left, "__len__"):
        _over(len(left) * right)
    elif operator == "*" and isinstance(left, int) and hasattr(right, "__len__"):
        _over(len(right) * left)
    elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
        _over(int(right * abs(left).bit_length() / 3.3))  # decimal digits of the result
    return self.binop_table[operator](left, right)


# Every sandboxed Jinja environment (transformers renders chat templates in one) gets the checks;
# outside a limited render `_over` does nothing, so results are unchanged.
SandboxedEnvironment.concat = staticmethod(_bounded_concat)  # type: ignore[assignment]
SandboxedEnvironment.intercepted_binops = frozenset({"*", "**"})
SandboxedEnvironment.call_binop = _bounded_binop  # type: ignore[method-assign]


def _on_alarm(signum: int, frame: Any) -> None:
    if getattr(_budget, "deadline", None) is not None:
        raise _LimitExceeded(f"took over {TEMPLATE_SECONDS:g}s to render")


def render_chat_template(tok: Any, messages: list[dict[str, Any]], cfg: DataConfig, **kwargs: Any) -> str:
    """``tok.apply_chat_template(messages, tokenize=False, **kwargs)`` under the time and size limits;
    a RowError("template_error") beyond them. Output limit: twice the contents plus the row-size limit."""
    content = sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str))
    _budget.max_chars = 2 * content + cfg.field_chars_limit()
    _budget.deadline = time.monotonic() + TEMPLATE_SECONDS
    timer = threading.current_thread() is threading.main_thread()
    if timer:
        previous = signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, TEMPLATE_SECONDS)
    try:
        return tok.apply_chat_template(messages, tokenize=False, **kwargs)
    except _LimitExceeded as e:
        raise RowError("template_error", f"the chat template {e}") from None
    finally:
        _budget.max_chars = _budget.deadline = None
        if timer:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
