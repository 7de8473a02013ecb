"""The sequence metrics (scripts/evaluation/sequence_metrics.py) on analytic sequences whose values are worked out
by hand in each test."""

import numpy as np
import pytest

from scripts.data.nifti import InputError
from scripts.evaluation.sequence_metrics import frame_tre_mm, sequence_metrics

SHAPE = (4, 5, 3)


def _uniform(vectors) -> np.ndarray:
    """(T, 3) -> (T, X, Y, Z, 3): one constant displacement per frame."""
    return np.broadcast_to(np.asarray(vectors, float)[:, None, None, None, :], (len(vectors), *SHAPE, 3)).copy()


def test_constant_offset_error_has_perfect_consistency_and_no_jitter():
    true = _uniform([[0, 0, 0], [1, 0, 0], [3, 0, 0], [6, 0, 0]])  # true changes 1, 2, 3 mm along x
    pred = true + np.array([0.0, 2.0, 0.0])  # a steady 2 mm error: every change right
    pts = np.zeros((4, 2, 3))
    m = sequence_metrics(pred, true, np.ones(SHAPE, bool), pts + [0, 2, 0], pts)
    assert m["interframe_error_mm"] == [0.0, 0.0, 0.0]
    assert m["consistency"] == 1.0 and m["jitter_mm"] == 0.0
    assert m["tre_mm"] == [2.0, 2.0, 2.0, 2.0] and m["tre_sd_mm"] == 0.0


def test_no_change_predicted_scores_zero_consistency_and_known_jitter():
    true = _uniform([[0, 0, 0], [1, 0, 0], [3, 0, 0], [6, 0, 0]])
    pred = np.zeros_like(true)  # the first frame's field kept: error e_t = -true_t
    m = sequence_metrics(pred, true, np.ones(SHAPE, bool), np.zeros((4, 1, 3)), np.zeros((4, 1, 3)))
    assert m["interframe_error_mm"] == [1.0, 2.0, 3.0]
    assert m["consistency"] == pytest.approx(0.0)
    # second differences of e = (0, -1, -3, -6): |-3 + 2 - 0| = 1, |-6 + 6 - 1| = 1
    assert m["jitter_mm"] == pytest.approx(1.0)


def test_alternating_error_is_jitter_and_half_consistency():
    true = _uniform([[0, 0, 0], [2, 0, 0], [4, 0, 0]])  # 2 mm per frame
    pred = true + _uniform([[0, 0, 0], [0, 0, 1], [0, 0, 0]])  # a 1 mm blip at frame 1, along z
    m = sequence_metrics(pred, true, np.ones(SHAPE, bool), np.zeros((3, 1, 3)), np.zeros((3, 1, 3)))
    assert m["interframe_error_mm"] == [1.0, 1.0]
    assert m["consistency"] == pytest.approx(1 - 2.0 / 4.0)
    assert m["jitter_mm"] == pytest.approx(2.0)  # |0 - 2 * 1 + 0|


def test_masks_per_frame_restrict_the_comparison():
    true = _uniform([[0, 0, 0], [1, 0, 0]])
    pred = true.copy()
    pred[1, 0, 0, 0] += [0, 4, 0]  # wrong at one voxel of frame 1
    mask = np.zeros((2, *SHAPE), bool)
    mask[:, :2] = True
    mask[0, 0, 0, 0] = False  # that voxel is outside frame 0's mask: not compared
    m = sequence_metrics(pred, true, mask, np.zeros((2, 1, 3)), np.zeros((2, 1, 3)))
    assert m["interframe_error_mm"] == [0.0]
    mask[0, 0, 0, 0] = True
    m = sequence_metrics(pred, true, mask, np.zeros((2, 1, 3)), np.zeros((2, 1, 3)))
    assert m["interframe_error_mm"] == [pytest.approx(4.0 / mask[0].sum())]


def test_tre_leaves_missing_landmarks_out_and_success_counts_large_motion_frames():
    true = np.zeros((3, 2, 3))
    pred = np.array([[[3, 0, 0], [0, 4, 0]], [[0, 0, 6], [np.nan] * 3], [[1, 0, 0], [0, 1, 0]]], float)
    assert frame_tre_mm(pred, true).tolist() == [3.5, 6.0, 1.0]
    m = sequence_metrics(
        _uniform([[0, 0, 0]] * 3), _uniform([[0, 0, 0]] * 3), np.ones(SHAPE, bool), pred, true, [0, 7, 9]
    )
    assert m["large_motion_frames"] == 2 and m["large_motion_successes"] == 1 and m["success_rate"] == 0.5
    assert m["tre_sd_mm"] == pytest.approx(np.std([3.5, 6.0, 1.0]))


def test_mismatched_shapes_are_refused():
    with pytest.raises(InputError, match="T >= 2"):
        sequence_metrics(
            _uniform([[0, 0, 0]]), _uniform([[0, 0, 0]]), np.ones(SHAPE, bool), np.zeros((1, 1, 3)), np.zeros((1, 1, 3))
        )
    with pytest.raises(InputError, match="frames"):
        sequence_metrics(
            _uniform([[0, 0, 0]] * 2),
            _uniform([[0, 0, 0]] * 2),
            np.ones(SHAPE, bool),
            np.zeros((3, 1, 3)),
            np.zeros((3, 1, 3)),
        )
