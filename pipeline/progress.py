"""Progress bars that stay readable when stderr is a log file rather than a terminal.

A terminal gets tqdm's live bar. Anywhere else (CI logs, ``halp lut build ... 2> build.log``,
a scheduler's capture) the bar's carriage-return redraws would pile up into one unreadable line,
so each refresh is written as its own line instead, at most every ``LOG_INTERVAL_S`` seconds.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

#: seconds between progress lines when stderr is not a terminal
LOG_INTERVAL_S = 30.0


class _Lines(io.TextIOBase):
    """A tqdm target that turns every redraw into one plain line on the current stderr."""

    def write(self, text: str) -> int:
        line = text.replace("\r", "").strip()
        if line:
            sys.stderr.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        sys.stderr.flush()


def progress(iterable: Iterable[Any] | None = None, *, disable: bool = False,
             **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)``: live on a terminal, one line per interval elsewhere."""
    if disable or sys.stderr.isatty():
        return tqdm(iterable, disable=disable, dynamic_ncols=True, **kwargs)
    return tqdm(iterable, file=_Lines(), mininterval=LOG_INTERVAL_S, ncols=100, ascii=True,
                **kwargs)
