"""Run engine jobs off the GUI thread: napari ``thread_worker``, progress bar, cancel, notifications.

A job is a generator from :mod:`napari_crossd.engine` that yields ``Progress`` and returns
its result. :meth:`JobRunner.start` drives it in a napari generator worker; results are handed to
``on_result`` in the GUI thread, which is where layers are added. Cancelling sets a flag the
worker checks between two yields: the job is closed in the worker thread (its clean-up runs
there) and no result is delivered, so no layer changes. An exception becomes a napari error
notification with its message; layers are left as they were. :class:`LatestJob` runs short
interactive jobs (a slider's) where only the newest request counts.

Showing a result in steps: an ``on_result`` that is a generator function is stepped once per
turn of the event loop, ``STEP_PAUSE_MS`` apart (each step, e.g. one layer added or updated,
then a repaint can come),
so a result of many layers does not hold the GUI thread for the sum of them; the runner stays
busy until the last step.

Progress shows in the widget's own bar (:class:`JobProgress`, hidden while idle), not in napari's
activity dialog: a napari ``progress`` starts an animated "in progress" GIF in the status bar,
and each of its frames (about 20 a second) repaints the window, which under software OpenGL
(llvmpipe) is a full-window composite: measured on 2 cores shared with other processes, 70% of
the event loop's time went to those repaints, and the GIF kept running after the bar had closed.

Torch threads: on machines of up to 4 cores, every worker first sets torch's intra-op threads
to one fewer than the cores (:func:`worker_threads`), so the GUI thread keeps a core for
repainting while a job runs; torch's threads spin on every core they have, and with all of
them taken the event loop stalled for 200-400 ms at a time on 2 cores. The cost: on 2 cores a
job runs torch on one, so convolution-heavy jobs (features, fine-tuning) take up to twice as
long. ``CROSSD_WORKER_THREADS=N`` overrides (0: leave torch's setting alone).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from functools import partial
from inspect import isgenerator

from magicgui.widgets import ProgressBar
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QTimer

__all__ = ["CANCELLED", "JobProgress", "JobRunner", "LatestJob", "worker_threads"]

CANCELLED = object()
SMALL_MACHINE_CORES = 4
# Between two steps of showing a result: a zero-timeout timer runs the steps back to back, before
# any repaint or other timer (measured: three 110 ms steps made one 600 ms stall); 15 ms lets them in.
STEP_PAUSE_MS = 15


def worker_threads(cores: int | None = None, override: str | None = None) -> int | None:
    """Torch intra-op threads for a job's worker: ``cores - 1`` (at least 1) on machines of up to
    ``SMALL_MACHINE_CORES`` cores, None (torch's own choice) on larger ones.

    ``override``: the value of ``CROSSD_WORKER_THREADS`` (default: read from the environment);
    a positive number is used as it is, 0 leaves torch alone.
    """
    override = os.environ.get("CROSSD_WORKER_THREADS") if override is None else override
    if override not in (None, ""):
        return int(override) or None
    cores = (os.cpu_count() or 1) if cores is None else cores
    return max(cores - 1, 1) if cores <= SMALL_MACHINE_CORES else None


def _leave_the_gui_a_core() -> None:
    threads = worker_threads()
    if threads is None:
        return
    # torch here, in the worker: the widget modules import without it (jobs import it anyway)
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _drive(job: Generator, cancel: threading.Event):
    """Yield the job's reports until it returns or ``cancel`` is set; always close the job here."""
    try:
        while True:
            if cancel.is_set():
                return CANCELLED
            try:
                report = next(job)
            except StopIteration as stop:
                return stop.value
            yield report
    finally:
        job.close()


class JobProgress(ProgressBar):
    """A job's progress in its widget: hidden while idle; "description: message" and a percentage.

    A report without a total leaves the bar empty rather than busy: Qt animates a busy bar,
    and every animation frame repaints the window (see the module doc).
    """

    def __init__(self) -> None:
        super().__init__(value=0, min=0, max=1, visible=False, label="")

    def begin(self, description: str) -> None:
        self.max, self.value = 1, 0
        self.native.setFormat(f"{description} ...")
        self.visible = True

    def show_report(self, description: str, report) -> None:
        total = int(report.total or 0)
        self.max = max(total, 1)
        self.value = min(int(report.step), total) if total else 0
        self.native.setFormat(f"{description}: {report.message}" + (" (%p%)" if total else ""))

    def end(self) -> None:
        self.visible = False


@dataclass
class _Started:
    """One job of a :class:`JobRunner`: whom to tell when it reports."""

    description: str
    on_result: Callable[[object], None]
    on_progress: Callable[[object], None] | None
    on_error: Callable[[BaseException], None] | None
    on_cancel: Callable[[], None] | None
    started: float = field(default_factory=time.perf_counter)


def _quiet_worker(make_job: Callable[[], Generator], cancel: threading.Event):
    """A napari worker (not started) that runs ``make_job()`` until ``cancel`` is set.

    Errors are the runner's to report (one notification with the reason): no re-raise in the
    GUI thread, and napari's own relay of the traceback is disconnected.
    """

    @thread_worker(start_thread=False, ignore_errors=True)
    def work():
        _leave_the_gui_a_core()
        result = yield from _drive(make_job(), cancel)
        return result

    worker = work()
    relay = getattr(worker, "_relay_error", None)
    if relay is not None:
        try:
            worker.errored.disconnect(relay)
        except (TypeError, RuntimeError):
            pass  # not connected in this napari version
    return worker


class JobRunner:
    """One job at a time for a widget, with a progress bar and a Cancel action.

    ``progress``: a :class:`JobProgress` for the widget to place in its layout (hidden while
    idle); None with ``progress_bar=False`` (for jobs that take a moment, where a bar would
    only flash).

    Attributes:
        worker: the running napari worker, or None.
        last_error: the message of the last failure (also shown as a notification).
        last_status: ``"done"``, ``"cancelled"`` or ``"failed"`` after a job ends.
        last_seconds: wall time of the last job.
        last_result_ms: time the last result took to show (adding layers, in the GUI thread).
    """

    def __init__(self, on_busy: Callable[[bool], None] | None = None, progress_bar: bool = True) -> None:
        self.worker = None
        self.last_error: str | None = None
        self.last_status: str | None = None
        self.last_seconds: float | None = None
        self.last_result_ms: float | None = None
        self._cancel = threading.Event()
        self._on_busy = on_busy
        self.progress = JobProgress() if progress_bar else None
        self._showing = None  # a result being shown in steps (generator), see the module doc

    @property
    def busy(self) -> bool:
        return self.worker is not None or self._showing is not None

    def fail(self, message: str) -> None:
        """Report a problem found before any work started."""
        self.last_error = message
        self.last_status = "failed"
        show_error(message)

    def start(
        self,
        make_job: Callable[[], Generator],
        on_result: Callable[[object], None],
        description: str,
        on_progress: Callable[[object], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        on_cancel: Callable[[], None] | None = None,
    ):
        """Start ``make_job()`` (called in the worker thread) and return the worker.

        ``on_result``, ``on_progress``, ``on_error`` and ``on_cancel`` run in the GUI thread;
        they are connected before the worker starts, so a job that ends at once is not missed.
        """
        if self.worker is not None:
            self.fail(f"{description}: another job of this widget is still running; cancel it or wait")
            return None
        self._cancel = threading.Event()
        self.last_error = None
        self.last_status = None
        job = _Started(description, on_result, on_progress, on_error, on_cancel)
        if self.progress is not None:
            self.progress.begin(description)
        worker = _quiet_worker(make_job, self._cancel)
        worker.yielded.connect(partial(self._progressed, job))
        worker.returned.connect(partial(self._returned, job))
        worker.errored.connect(partial(self._failed, job))
        worker.finished.connect(partial(self._finished, job))
        self.worker = worker
        if self._on_busy is not None:
            self._on_busy(True)
        worker.start()
        return worker

    def _progressed(self, job: _Started, report) -> None:
        if self.progress is not None:
            self.progress.show_report(job.description, report)
        if job.on_progress is not None:
            job.on_progress(report)

    def _returned(self, job: _Started, value) -> None:
        if value is CANCELLED:
            self.last_status = "cancelled"
            show_info(f"{job.description}: cancelled; layers unchanged")
            if job.on_cancel is not None:
                job.on_cancel()
            return
        self.last_result_ms = 0.0
        self._show_step(job, lambda: job.on_result(value))

    def _show_step(self, job: _Started, step: Callable[[], object]) -> None:
        """Run one step of showing a result; schedule the next one (next event-loop turn) if any."""
        begin = time.perf_counter()
        try:
            shown = step()
            if isgenerator(shown):  # the first step of a stepped result: the generator itself
                self._showing = shown
                shown = next(shown)
        except StopIteration:
            self._showing = None
        except Exception as err:  # a result that cannot be shown is a failure, not a crash
            self._showing = None
            self._failed(job, err)
        finally:
            self.last_result_ms += 1000 * (time.perf_counter() - begin)
        if self._showing is not None:
            QTimer.singleShot(STEP_PAUSE_MS, partial(self._show_step, job, partial(next, self._showing)))
            return
        if self.last_status != "failed":
            self.last_status = "done"
        self._idle()

    def _idle(self) -> None:
        if not self.busy and self._on_busy is not None:
            self._on_busy(False)

    def _failed(self, job: _Started, err: BaseException) -> None:
        message = f"{job.description} failed: {err}"
        self.last_error = message
        self.last_status = "failed"
        show_error(message)
        if job.on_error is not None:
            job.on_error(err)

    def _finished(self, job: _Started) -> None:
        self.last_seconds = time.perf_counter() - job.started
        if self.progress is not None:
            self.progress.end()
        self.worker = None
        self._idle()

    def cancel(self) -> None:
        """Ask the running job to stop at its next step (no effect when idle)."""
        self._cancel.set()


class LatestJob:
    """Short interactive jobs where only the newest request counts, e.g. one per slider tick.

    One job runs at a time, off the GUI thread (a :class:`JobRunner` without a progress
    bar). A request made while a job runs waits, replacing any request that was waiting;
    when the running job ends, the waiting one starts. The running job is not cancelled:
    its result still shows, so the display follows a moving slider at the speed of the
    work and always ends on the last request.

    Attributes:
        runner: the :class:`JobRunner` (``last_status``, ``last_error`` of the last job).
    """

    def __init__(self, description: str) -> None:
        self.description = description
        self.runner = JobRunner(on_busy=self._busy_changed, progress_bar=False)
        self._waiting: tuple[Callable[[], Generator], Callable[[object], None]] | None = None

    @property
    def busy(self) -> bool:
        """A job is running or waiting."""
        return self.runner.busy or self._waiting is not None

    def submit(self, make_job: Callable[[], Generator], on_result: Callable[[object], None]) -> None:
        """Run ``make_job()`` now, or after the running job, instead of any request waiting."""
        if self.runner.busy:
            self._waiting = (make_job, on_result)
            return
        self.runner.start(make_job, on_result, self.description)

    def _busy_changed(self, busy: bool) -> None:
        # Called by the runner in the GUI thread once a job has ended (result shown).
        if not busy and self._waiting is not None:
            make_job, on_result = self._waiting
            self._waiting = None
            self.runner.start(make_job, on_result, self.description)
