"""Atomic writes (napari_crossd.io.atomic) and the writers that use them: a failed write
leaves the earlier file or directory whole, no temporary is left behind, and what is
written has the usual permissions."""

from __future__ import annotations

import os
import stat

import nibabel as nib
import numpy as np
import pytest

from napari_crossd.io import atomic
from napari_crossd.io.atomic import atomic_directory, atomic_path


class Boom(RuntimeError):
    pass


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """A known umask for the test, restored afterwards."""
    previous = os.umask(0o027)
    yield 0o027
    os.umask(previous)


def test_file_appears_whole_with_the_usual_permissions(tmp_path, umask):
    target = tmp_path / "new" / "seg.nii.gz"  # a missing folder is made
    with atomic_path(target) as partial:
        assert partial.parent == target.parent and partial.name.endswith(".partial.nii.gz")
        assert not target.exists()  # nothing at the target until the block ends
        partial.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert mode(target) == 0o666 & ~umask  # not mkstemp's 0600
    assert os.listdir(target.parent) == ["seg.nii.gz"]


def test_failed_write_leaves_the_old_file_whole(tmp_path, umask):
    target = tmp_path / "model.pt"
    target.write_bytes(b"old and whole")
    os.chmod(target, 0o600)  # not what the umask gives
    with pytest.raises(Boom), atomic_path(target) as partial:
        partial.write_bytes(b"half")
        raise Boom
    assert target.read_bytes() == b"old and whole"
    assert os.listdir(tmp_path) == ["model.pt"]  # the temporary is gone
    with atomic_path(target) as partial:
        partial.write_bytes(b"replaced")
    assert target.read_bytes() == b"replaced"
    assert mode(target) == 0o600  # a replaced file keeps its mode
    with pytest.raises(IsADirectoryError, match="atomic_directory"), atomic_path(tmp_path):
        pass


def test_directory_appears_whole_with_the_usual_permissions(tmp_path, umask):
    target = tmp_path / "segmenter"
    with atomic_directory(target) as staging:
        (staging / "model.safetensors").write_bytes(b"weights")
        assert not target.exists()
    assert (target / "model.safetensors").read_bytes() == b"weights"
    assert mode(target) == 0o777 & ~umask  # not mkdtemp's 0700
    assert os.listdir(tmp_path) == ["segmenter"]


def test_failed_write_leaves_the_old_directory_whole(tmp_path, umask):
    target = tmp_path / "segmenter"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"old")
    with pytest.raises(Boom), atomic_directory(target) as staging:
        (staging / "model.safetensors").write_bytes(b"half")
        raise Boom
    assert os.listdir(target) == ["model.safetensors"] and (target / "model.safetensors").read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["segmenter"]
    with atomic_directory(target) as staging:
        (staging / "other.json").write_text("{}")
    assert os.listdir(target) == ["other.json"]  # replaced whole, not merged
    assert os.listdir(tmp_path) == ["segmenter"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"), atomic_directory(tmp_path / "file"):
        pass


def test_failed_swap_puts_the_old_directory_back(tmp_path, monkeypatch):
    """The old directory is moved aside before the new one moves in; if that fails, it comes back."""
    target = tmp_path / "segmenter"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"old")
    replace = os.replace

    def refuse_staging(source, destination):
        if str(source).endswith(".partial"):
            raise OSError("disk gone")
        replace(source, destination)

    monkeypatch.setattr(atomic.os, "replace", refuse_staging)
    with pytest.raises(OSError, match="disk gone"), atomic_directory(target) as staging:
        (staging / "model.safetensors").write_bytes(b"new")
    assert (target / "model.safetensors").read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["segmenter"]


def test_volume_and_napari_writers_keep_the_old_file_on_failure(tmp_path, monkeypatch):
    from napari_crossd._writer import write_labels
    from napari_crossd.io.volumes import write_volume

    labels = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    meta = {"scale": (1.0, 1.0, 1.0), "translate": (0.0, 0.0, 0.0)}
    volume = tmp_path / "volume.nii.gz"
    [written] = write_labels(str(tmp_path / "labels.nii.gz"), labels, meta)
    write_volume(volume, labels)
    save = nib.save

    def half_then_fail(image, filename):
        with open(filename, "wb") as handle:
            handle.write(b"\x1f\x8b half a file")
        raise Boom("disk full")

    monkeypatch.setattr(nib, "save", half_then_fail)
    with pytest.raises(Boom):
        write_labels(written, labels + 1, meta)
    with pytest.raises(Boom):
        write_volume(volume, labels + 1)
    monkeypatch.setattr(nib, "save", save)
    np.testing.assert_array_equal(np.asarray(nib.load(written).dataobj).transpose(2, 1, 0), labels)
    np.testing.assert_array_equal(np.asarray(nib.load(volume).dataobj).transpose(2, 1, 0), labels)
    assert sorted(os.listdir(tmp_path)) == ["labels.nii.gz", "volume.nii.gz"]
