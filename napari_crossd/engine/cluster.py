"""Segmentation and features block by block on a Dask distributed cluster.

Convention:
    The client cuts the volume into blocks of at most ``block`` voxels a side, sends
    each block grown by the features' halo to a worker and writes what comes back into the
    output. The model (a :class:`~.segmenter.Segmenter` or an encoder) travels to every
    worker once, scattered before the first block, never inside a task; the intensity
    normalisation is measured once on the whole volume, so a block is normalised as the
    volume is. At most :data:`IN_FLIGHT_PER_THREAD` blocks per worker thread are out at a
    time, so the client's memory grows with the blocks and the output, not with the
    number of blocks. Results match a local run to the tiling tolerance: every block sees
    the same halo as the local path's blocks.

Workers need napari-crossd installed (the model's classes are imported there) and read
nothing from disk: blocks come from the client, which reads the volume block by block.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import product

import numpy as np
import torch
from torch import nn

from .devices import resolve_device
from .features import DASK_HALO, check_levels, feature_channels, hypercolumns_job, require_3d
from .jobs import Job, Progress, run_job
from .normalize import check_volume, intensity_stats
from .pyramid import spacing_scale
from .segmenter import Segmenter, classify_job, labels_dtype

__all__ = ["DEFAULT_BLOCK", "IN_FLIGHT_PER_THREAD", "features_on_cluster_job", "segment_on_cluster_job"]

# Edge (voxels) of the blocks sent to workers, before the halo: small enough that a volume
# gives every worker several blocks, large enough that the halo stays a fraction of each.
DEFAULT_BLOCK = 128
# Blocks queued per worker thread: one running, one arriving.
IN_FLIGHT_PER_THREAD = 2


def segment_on_cluster_job(
    client,
    segmenter: Segmenter,
    volume,
    *,
    spacing: Sequence[float] | None = None,
    resample: bool | None = None,
    tile: int | None = None,
    overlap: float = 0.25,
    batch: int = 1,
    device: str = "auto",
    probabilities: bool = False,
    block: int = DEFAULT_BLOCK,
    out=None,
) -> Job[tuple[np.ndarray, np.ndarray | None]]:
    """:func:`~.segmenter.segment_job` with the blocks computed on ``client``'s cluster.

    Args:
        client: a ``distributed.Client``.
        segmenter: a trained segmenter (on the client; scattered to the workers).
        volume: (Z, Y, X) numpy or memory-mapped array on the client.
        spacing, resample, tile, overlap, batch: as :func:`napari_crossd.engine.features_job`.
        device: where each worker runs the encoder (resolved on the worker: ``"auto"``
            takes a worker's GPU where it has one).
        probabilities: also return per-class probabilities (N, Z, Y, X) float16.
        block: block edge in voxels before the halo (:data:`DEFAULT_BLOCK`).
        out: an array of the volume's shape to write the labels into (e.g. a ``numpy.memmap``).

    Returns:
        ``(labels, probabilities)`` as :func:`~.segmenter.segment_job` returns them.
    """
    check_volume(volume)
    if not segmenter.trained:
        raise ValueError("The segmenter is untrained: fine-tune it on painted labels first.")
    shape = tuple(volume.shape)
    labels = np.empty(shape, dtype=labels_dtype(segmenter.num_classes)) if out is None else out
    if tuple(labels.shape) != shape:
        raise ValueError(f"out has shape {tuple(labels.shape)}; expected the volume's {shape}.")
    probs = np.empty((segmenter.num_classes, *shape), dtype=np.float16) if probabilities else None

    def write(box, result) -> None:
        labels[box] = result[0]
        if probs is not None:
            probs[(slice(None), *box)] = result[1]

    options = dict(
        stats=intensity_stats(volume, segmenter.preset), device=device, probabilities=probabilities,
        settings=dict(spacing=spacing, resample=resample, tile=tile, overlap=overlap, batch=batch),
    )
    yield from _blocks_job(client, segmenter, volume, segmenter.halo, block, _segment_block, options, write, "segment")
    return labels, probs


def features_on_cluster_job(
    client,
    model: nn.Module,
    volume,
    *,
    spacing: Sequence[float] | None = None,
    resample: bool | None = None,
    levels: Sequence[int] | None = None,
    preset: str = "auto",
    tile: int | None = None,
    overlap: float = 0.25,
    batch: int = 1,
    device: str = "auto",
    block: int = DEFAULT_BLOCK,
    out=None,
) -> Job[np.ndarray]:
    """:func:`~.features.features_job` (stride 1) with the blocks computed on ``client``'s cluster.

    Args:
        client: a ``distributed.Client``.
        model: inflated 3D network (on the client; scattered to the workers).
        volume, spacing, resample, levels, preset, tile, overlap, batch: as
            :func:`~.features.features_job`.
        device, block: as :func:`segment_on_cluster_job`.
        out: a ``(C, Z, Y, X)`` float32 array to write into (e.g. ``numpy.lib.format.open_memmap``).

    Returns:
        ``(C, Z, Y, X)`` float32 features (``out`` when given).
    """
    require_3d(model)
    check_volume(volume)
    levels = check_levels(model, levels)
    shape = (feature_channels(model, levels), *volume.shape)
    features = np.empty(shape, dtype=np.float32) if out is None else out
    if tuple(features.shape) != shape:
        raise ValueError(f"out has shape {tuple(features.shape)}; expected {shape}.")

    def write(box, result) -> None:
        features[(slice(None), *box)] = result

    options = dict(
        stats=intensity_stats(volume, preset), device=device,
        settings=dict(levels=levels, scale=spacing_scale(spacing, resample), tile=tile, overlap=overlap, batch=batch),
    )
    yield from _blocks_job(client, model, volume, DASK_HALO, block, _features_block, options, write, "features")
    return features


def _blocks_job(client, shared, volume, halo: int, block: int, task: Callable, options: dict,
                write: Callable, what: str) -> Job[None]:
    """Run ``task(shared, region, core, **options)`` on every block; ``write(box, result)`` as each ends."""
    from distributed import as_completed  # here, not above: importing distributed takes a second

    if not (isinstance(block, int) and block >= 1):
        raise ValueError(f"block must be a positive number of voxels, got {block!r}.")
    shape = tuple(int(n) for n in volume.shape)
    boxes = _grid_boxes(shape, block)
    threads = sum(client.nthreads().values())
    if not threads:
        raise ValueError(f"The cluster at {client.scheduler.address} has no workers.")
    job_id = uuid.uuid4().hex  # keys unique on a scheduler that other clients share
    shared_future = client.scatter(_Pickled(shared), broadcast=True, hash=False)
    running, boxes_left = {}, iter(enumerate(boxes))
    done = as_completed(loop=client.loop)

    def submit() -> None:
        index, box = next(boxes_left, (None, None))
        if box is None:
            return
        grown = tuple(slice(max(0, s.start - halo), min(n, s.stop + halo)) for s, n in zip(box, shape, strict=True))
        core = tuple(slice(s.start - g.start, s.stop - g.start) for s, g in zip(box, grown, strict=True))
        region = client.scatter(np.asarray(volume[grown]), hash=False)
        future = client.submit(task, shared_future, region, core, **options, key=f"crossd-{what}-{job_id}-{index}")
        running[future.key] = box
        done.add(future)

    try:
        for _ in range(min(len(boxes), IN_FLIGHT_PER_THREAD * threads)):
            submit()
        yield Progress(0, len(boxes), f"{what}: {len(boxes)} blocks on {threads} worker threads", phase="cluster")
        for finished, future in enumerate(done, start=1):
            worker, result = future.result()  # a worker's error is raised here, with its own message
            write(running.pop(future.key), result)
            del future, result
            submit()
            yield Progress(finished, len(boxes), f"{what}: block {finished}/{len(boxes)} done on {worker}",
                           phase="cluster")
    finally:
        client.cancel([*done.futures, shared_future])


def _grid_boxes(shape: tuple[int, ...], block: int) -> list[tuple[slice, slice, slice]]:
    """Boxes of at most ``block`` voxels along each axis, of near-equal sizes, tiling ``shape``."""
    edges = [np.linspace(0, n, -(-n // block) + 1).round().astype(int) for n in shape]
    return [tuple(slice(int(e[i]), int(e[i + 1])) for e, i in zip(edges, index, strict=True))
            for index in product(*(range(len(e) - 1) for e in edges))]


@dataclass(frozen=True)
class _Pickled:
    """The model as one pickle: distributed's own serialiser for ``nn.Module`` rebuilds its
    hook dictionaries as plain dicts, which torch can no longer register hooks in."""

    value: object


def _worker_device(device: str) -> torch.device:
    """The device of a task; torch keeps to the worker's own threads (several worker
    processes on one machine must not each take every core)."""
    from distributed import get_worker  # runs on a worker, where distributed is loaded already

    torch.set_num_threads(max(1, get_worker().state.nthreads))
    return resolve_device(device)


def _worker_address() -> str:
    from distributed import get_worker  # runs on a worker, where distributed is loaded already

    return get_worker().address


def _segment_block(shared: _Pickled, region: np.ndarray, core, *, stats, settings, device, probabilities):
    segmenter = shared.value
    source = segmenter.features(region, stats=stats, boxes=[core], **settings)
    labels, probs = run_job(classify_job(segmenter, source, _worker_device(device), None, probabilities))
    return _worker_address(), (labels[core], None if probs is None else probs[(slice(None), *core)])


def _features_block(shared: _Pickled, region: np.ndarray, core, *, stats, settings, device):
    device = _worker_device(device)
    features = run_job(hypercolumns_job(shared.value, region, stats, stride=1, device=device, **settings))
    return _worker_address(), features[(slice(None), *core)]
