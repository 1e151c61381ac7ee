"""Progress: what a step that takes more than a few seconds shows while it works.

One bar per step (extraction, the heads' epochs, the probes, explaining faces, grouping faces), drawn by
rich on a terminal and written as a plain line every few seconds elsewhere (a log, CI), so a long step is
never silent. ``featlab -q`` (or :func:`set_quiet`, or ``FEATLAB_QUIET=1``) silences every bar and the
steps' own lines; results and errors still print.
"""

from __future__ import annotations

import os
import sys
import threading
import time

_QUIET = os.environ.get("FEATLAB_QUIET", "") not in ("", "0")  # the test suite sets it; its own test unsets it
#: off a terminal, a line at most this often (seconds)
PLAIN_EVERY = 4.0


def set_quiet(quiet: bool) -> None:
    """Silence (or restore) every progress display of this process."""
    global _QUIET
    _QUIET = bool(quiet)


def quiet() -> bool:
    return _QUIET


class Bar:
    """``with Bar(total, label, unit) as bar: bar(n)`` advances by ``n``; ``bar.note(text)`` sets the
    text shown beside the count (e.g. how many heads still train). A no-op when disabled, when quiet or
    when ``total`` is 0. ``rate``: show items per second (``unit``/s) and the ETA."""

    def __init__(self, total: int, label: str, unit: str = "", enabled: bool = True, rate: bool = True,
                 stream=None):
        self.total, self.label, self.unit, self.rate = int(total), label, unit, rate
        self.enabled = enabled and not _QUIET and self.total > 0
        self.stream = stream
        self.done, self._note, self._p, self._on = 0, "", None, False

    def __enter__(self):
        if not self.enabled or self._on:
            return self
        self._on = True
        stream = self.stream or sys.stderr
        self._t0 = self._last = time.perf_counter()
        if getattr(stream, "isatty", lambda: False)():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            unit = self.unit

            class Rate(TextColumn):
                def render(self, task):
                    from rich.text import Text

                    speed = task.finished_speed or task.speed
                    return Text(f"{speed:,.1f} {unit}/s" if speed and speed < 10 else
                                f"{speed:,.0f} {unit}/s" if speed else f"… {unit}/s")

            from rich.progress import TimeElapsedColumn

            cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
            if self.rate:
                cols += [Rate(""), TextColumn("ETA"), TimeRemainingColumn()]
            cols.append(TextColumn("{task.fields[note]}"))
            self._p = Progress(*cols, console=Console(file=stream), transient=False)
            self._p.start()
            self._task = self._p.add_task(self.label, total=self.total, note="")
        else:
            # off a terminal: a line now, then one at least every PLAIN_EVERY seconds while the step runs, even
            # when nothing advanced (a long first epoch, TensorFlow loading)
            self._stream = stream
            self._lock = threading.Lock()
            self._stop = threading.Event()
            self._plain(final=False, force=True)
            self._beat = threading.Thread(target=self._heartbeat, daemon=True)
            self._beat.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(max(PLAIN_EVERY, 0.05)):
            self._plain(final=False)

    def __call__(self, n: int = 1) -> None:
        self.done += n
        if not self._on:  # disabled, or not shown yet: counted only
            return
        if self._p is not None:
            self._p.update(self._task, advance=n, note=self._note)
        else:
            self._plain(final=False)

    def note(self, text: str) -> None:
        self._note = text
        if self._on and self._p is not None:
            self._p.update(self._task, note=text)

    def _plain(self, final: bool, force: bool = False) -> None:
        with self._lock:
            now = time.perf_counter()
            if not (final or force) and now - self._last < PLAIN_EVERY:
                return
            self._last = now
            self._line(now)

    def _line(self, now: float) -> None:
        el = now - self._t0
        rate = f", {self.done / el:,.1f} {self.unit}/s" if self.rate and el > 0 and self.done else ""
        note = f"; {self._note}" if self._note else ""
        print(f"  {self.label}: {self.done:,}/{self.total:,} {self.unit}{rate}, {el:.0f} s{note}",
              file=self._stream, flush=True)

    def __exit__(self, *exc):
        if not self._on:
            return
        self._on = False
        if self._p is not None:
            self._p.stop()
        else:
            self._stop.set()
            self._beat.join()
            self._plain(final=True)
