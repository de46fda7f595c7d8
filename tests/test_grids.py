"""Voxel grids (napari_crossd.io.grids): napari's canonical view of a NIfTI file, a cut of it,
a strided output of it, and each written back on the file's own grid."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from napari_crossd.io import Volume
from napari_crossd.io.grids import canonical_layer, canonical_zyx, crop_grid, strided_grid, to_source_grid

# Voxel axes (i, j, k) of the file run (A, L, I): y, then -x, then -z; 2 x 3 x 4 mm voxels.
_ALI = np.array([[0.0, -3.0, 0.0, 40.0], [2.0, 0.0, 0.0, -20.0], [0.0, 0.0, -4.0, 30.0], [0.0, 0.0, 0.0, 1.0]])


@pytest.fixture
def ali_image() -> nib.Nifti1Image:
    data = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    return nib.Nifti1Image(data, _ALI)


def _world(affine: np.ndarray, voxel) -> np.ndarray:
    return (affine @ [*voxel, 1.0])[:3]


def test_canonical_view_is_ras_reversed_with_canonical_spacing(ali_image):
    data, spacing, affine = canonical_zyx(ali_image)
    assert "".join(nib.aff2axcodes(affine)) == "RAS"
    assert data.shape == (7, 5, 6)  # (Z, Y, X) = (S, A, R): k, i, j
    assert spacing == (4.0, 2.0, 3.0)
    source = np.asanyarray(ali_image.dataobj)
    # Canonical voxel (z, y, x) and the source voxel at the same world position hold the same value.
    for zyx in [(0, 0, 0), (6, 4, 5), (2, 3, 1)]:
        position = _world(affine, zyx[::-1])
        ijk = np.rint(np.linalg.solve(_ALI[:3, :3], position - _ALI[:3, 3])).astype(int)
        assert data[zyx] == source[tuple(ijk)]


def test_canonical_layer_writes_back_voxel_for_voxel(ali_image, tmp_path):
    data, grid = canonical_layer(ali_image, tmp_path / "a.nii.gz")
    assert grid["scale"] == (4.0, 2.0, 3.0)
    assert grid["translate"] == tuple(canonical_zyx(ali_image)[2][:3, 3][::-1])
    assert grid["metadata"]["nifti"]["axcodes"] == "ALI"
    back = to_source_grid(data, grid)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), np.asanyarray(ali_image.dataobj))
    np.testing.assert_allclose(back.affine, _ALI)
    with pytest.raises(ValueError, match="does not match its source grid"):
        to_source_grid(data[:, :2], grid)


def test_a_cut_of_the_canonical_view_is_a_box_of_the_source_file(ali_image, tmp_path):
    data, grid = canonical_layer(ali_image, tmp_path / "a.nii.gz")
    zyx = (slice(1, 5), slice(2, None), slice(0, 4))
    cut = crop_grid(grid, zyx)
    assert cut["scale"] == grid["scale"]
    written = to_source_grid(data[zyx], cut)
    source = np.asanyarray(ali_image.dataobj)
    # The box in source voxels: i (A) <- y, j (L = reversed x) <- x, k (I = reversed z) <- z.
    box = (slice(2, 5), slice(6 - 4, 6 - 0), slice(7 - 5, 7 - 1))
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), source[box])
    np.testing.assert_allclose(_world(written.affine, (0, 0, 0)), _world(_ALI, [b.start for b in box]))
    # The layer's translate is the world position of the cut's voxel (0, 0, 0), in (Z, Y, X).
    canonical_affine = grid["metadata"]["nifti"]["canonical_affine"]
    expected = _world(canonical_affine, [s.start for s in zyx[::-1]])[::-1]
    np.testing.assert_allclose(cut["translate"], expected)


def test_strided_grid_puts_each_voxel_at_its_cube_centre(tmp_path):
    affine = np.diag([0.5, 1.0, 2.0, 1.0])
    affine[:3, 3] = (10.0, 20.0, 30.0)
    image = nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), affine)
    volume = Volume(np.zeros((8, 8, 8)), (2.0, 1.0, 0.5), tmp_path / "v.nii.gz", image)
    strided = strided_grid(volume, 4)
    assert strided.spacing == (8.0, 4.0, 2.0)
    np.testing.assert_allclose(strided.nifti.affine[:3, :3], affine[:3, :3] * 4)
    np.testing.assert_allclose(_world(strided.nifti.affine, (0, 0, 0)), _world(affine, (1.5, 1.5, 1.5)))
    plain = strided_grid(Volume(np.zeros((8, 8, 8)), None, tmp_path / "v.npy"), 2)
    assert plain.spacing is None and plain.nifti is None


@pytest.mark.parametrize(
    ("values", "stored"),
    [
        (np.ones((2, 2, 2), bool), np.uint8),
        (np.full((2, 2, 2), 7, np.int64), np.uint8),
        (np.full((2, 2, 2), 300, np.int64), np.int32),
        (np.ones((2, 2, 2), np.float16), np.float32),
        (np.ones((2, 2, 2), np.float32), np.float32),
    ],
)
def test_outputs_are_stored_in_types_nifti_viewers_read(values, stored):
    image = to_source_grid(values, {"scale": (2.0, 1.0, 1.0), "translate": (0.0, 5.0, 0.0)})
    assert np.asanyarray(image.dataobj).dtype == stored
    np.testing.assert_allclose(image.affine[:3, 3], (0.0, 5.0, 0.0))
    np.testing.assert_allclose(np.diag(image.affine)[:3], (1.0, 1.0, 2.0))
