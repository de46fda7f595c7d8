"""Atomic writes: a file or a directory appears whole at its path, or not at all.

Everything napari-crossd saves (volumes, models, segmenters, training checkpoints) is
first written beside its target under a temporary name and renamed into place once it is
complete, so a failed or interrupted save leaves an earlier file at the same path whole.
The rename is atomic on one file system, which is why the temporary lives in the target's
own directory. This guards against errors and killed processes; it does not fsync, so a
power cut may still lose the newest write. This module imports nothing heavy: the napari
writer uses it too.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_directory", "atomic_path"]


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; renamed to ``path`` on success.

    On an exception inside the block the temporary file is removed and ``path`` is left
    as it was. The temporary keeps ``path``'s suffixes (``.nii.gz``, ``.npy``), so writers
    that choose a format by the file name still work. A replaced file keeps its permission
    bits; a new one gets the usual ones (0666 less the umask).

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "notes.txt"
        >>> with atomic_path(target) as partial:
        ...     _ = partial.write_text("whole")
        >>> target.read_text()
        'whole'
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; atomic_path writes files (see atomic_directory)")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".partial{suffix}", dir=path.parent)
    os.close(handle)
    partial = Path(name)
    try:
        yield partial
        # mkstemp makes 0600: give the file the mode the target had, or the usual one.
        os.chmod(partial, _mode_of(path, 0o666))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary directory to fill; it replaces the directory ``path`` on success.

    An existing directory at ``path`` is swapped out only once the new one is complete:
    it is renamed aside, the new one renamed in, and the old one deleted; should the second
    rename fail, the old directory is put back.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory.")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield staging
        # mkdtemp makes 0700, as mkstemp does for files.
        os.chmod(staging, _mode_of(path, 0o777))
        if path.exists():
            _swap(staging, path)
        else:
            os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap(staging: Path, path: Path) -> None:
    """Replace the directory ``path`` by ``staging``: a non-empty directory cannot be renamed over."""
    previous = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".previous", dir=path.parent))
    aside = previous / path.name
    try:
        os.replace(path, aside)
        try:
            os.replace(staging, path)
        except BaseException:
            os.replace(aside, path)
            raise
    except BaseException:
        if not aside.exists():  # the old directory is back at path (or never left it)
            previous.rmdir()
        raise
    shutil.rmtree(previous, ignore_errors=True)


def _mode_of(path: Path, default: int) -> int:
    """Permission bits of ``path`` if it exists, else ``default`` less the umask."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return default & ~_umask()


def _umask() -> int:
    # os.umask can only be read by setting it, which races with threads creating files
    # (they would get umask 0 meanwhile); Linux reports it in /proc without changing it.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
