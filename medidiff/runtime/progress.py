"""Progress that suits where it goes: a bar on a terminal, plain log lines elsewhere.

A tqdm bar redrawn ten times a second is right on a terminal and wrong in a cluster log:
hidden (tqdm's ``disable=None`` turns it off when the stream is not a TTY, so a
calibration prints nothing for minutes) or hundreds of carriage-return updates. A
:class:`Progress` draws the bar when its stream is a terminal and otherwise prints one
plain line every ``MEDIDIFF_LOG_EVERY`` seconds (default 30) and one when it finishes::

    scoring: 5/16 scans, 1m20s elapsed, ~2m56s left
    scoring: 16/16 scans in 4m02s

Example:
    >>> import io
    >>> log = io.StringIO()
    >>> with Progress(3, "demo", unit="scan", stream=log, every=0) as p:
    ...     for _ in range(3):
    ...         p.update()
    >>> log.getvalue().splitlines()[-1].startswith("demo: 3/3 scans in ")
    True
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any, TypeVar

__all__ = ["LOG_EVERY_ENV", "Progress", "format_seconds", "log_every", "progress_iter"]

T = TypeVar("T")

#: environment variable: seconds between plain progress lines (default 30; 0 = every update)
LOG_EVERY_ENV = "MEDIDIFF_LOG_EVERY"
_DEFAULT_EVERY = 30.0


def log_every() -> float:
    """Seconds between plain progress lines: ``$MEDIDIFF_LOG_EVERY``, else 30 (a value that
    is not a number >= 0 is ignored)."""
    raw = os.environ.get(LOG_EVERY_ENV, "")
    try:
        value = float(raw)
    except ValueError:
        return _DEFAULT_EVERY
    return value if value >= 0 else _DEFAULT_EVERY


def format_seconds(seconds: float) -> str:
    """``45s``, ``1m20s``, ``2h05m``."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """A progress report over ``total`` units of work.

    Args:
        total: units expected (``None``: unknown, lines then give the count only).
        desc: what is being done (``"scoring"``, ``"train"``).
        unit: the unit's name, singular (``"scan"``, ``"step"``); lines add an ``s``.
        enabled: ``False`` reports nothing (e.g. ranks other than 0).
        stream: where to write (default ``sys.stderr``).
        every: seconds between plain lines (default :func:`log_every`).
        initial: units already done (a resumed run).
        leave: on a terminal, keep the finished bar; elsewhere, print the final line.
            Inner, short-lived progress (one scan's slices) passes ``False``.
        bar: ``"auto"`` (a bar only on a terminal), ``"never"`` (always lines).
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        *,
        unit: str = "it",
        enabled: bool = True,
        stream: IO[str] | None = None,
        every: float | None = None,
        initial: int = 0,
        leave: bool = True,
        bar: str = "auto",
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.enabled, self.leave = bool(enabled), leave
        self.stream = stream if stream is not None else sys.stderr
        self.every = log_every() if every is None else float(every)
        self.n = self.start_n = int(initial)
        self.postfix: dict[str, Any] = {}
        self.start = self.last_line = time.monotonic()
        self.closed = False
        self._bar: Any = None
        if self.enabled and bar == "auto" and _is_terminal(self.stream):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=leave,
                             file=self.stream, dynamic_ncols=True)

    # ---- reporting -----------------------------------------------------------------------

    def update(self, n: int = 1) -> None:
        """``n`` more units done."""
        if not self.enabled or self.closed:
            return
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        finished = self.total is not None and self.n >= self.total and self.leave
        if now - self.last_line >= self.every and not finished:  # close() says the last word
            self.last_line = now
            self._write(self.line(now))

    def set_postfix(self, **values: Any) -> None:
        """Values shown after the counts (e.g. ``loss=0.021``)."""
        self.postfix = values
        if self._bar is not None:
            self._bar.set_postfix(**values)

    def line(self, now: float | None = None) -> str:
        """The plain line for the state now: count, elapsed, estimate of what is left."""
        elapsed = (time.monotonic() if now is None else now) - self.start
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        parts = [f"{self.desc}: {count} {self.unit}s", f"{format_seconds(elapsed)} elapsed"]
        done = self.n - self.start_n
        if self.total is not None and 0 < done and self.n < self.total:
            parts.append(f"~{format_seconds(elapsed / done * (self.total - self.n))} left")
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
        return ", ".join(parts)

    def close(self) -> None:
        """Finish: close the bar, or print the final line (with ``leave``)."""
        if self.closed:
            return
        self.closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.leave:
            elapsed = format_seconds(time.monotonic() - self.start)
            count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
            extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
            self._write(f"{self.desc}: {count} {self.unit}s in {elapsed}{extra}")

    def _write(self, text: str) -> None:
        try:
            print(text, file=self.stream, flush=True)
        except (OSError, ValueError):  # a closed log must not stop the work
            pass

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress_iter(items: Iterable[T], desc: str, *, total: int | None = None,
                  **options: Any) -> Iterator[T]:
    """Iterate ``items`` with a :class:`Progress` (``options`` as its keyword arguments)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(total, desc, **options) as p:
        for item in items:
            yield item
            p.update()
