"""Many volume files in one job: each read, processed and written on its own grid.

Convention:
    ``outputs[i]`` is written for ``inputs[i]`` in its own format (:func:`output_paths`
    puts ``DIR/<input file name>``). A file that cannot be read or processed is reported
    with its name and the next one goes on; an output is written whole or not at all
    (:func:`napari_crossd.io.write_volume`), and never over its input.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from ..io import Volume, read_volume, write_volume
from ..io.grids import strided_grid
from ..io.volumes import SUFFIXES, volume_suffix
from .cluster import DEFAULT_BLOCK, features_on_cluster_job, segment_on_cluster_job
from .features import features_job, pca_rgb
from .jobs import Job, Progress, named_job
from .segmenter import Segmenter, segment_job

__all__ = [
    "FileResult",
    "features_files_job",
    "output_paths",
    "process_files_job",
    "read_pairs",
    "segment_files_job",
    "volume_files",
]


@dataclass(frozen=True)
class FileResult:
    """What became of one input: the paths written, or why it failed."""

    source: Path
    written: tuple[Path, ...] = ()
    error: str | None = None
    summary: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None


def output_paths(inputs: Sequence[Path], directory: Path) -> list[Path]:
    """``directory/<input file name>`` for each input; ValueError where two inputs share a
    name or an output would replace its input."""
    outputs = [Path(directory) / Path(source).name for source in inputs]
    names = [out.name for out in outputs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"Several inputs are named {', '.join(repeated)}: their outputs in {directory} would "
                         "overwrite each other.")
    for source, out in zip(inputs, outputs, strict=True):
        if out.resolve() == Path(source).resolve():
            raise ValueError(f"The output for {source} would replace the input: choose another --out-dir.")
    return outputs


def read_pairs(path: Path) -> list[tuple[Path, Path]]:
    """The ``image,labels`` rows of a CSV file, paths relative to the file's folder.

    A first row that does not name two volume files (e.g. ``image,labels``) is a header;
    blank lines are skipped.
    """
    path = Path(path)
    try:
        with path.open(newline="") as handle:
            rows = [(number, [cell.strip() for cell in row]) for number, row in enumerate(csv.reader(handle), 1)
                    if any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"Cannot read the pairs file {path}: {err}") from None
    if rows and not all(_is_volume_name(cell) for cell in rows[0][1]):
        rows = rows[1:]
    pairs = []
    for number, cells in rows:
        if len(cells) != 2 or not all(cells):
            raise ValueError(f"{path.name}, line {number}: expected 'image,labels', got {','.join(cells)!r}.")
        pairs.append((path.parent / cells[0], path.parent / cells[1]))
    if not pairs:
        raise ValueError(f"{path.name} lists no image,labels rows.")
    return pairs


def volume_files(folder: Path) -> list[Path]:
    """The volume files (:data:`~napari_crossd.io.volumes.SUFFIXES`) directly in ``folder``, by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder.")
    files = sorted(p for p in folder.iterdir() if p.is_file() and _is_volume_name(p.name))
    if not files:
        raise ValueError(f"{folder} holds no volume files ({', '.join(SUFFIXES)}).")
    return files


def segment_files_job(
    segmenter: Segmenter, inputs: Sequence[Path], outputs: Sequence[Path], *, spacing=None, client=None,
    block: int = DEFAULT_BLOCK, probabilities: Path | None = None, **settings,
) -> Job[list[FileResult]]:
    """Label each input with ``segmenter`` and write it on the input's grid (the CLI's and
    the Fine-tune widget's batch path).

    Args:
        segmenter: a trained segmenter.
        inputs, outputs: as :func:`process_files_job`.
        spacing: voxel size for every input (default: each file's own).
        client: a ``distributed.Client``: the blocks run on its cluster
            (:func:`.cluster.segment_on_cluster_job`, ``block``); None: here.
        probabilities: also write the per-class probabilities of a single input here.
        settings: ``tile``, ``overlap``, ``batch``, ``device`` (:func:`.segmenter.segment_job`).
    """
    if probabilities is not None and len(inputs) != 1:
        raise ValueError(f"Probabilities go to one file; {len(inputs)} inputs were given.")

    def process(volume: Volume, out: Path):
        labels, probs = yield from _segmentation_job(segmenter, volume, client, block, probabilities is not None,
                                                     settings)
        counts = ", ".join(f"{name} {int((labels == i + 1).sum())}" for i, name in enumerate(segmenter.class_names))
        extra = [(probabilities, probs, volume)] if probabilities is not None else []
        return [(out, labels, volume), *extra], f"voxels per class: {counts}"

    return (yield from process_files_job(inputs, outputs, process, spacing=spacing))


