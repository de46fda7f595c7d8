"""Measure how long the Qt event loop stalls: a QTimer heartbeat and the longest gap between beats.

:class:`StallSampler` (opt-in, for developers) says *what* stalls: a watchdog thread samples the
GUI thread's Python stack whenever the heartbeat is overdue and counts the functions it finds.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter

from qtpy.QtCore import QTimer

__all__ = ["StallMeter", "StallSampler"]


class StallMeter:
    """Ticks every ``period_ms`` on the GUI thread; ``worst_ms`` is the longest stall seen.

    A stall is the time between two ticks minus the period: how long the event loop could
    not run (no repaint, no mouse) while a job was going on.

    Example:
        >>> meter = StallMeter(); meter.start()   # doctest: +SKIP
        >>> ...run a job, process events...       # doctest: +SKIP
        >>> meter.stop(); meter.worst_ms          # doctest: +SKIP
    """

    def __init__(self, period_ms: int = 10) -> None:
        self.period_ms = period_ms
        self.timer = QTimer()
        self.timer.setInterval(period_ms)
        self.timer.timeout.connect(self._tick)
        self.gaps_ms: list[float] = []
        self._last: float | None = None

    def _tick(self) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.gaps_ms.append((now - self._last) * 1000 - self.period_ms)
        self._last = now

    @property
    def last_beat(self) -> float | None:
        """``time.perf_counter()`` of the latest beat (None before the first)."""
        return self._last

    def start(self) -> None:
        self.gaps_ms = []
        self._last = None
        self.timer.start()

    def stop(self) -> None:
        self.timer.stop()

    @property
    def worst_ms(self) -> float:
        return max(self.gaps_ms, default=0.0)

    def percentile_ms(self, q: float) -> float:
        if not self.gaps_ms:
            return 0.0
        ordered = sorted(self.gaps_ms)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


class StallSampler:
    """Where the GUI thread is while ``meter``'s heartbeat is overdue by more than ``overdue_ms``.

    A daemon thread looks every ``every_ms``; each look during a stall records the GUI thread's
    Python stack under the index the stall will have in ``meter.gaps_ms``, so a job's samples are
    those of its gaps. Each sample stands for about ``every_ms`` of stall. A stack whose innermost
    frame is a Qt call (``processEvents``, ``exec_``) means C++ work: painting, or waiting for the
    GIL that a worker holds. Sampling takes the GIL a few hundred times a second: it adds a
    little to what it measures, so leave it off for the numbers of record.
    """

    def __init__(self, meter: StallMeter, overdue_ms: float = 50.0, every_ms: float = 5.0) -> None:
        self.meter = meter
        self.overdue_s = overdue_ms / 1000
        self.every_s = every_ms / 1000
        self.stacks: dict[int, list[tuple[str, ...]]] = {}  # gap index -> sampled stacks, outermost first
        # gap index -> the other threads' innermost frames at each sample: a worker in a Python
        # loop holds the GIL, and the GUI thread waits for it wherever it is
        self.others: dict[int, Counter] = {}
        # gap index -> (first, last) (seconds, on-CPU ns, run-queue ns) of the GUI thread over its samples
        self.sched: dict[int, list] = {}
        self._gui = threading.main_thread().ident
        self._schedstat = f"/proc/self/task/{threading.main_thread().native_id}/schedstat"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="stall sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(self.every_s):
            last, gap = self.meter.last_beat, len(self.meter.gaps_ms)
            frames = sys._current_frames()
            frame = frames.pop(self._gui, None)
            if last is not None and frame is not None and time.perf_counter() - last > self.overdue_s:
                self.stacks.setdefault(gap, []).append(_stack(frame))
                self._note_sched(gap)
                frames.pop(threading.get_ident(), None)
                self.others.setdefault(gap, Counter()).update(_stack(other)[-1] for other in frames.values())

    def _note_sched(self, gap: int) -> None:
        try:
            with open(self._schedstat) as stat:  # Linux: ns on a CPU, ns waiting for one, timeslices
                on_cpu, waiting, _ = (int(v) for v in stat.read().split())
        except (OSError, ValueError):
            return
        now = (time.perf_counter(), on_cpu, waiting)
        self.sched.setdefault(gap, [now, now])[1] = now

    def _sched_line(self, first: int, end: int) -> str:
        """Of the sampled stall time: the GUI thread on a CPU, waiting for one, or blocked (e.g. the GIL)."""
        spans = [self.sched[gap] for gap in range(first, end) if gap in self.sched]
        wall = sum(b[0] - a[0] for a, b in spans) * 1000
        on_cpu = sum(b[1] - a[1] for a, b in spans) / 1e6
        waiting = sum(b[2] - a[2] for a, b in spans) / 1e6
        if wall <= 0:
            return "  GUI thread: no timed stall"
        return (f"  GUI thread over {wall:.0f} ms of stalls: {on_cpu / wall:.0%} on a CPU, {waiting / wall:.0%} "
                f"waiting for a CPU, {max(wall - on_cpu - waiting, 0) / wall:.0%} blocked (GIL, locks, GL)")

    def report(self, name: str, first: int, end: int, top: int = 12) -> str:
        """What the GUI thread did in the stalls ``first``..``end - 1``: innermost frames and
        every frame (inclusive), in ms, and the worst stall's commonest stack."""
        samples = [stack for gap in range(first, end) for stack in self.stacks.get(gap, [])]
        if not samples:
            return f"== {name}: no stall over {self.overdue_s * 1000:.0f} ms"
        ms = self.every_s * 1000
        inner = Counter(stack[-1] for stack in samples)
        inclusive = Counter(frame for stack in samples for frame in set(stack))
        worst = max(range(first, end), key=lambda gap: self.meter.gaps_ms[gap] if gap < len(self.meter.gaps_ms) else 0)
        lines = [f"== {name}: {len(samples)} samples ~ {len(samples) * ms:.0f} ms in stalls over "
                 f"{self.overdue_s * 1000:.0f} ms", self._sched_line(first, end), "  innermost:"]
        lines += [f"  {count * ms:7.0f} ms  {where}" for where, count in inner.most_common(top)]
        lines.append("  inclusive:")
        lines += [f"  {count * ms:7.0f} ms  {where}" for where, count in inclusive.most_common(2 * top)]
        others = sum((self.others.get(gap, Counter()) for gap in range(first, end)), Counter())
        lines.append("  other threads, innermost (samples):")
        lines += [f"  {count:7d}     {where}" for where, count in others.most_common(top)]
        lines.append(f"  the worst stall ({self.meter.gaps_ms[worst]:.0f} ms), where it was (samples):")
        lines += [f"  {count:7d}     {where}" for where, count in _where(self.stacks.get(worst, [])).most_common(top)]
        return "\n".join(lines)


def _where(stacks) -> Counter:
    """Per sampled stack: its innermost frame, after the innermost frame of this package when
    there is one (which of our calls led there)."""
    where = Counter()
    for stack in stacks:
        ours = [frame for frame in stack if frame.startswith("napari_crossd/")]
        where[(f"{ours[-1]} > " if ours else "") + stack[-1]] += 1
    return where


def _stack(frame) -> tuple[str, ...]:
    """``file:line function`` of ``frame`` and its callers, outermost first (no source lines read)."""
    stack = []
    while frame is not None:
        stack.append(f"{_short(frame.f_code.co_filename)}:{frame.f_lineno} {frame.f_code.co_name}")
        frame = frame.f_back
    return tuple(reversed(stack))


def _short(path: str) -> str:
    """A file name cut after site-packages (or the package, or docs/)."""
    for marker in ("site-packages/", "napari_crossd/", "docs/"):
        if marker in path:
            return path[path.index(marker):]
    return path
