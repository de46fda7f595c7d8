"""Measure how long the Qt event loop stalls: a QTimer heartbeat and the longest gap between beats."""

from __future__ import annotations

import time

from qtpy.QtCore import QTimer

__all__ = ["StallMeter"]


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