def _segmentation_job(segmenter, volume: Volume, client, block, probabilities: bool, settings: dict):
    if client is None:
        return segment_job(segmenter, volume.data, spacing=volume.spacing, probabilities=probabilities, **settings)
    return segment_on_cluster_job(client, segmenter, volume.data, spacing=volume.spacing, block=block,
                                  probabilities=probabilities, **settings)


def features_files_job(
    model: nn.Module, inputs: Sequence[Path], outputs: Sequence[Path], *, spacing=None, client=None,
    block: int = DEFAULT_BLOCK, stride: int = 1, pca: Path | None = None, **settings,
) -> Job[list[FileResult]]:
    """Features of each input, written on its grid (every ``stride``-th voxel's centre).

    Args:
        model: inflated 3D network.
        inputs, outputs, spacing, client, block: as :func:`segment_files_job` (a cluster
            computes ``stride`` 1 only).
        pca: also write the 3-channel PCA view of a single input here.
        settings: ``levels``, ``preset``, ``tile``, ``overlap``, ``batch``, ``device``
            (:func:`.features.features_job`).
    """
    if pca is not None and len(inputs) != 1:
        raise ValueError(f"The PCA view goes to one file; {len(inputs)} inputs were given.")
    if client is not None and stride != 1:
        raise ValueError("A cluster computes features on the image's own grid: use stride 1.")

    def process(volume: Volume, out: Path):
        if client is None:
            job = features_job(model, volume.data, spacing=volume.spacing, stride=stride, **settings)
        else:
            job = features_on_cluster_job(client, model, volume.data, spacing=volume.spacing,
                                          block=block, **settings)
        features = yield from job
        like = volume if stride == 1 else strided_grid(volume, stride)
        extra = [(pca, pca_rgb(features).transpose(3, 0, 1, 2), like)] if pca is not None else []
        return [(out, features, like), *extra], f"{volume.data.shape} voxels -> {features.shape[0]} channels"

    return (yield from process_files_job(inputs, outputs, process, spacing=spacing))


def _is_volume_name(cell: str) -> bool:
    try:
        volume_suffix(Path(cell))
    except ValueError:
        return False
    return True


# One volume's work: its job yields Progress and returns ([(path, data, grid to write it on)], summary).
Process = Callable[[Volume, Path], Job[tuple[list[tuple[Path, np.ndarray, Volume]], str]]]


def process_files_job(
    inputs: Sequence[Path], outputs: Sequence[Path], process: Process, *, spacing=None
) -> Job[list[FileResult]]:
    """Read each input, run ``process(volume, output)`` and write what it returns.

    Args:
        inputs: volume files (NIfTI, TIFF, NumPy).
        outputs: one path per input (checked for a known suffix before any work starts).
        process: given the :class:`~napari_crossd.io.Volume` and its output path, a job that
            returns the ``(path, data, like)`` triples to write (``like``: the grid) and a
            one-line summary.
        spacing: voxel size for every input (default: each file's own).

    Returns:
        One :class:`FileResult` per input, in order.
    """
    if len(inputs) != len(outputs):
        raise ValueError(f"{len(inputs)} inputs but {len(outputs)} outputs.")
    for out in outputs:
        volume_suffix(Path(out))
    results = []
    for index, (source, out) in enumerate(zip(map(Path, inputs), map(Path, outputs), strict=True)):
        yield Progress(index, len(inputs), f"{source.name}: reading ({index + 1}/{len(inputs)})", phase="files")
        try:
            volume = read_volume(source, spacing=spacing)
            writes, summary = yield from named_job(process(volume, out), f"{source.name} ({index + 1}/{len(inputs)})")
            written = tuple(write_volume(path, data, like) for path, data, like in writes)
            results.append(FileResult(source, written, summary=summary))
        except Exception as err:  # one bad file must not stop the others: it is named in the result
            results.append(FileResult(source, error=str(err) or type(err).__name__))
    yield Progress(len(inputs), len(inputs), f"{sum(r.ok for r in results)}/{len(inputs)} files done", phase="files")
    return results
