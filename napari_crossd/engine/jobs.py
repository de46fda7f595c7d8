"""Long work as generators: each job yields :class:`Progress` and returns its result.

A widget runs a job in napari's ``thread_worker`` and cancels it by quitting the worker;
the command line and scripts drive it with :func:`run_job`. A job only ever stops between
two yields, so cancelling never leaves a half-written result behind.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, replace
from typing import TypeVar

__all__ = ["Job", "Progress", "named_job", "run_job"]

T = TypeVar("T")


@dataclass(frozen=True)
class Progress:
    """One report from a running job.

    Attributes:
        step: steps done so far (tiles, training steps, slabs).
        total: steps the job expects in this phase, or None when unknown.
        message: what is happening, for a progress bar or a log line.
        loss: the training loss of this step (encoder fine-tuning only).
        phase: what kind of work this is, for displays that treat phases differently:
            ``"encode"`` (encoder tiles), ``"features"``, ``"hypercolumns"``, ``"fit"``,
            ``"encoder"`` (encoder fine-tuning), ``"predict"``, or ``""`` (anything else).
    """

    step: int
    total: int | None
    message: str
    loss: float | None = None
    phase: str = ""


Job = Generator[Progress, None, T]


def run_job(job: Job[T], progress: Callable[[Progress], None] | None = None) -> T:
    """Run ``job`` to the end and return its result.

    Args:
        job: a generator from one of the ``*_job`` functions of :mod:`napari_crossd.engine`.
        progress: called with every :class:`Progress`. Raising from it cancels the job
            (the generator is closed first, so its clean-up runs) and propagates.

    Returns:
        The job's return value.
    """
    try:
        while True:
            try:
                report = next(job)
            except StopIteration as stop:
                return stop.value
            if progress is not None:
                progress(report)
    finally:
        job.close()


def named_job(job: Job[T], name: str) -> Job[T]:
    """``job`` with ``name`` before each progress message (which volume or file it works on)."""
    try:
        while True:
            report = next(job)
            yield replace(report, message=f"{name}: {report.message}")
    except StopIteration as stop:
        return stop.value
    finally:
        job.close()
