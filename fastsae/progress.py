"""Progress reports: a tqdm bar on a terminal, plain lines in a log file, nothing when quiet.

tqdm redraws its bar with carriage returns, which a log file keeps as megabytes of partial
lines; when stderr is not a terminal, ``progress_bar`` prints one plain line every
LOG_EVERY_S seconds and one at the end instead. ``set_quiet(True)`` (the CLI's --quiet)
silences every report of the process.
"""
from __future__ import annotations

import sys
import time

LOG_EVERY_S = 30.0
_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = bool(quiet)


def progress_bar(iterable=None, *, total=None, desc: str = "", unit: str = "it", initial: int = 0,
                 disable: bool = False, **tqdm_kwargs):
    """A tqdm bar, or a LogLines reporter when stderr is not a terminal (same methods)."""
    disable = disable or _quiet
    if not disable and not _is_terminal(sys.stderr):
        return LogLines(iterable, total=total, desc=desc, unit=unit, initial=initial)
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable, **tqdm_kwargs)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class LogLines:
    """The part of tqdm's interface fastsae uses, reported as plain lines."""

    def __init__(self, iterable=None, total=None, desc="", unit="it", initial=0):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n, self.initial, self.postfix = initial, initial, ""
        self._start = self._last = time.monotonic()
        self._closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n=1) -> None:
        self.n += n
        if time.monotonic() - self._last >= LOG_EVERY_S:
            self._print()

    def set_postfix(self, refresh=True, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._print()

    def _print(self) -> None:
        self._last = now = time.monotonic()
        done = f"{self.n:,}" + (f"/{self.total:,} ({100 * self.n / self.total:.0f}%)" if self.total else "")
        rate = (self.n - self.initial) / max(now - self._start, 1e-9)
        eta = f", ETA {_clock(round((self.total - self.n) / rate))}" if self.total and rate > 0 and \
            self.n < self.total else ""
        extra = f" {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {done} {self.unit}, {rate:,.1f} {self.unit}/s{eta}{extra}", file=sys.stderr, flush=True)


def _clock(seconds: int) -> str:
    """h:mm:ss, as tqdm prints its ETA."""
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
