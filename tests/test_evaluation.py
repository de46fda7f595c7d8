"""The simulated users of napari_crossd.evaluation: strokes and their corrections."""

from __future__ import annotations

import numpy as np

from napari_crossd import evaluation


def _toy_truth() -> np.ndarray:
    truth = np.ones((20, 24, 24), dtype=np.uint8)
    truth[:, 6:18, 6:18] = 2
    truth[:, 10:14, 10:14] = 3
    return truth


def test_paint_strokes_span_sets_the_painted_range():
    truth = _toy_truth()
    strokes = evaluation.paint_strokes(truth, slices=5, seed=0, span=(0.2, 0.8))
    painted = np.flatnonzero((strokes > 0).any(axis=(1, 2)))
    assert painted.tolist() == evaluation.painted_slices(20, 5, (0.2, 0.8)).tolist() == [4, 7, 10, 13, 16]
    assert np.all(strokes[strokes > 0] == truth[strokes > 0])  # strokes stay inside their class
    assert np.array_equal(evaluation.paint_strokes(truth, seed=3), evaluation.paint_strokes(truth, seed=3))


def test_paint_corrections_paints_the_worst_unpainted_slices_with_the_true_class():
    truth = _toy_truth()
    strokes = evaluation.paint_strokes(truth, slices=3, seed=0)
    prediction = truth.copy()
    prediction[1, 6:18, 6:18] = 1  # slice 1: many errors; slice 2 (painted) and 5: fewer
    prediction[2, 6:18, 6:18] = 1
    prediction[5, 10:14, 10:14] = 2
    prediction[8, 10:12, 10:12] = 1
    corrections = evaluation.paint_corrections(truth, prediction, strokes, worst=2, seed=0)
    corrected = np.flatnonzero((corrections > 0).any(axis=(1, 2)))
    assert corrected.tolist() == [1, 5]
    painted = corrections > 0
    assert np.all(corrections[painted] == truth[painted])
    assert np.all(prediction[painted] != truth[painted])  # only where the prediction is wrong
    assert set(np.unique(corrections[1])) == {0, 2, 3}
