"""Metric tests on hand-built volumes; every expected value is worked out by hand in the comments."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from scripts.data.nifti import InputError
from scripts.evaluation.metrics import (
    aggregate,
    case_metrics,
    centroid,
    centroid_distances_mm,
    challenge_score,
    ddf_error_mm,
    hd95,
    jacobian_determinant,
    landmark_errors,
    n_kept,
    percent_nonpositive_jacobian,
    resize_linear,
    rms,
    soft_dice,
    std_log_jacobian,
)


def labels(shape, *channels):
    """(C, *shape) label; each channel is None (empty) or a tuple of 3 slices set to 1."""
    out = np.zeros((len(channels), *shape))
    for c, box in enumerate(channels):
        if box is not None:
            out[(c, *box)] = 1.0
    return out


def block(x, y, z, size=2):
    """Slices of a size³ block whose lowest corner is (x, y, z)."""
    return (slice(x, x + size), slice(y, y + size), slice(z, z + size))


GLAND = (slice(2, 8), slice(2, 8), slice(2, 8))


# ---------------------------------------------------------------- centroids and landmark errors


def test_fractional_centroid_is_truncated_in_official_mode():
    mask = np.zeros((10, 10, 10))
    mask[[2, 3, 5], 5, 5] = 1.0  # x indices 2, 3, 5: sum 10, count 3 -> 10/3 = 3.33
    assert centroid(mask, "official").tolist() == [3, 5, 5]  # 10 // 3 = 3
    assert centroid(mask, "float") == pytest.approx([10 / 3, 5, 5])
    fixed = np.zeros((1, 10, 10, 10))
    fixed[0, 3, 5, 5] = 1.0  # centroid (3, 5, 5)
    assert landmark_errors(fixed, mask[None], "official") == [0]  # |3-3| + 0 + 0 = 0
    assert landmark_errors(fixed, mask[None], "float") == pytest.approx([(10 / 3 - 3) / 3])  # (1/3) / 3 = 1/9


def test_soft_voxels_at_or_below_half_are_not_in_the_centroid():
    mask = np.zeros((10, 10, 10))
    mask[2, 2, 2] = 0.9
    mask[8, 8, 8] = 0.5  # not > 0.5
    assert centroid(mask, "float").tolist() == [2, 2, 2]


def test_shift_1_1_0_scores_0_official_and_two_thirds_float():
    fixed = labels((10, 10, 10), block(4, 4, 4))  # centroid (4.5, 4.5, 4.5), official (4, 4, 4)
    warped = labels((10, 10, 10), block(5, 5, 4))  # centroid (5.5, 5.5, 4.5), official (5, 5, 4)
    assert landmark_errors(fixed, warped, "official") == [0]  # (1 + 1 + 0) // 3 = 0
    assert landmark_errors(fixed, warped, "float") == pytest.approx([2 / 3])  # (1 + 1 + 0) / 3


def test_shift_2_0_minus1_scores_1_and_3_3_0_scores_2():
    fixed = labels((10, 10, 10), block(4, 4, 4), block(4, 4, 4))
    warped = labels((10, 10, 10), block(6, 4, 3), block(7, 7, 4))
    assert landmark_errors(fixed, warped, "official") == [1, 2]  # (2+0+1)//3 = 1; (3+3+0)//3 = 2
    assert landmark_errors(fixed, warped, "float") == pytest.approx([1.0, 2.0])


def test_landmark_vanishing_after_warping():
    # channel 0 gland (identical), channel 1 a landmark voxel at (4, 5, 7) that is empty after warping
    fixed = labels((10, 10, 10), GLAND, (slice(4, 5), slice(5, 6), slice(7, 8)))
    warped = labels((10, 10, 10), GLAND, None)
    m_off = case_metrics(fixed, warped, fixed, "official", spacing=(1, 1, 1))
    m_flt = case_metrics(fixed, warped, fixed, "float", spacing=(1, 1, 1))
    # empty mask -> centroid (0, 0, 0): error (4 + 5 + 7) // 3 = 5 (official), 16 / 3 (float)
    assert m_off["errors"] == [0, 5]
    assert m_flt["errors"] == pytest.approx([0.0, 16 / 3])
    # the clinical TRE leaves the vanished landmark out and counts it
    assert m_off["n_landmarks_used"] == 0
    assert m_off["n_landmarks_empty_warped"] == 1 and m_off["n_landmarks_empty_fixed"] == 0
    assert math.isnan(m_off["tre_mm"]) and math.isnan(m_off["landmark_mm"][0])
    # official HD95: the gland matches exactly -> 0. The vanished landmark leaves the warped mask empty: the
    # organisers' distance transform has no voxel to measure to, and scipy then measures from a point one step
    # before the array's first voxel on the leading length-1 axis: sqrt(1 + 4² + 5² + 7²) for the voxel (4, 5, 7)
    assert m_off["hd95_channels"] == pytest.approx([0.0, math.sqrt(1 + 16 + 25 + 49)])
    # float mode (the textbook surface HD95): an empty surface scores 0
    assert m_flt["hd95_channels"] == [0.0, 0.0]


def test_references_compare_raw_indices_of_two_grids_and_resize_arrays():
    # fixed grid 12³, moving grid 6³. Landmark voxel at index (2, 2, 2) in both: physically different
    # places, but the official references compare raw indices.
    fixed = labels((12, 12, 12), (slice(4, 10),) * 3, (slice(2, 3),) * 3)
    moving = labels((6, 6, 6), (slice(2, 4),) * 3, (slice(2, 3),) * 3)
    m = case_metrics(fixed, fixed, moving, "official")
    # gland: moving centroid 2.5 -> 2, fixed 6.5 -> 6: (4+4+4)//3 = 4; landmark: 0
    assert m["errors0"] == [4, 0]
    # HD95_0 resizes the moving array 6³ -> 12³: output j samples input j/2 - 0.25 linearly (mirror padding
    # at the ends, which touches nothing here), so values at input indices a..b reach outputs with
    # a - 1 < j/2 - 0.25 < b + 1. Gland 2..3 -> 3..8 per axis, against the fixed 4..9. Distances (whole masks,
    # see hd95_official), each way: 125 overlap voxels at 0, 75 at 1, 15 at sqrt(2), 1 at sqrt(3). Pooled 432
    # values sorted: 0..249 = 0, 250..399 = 1, 400..429 = sqrt(2); 0.95 * 431 = 409.45 -> sqrt(2).
    assert m["hd95_0_channels"][0] == pytest.approx(math.sqrt(2))
    # landmark 2 -> outputs 3..6 per axis (64 voxels); each lies at offsets (a, b, c), a, b, c in 1..4, from the
    # fixed voxel (2, 2, 2), which lies sqrt(3) from the nearest of them
    offsets = np.arange(1, 5)
    d = np.sqrt(offsets[:, None, None] ** 2 + offsets[None, :, None] ** 2 + offsets[None, None, :] ** 2).ravel()
    assert m["hd95_0_channels"][1] == pytest.approx(np.percentile(np.r_[d, math.sqrt(3)], 95))


def test_resize_is_scikit_image_resize():
    # upsampling [0, 1] -> 4 voxels: outputs sample inputs -0.25, 0.25, 0.75, 1.25; mirror padding reflects
    # -0.25 to 0.25 and 1.25 to 0.75 (scipy "mirror" = scikit-image "reflect")
    up = resize_linear(np.array([0.0, 1.0]).reshape(1, 2, 1, 1), (4, 1, 1))
    np.testing.assert_allclose(up.ravel(), [0.25, 0.25, 0.75, 0.75], atol=1e-12)
    # downsampling [0, 0, 1, 1] -> 2: first a Gaussian of sigma (4/2 - 1)/2 = 0.5 (weights exp(-2x²) for
    # |x| <= 2, normalised), mirror padded: filtered = [2 w2, w1 + w2, w0 + w1 + w2, w0 + 2 w1]; then outputs
    # sample inputs 0.5 and 2.5: the means of filtered[0:2] and filtered[2:4]
    w0, w1, w2 = (math.exp(-2 * x * x) / (1 + 2 * math.exp(-2) + 2 * math.exp(-8)) for x in (0, 1, 2))
    down = resize_linear(np.array([0.0, 0.0, 1.0, 1.0]).reshape(1, 4, 1, 1), (2, 1, 1))
    np.testing.assert_allclose(down.ravel(), [(w1 + 3 * w2) / 2, (2 * w0 + 3 * w1 + w2) / 2], atol=1e-12)


@pytest.mark.parametrize("label_set", ["seed0_fixed_larger", "seed0_fixed_smaller"])
def test_official_mode_equals_the_organisers_code(label_set):
    # the organisers' own evaluation code (TensorFlow 2.13, Keras 2, scikit-image 0.20) ran on these labels;
    # benchmarks/muregpro_official.py holds the commands that made both files
    from benchmarks.muregpro_official import METRICS, ours

    folder = Path(__file__).parent / "data" / "muregpro_official"
    theirs = json.loads((folder / f"{label_set}.json").read_text())
    mine = ours(folder / f"{label_set}.npz")
    for name in METRICS:
        assert mine["metrics"][name] == pytest.approx(theirs["metrics"][name], abs=1e-6), name
    for key, table in theirs["per_case"].items():
        np.testing.assert_allclose(mine["per_case"][key], table, atol=1e-6, err_msg=key)
    # the sets hold what a re-implementation can get wrong: a vanished landmark (case 1, channel 1) scores
    # scipy's no-background distances, and the warped channel without a zero voxel (case 5, channel 5)
    assert theirs["per_case"]["hd95"][1][1] > 5 and theirs["per_case"]["hd95"][5][5] > 0


# ---------------------------------------------------------------- per-case and aggregate rules


def test_rms_uses_integer_mean_of_squares_in_official_mode():
    assert rms([1, 2], "official") == pytest.approx(math.sqrt(2))  # (1 + 4) // 2 = 2
    assert rms([1, 2], "float") == pytest.approx(math.sqrt(2.5))
    assert rms([], "official") == 0.0


def per_case(dsc, errors, errors0=None, hd=0.0, hd0=1.0):
    return {"dsc": dsc, "errors": errors, "errors0": errors0 or [9] * len(errors), "hd95": hd, "hd95_0": hd0}


def test_68_percent_rules_with_7_cases():
    assert n_kept(7) == 5  # 0.68 * 7 = 4.76 -> 5
    assert n_kept(6) == 4  # 4.08 -> 4
    dsc = [0.3, 0.9, 0.5, 0.7, 0.4, 0.8, 0.6]
    errs = [0, 6, 2, 4, 1, 5, 3]  # every channel of case i has error errs[i]: per-case TRE = errs[i]
    cases = [per_case(d, [e] * 7) for d, e in zip(dsc, errs)]
    out = aggregate(cases, "official")
    assert out["metrics"]["DSC"] == pytest.approx(4.2 / 7)  # (0.3+...+0.9) = 4.2
    assert out["metrics"]["RDSC"] == pytest.approx((0.9 + 0.8 + 0.7 + 0.6 + 0.5) / 5)  # best 5
    assert out["metrics"]["TRE"] == pytest.approx(21 / 7)  # 0+...+6 = 21
    assert out["metrics"]["RTRE"] == pytest.approx((0 + 1 + 2 + 3 + 4) / 5)  # lowest 5
    assert out["per_case"]["tre"] == pytest.approx(errs)


def test_rts_keeps_the_lowest_68_percent_of_7_channels():
    # one case, 7 channels; the lowest round(0.68*7) = 5 errors are 1, 2, 3, 4, 6
    out_off = aggregate([per_case(1.0, [9, 1, 7, 2, 3, 4, 6])], "official")
    out_flt = aggregate([per_case(1.0, [9, 1, 7, 2, 3, 4, 6])], "float")
    assert out_off["metrics"]["RTs"] == pytest.approx(math.sqrt(13))  # 1+4+9+16+36 = 66; 66 // 5 = 13
    assert out_flt["metrics"]["RTs"] == pytest.approx(math.sqrt(13.2))  # 66 / 5
    assert out_off["metrics"]["TRE"] == pytest.approx(math.sqrt(28))  # 66+49+81 = 196; 196 / 7 = 28


def test_channels_zero_in_every_case_are_dropped():
    # channel 1 has error 0 in both cases: dropped, so case TREs are 3 and 5 (not sqrt(9//2), sqrt(25//2))
    out = aggregate([per_case(1.0, [3, 0]), per_case(1.0, [5, 0])], "official")
    assert out["kept_channels"] == [0]
    assert out["per_case"]["tre"] == [3.0, 5.0]
    # not dropped when one case has a non-zero error there: (9 + 0) // 2 = 4 -> 2; (25 + 1) // 2 = 13
    out = aggregate([per_case(1.0, [3, 0]), per_case(1.0, [5, 1])], "official")
    assert out["per_case"]["tre"] == pytest.approx([2.0, math.sqrt(13)])


def test_score_and_clipping():
    metrics = {"DSC": 0.8, "RDSC": 0.9, "TRE": 2.0, "RTRE": 3.0, "RTs": 0.0, "HD95": 5.0}
    refs = {"TRE_0": 4.0, "RTRE_0": 2.0, "RTs_0": 1.0, "HD95_0": 10.0}
    # 0.2*0.8 + 0.1*0.9 + 0.3*(1-0.5) + 0.1*(1-clip(1.5)=0) + 0.1*(1-0) + 0.2*(1-0.5)
    # = 0.16 + 0.09 + 0.15 + 0 + 0.1 + 0.1 = 0.6
    assert challenge_score(metrics, refs) == pytest.approx(0.6)
    # zero references: metric 0 -> full term, metric > 0 -> no term
    zero = {"TRE_0": 0.0, "RTRE_0": 0.0, "RTs_0": 0.0, "HD95_0": 0.0}
    assert challenge_score({**metrics, "TRE": 0.0}, zero) == pytest.approx(0.16 + 0.09 + 0.3 + 0.1)


def test_aggregate_score_of_a_perfect_registration_is_1():
    out = aggregate([per_case(1.0, [0, 0], [3, 3], hd=0.0, hd0=2.0)] * 3, "official")
    assert out["metrics"]["score"] == pytest.approx(1.0)
    assert out["references"]["TRE_0"] == pytest.approx(3.0)  # sqrt((9+9)//2)


def test_bad_mode_is_an_input_error():
    with pytest.raises(InputError, match="mode"):
        centroid(np.zeros((2, 2, 2)), "int")


# ---------------------------------------------------------------- overlap and surface distance


def test_dice_of_two_boxes_with_known_overlap():
    a = labels((10, 10, 10), block(2, 2, 2, 4))[0]  # 64 voxels
    b = labels((10, 10, 10), block(3, 2, 2, 4))[0]  # shifted by 1 in x: overlap 3*4*4 = 48
    assert soft_dice(a, b) == pytest.approx(2 * 48 / 128)  # 0.75
    assert soft_dice(a, 0.5 * b) == pytest.approx(2 * 0.5 * 48 / (64 + 32))  # soft: 0.5
    assert soft_dice(np.zeros(3), np.zeros(3)) == 0.0


def test_hd95_nested_boxes():
    # A = 5³ box at 1..5, B = 3³ box at 2..4 inside it. Surfaces: A's shell (125-27 = 98 voxels), B minus
    # its centre (26). A shell -> B surface: 54 face voxels at 1, 36 edge voxels at sqrt(2), 8 corners at
    # sqrt(3); B surface -> A shell: 26 at 1. Pooled 124 values: indices 0..79 = 1, 80..115 = sqrt(2),
    # 116..123 = sqrt(3); the 95th percentile sits at 0.95*123 = 116.85 -> sqrt(3).
    a = labels((8, 8, 8), block(1, 1, 1, 5))[0] > 0
    b = labels((8, 8, 8), block(2, 2, 2, 3))[0] > 0
    assert hd95(a, b) == pytest.approx(math.sqrt(3))


def test_hd95_interpolates_between_distances():
    # two parallel lines (1 voxel thick: all surface) 3 apart in x, offset by 1 in y:
    # A: x=1, y=1..20; B: x=4, y=2..21. Each side: 19 voxels at 3, one end voxel at sqrt(9+1).
    # 40 values sorted: 0..37 = 3, 38..39 = sqrt(10); 0.95*39 = 37.05 -> 3 + 0.05*(sqrt(10)-3)
    a = np.zeros((6, 23, 3), bool)
    b = np.zeros((6, 23, 3), bool)
    a[1, 1:21, 1] = True
    b[4, 2:22, 1] = True
    assert hd95(a, b) == pytest.approx(3 + 0.05 * (math.sqrt(10) - 3))
    assert hd95(a, np.zeros_like(b)) == 0.0  # an empty surface scores 0


def test_case_hd95_thresholds_soft_labels_above_zero():
    # warped gland = fixed gland plus a faint (0.1) one-voxel-thick shell at x = 8: the "> 0" mask
    # grows by one plane, which a "> 0.5" mask would not see.
    fixed = labels((10, 10, 10), GLAND)
    warped = fixed.copy()
    warped[0, 8, 2:8, 2:8] = 0.1
    m = case_metrics(fixed, warped, fixed, "official")
    # fixed surface 6³-4³ = 152 voxels, warped surface (7x6x6 box) 252-80 = 172 voxels. Only voxels of
    # one surface off the other are non-zero: the fixed x=7 face interior (4x4 = 16 voxels, inside the
    # warped box: nearest warped surface 1 away) and the warped x=8 face (36 voxels, 1 from x=7 face).
    # Sorted: 272 zeros then 52 ones; the 95th percentile sits at 0.95*323 = 306.85 > 271 -> 1.
    assert m["hd95"] == pytest.approx(1.0)
    assert m["dsc"] == pytest.approx(2 * 216 / (216 + 216 + 3.6))  # soft: the shell adds 36*0.1 to the sum


# ---------------------------------------------------------------- millimetres and fields


def test_clinical_tre_in_mm_with_anisotropic_spacing():
    fixed = labels((10, 10, 10), GLAND, block(2, 2, 2, 1), block(1, 1, 1, 1))
    warped = labels((10, 10, 10), GLAND, block(5, 6, 2, 1), None)
    out = centroid_distances_mm(fixed, warped, spacing=(1.0, 2.0, 3.0), channels=[1, 2])
    # shift (3, 4, 0) voxels -> (3, 8, 0) mm -> sqrt(73); channel 2 vanished: excluded and counted
    assert out["distances"][0] == pytest.approx(math.sqrt(73))
    assert out["tre_mm"] == pytest.approx(math.sqrt(73))
    assert (out["n_used"], out["n_empty_fixed"], out["n_empty_warped"]) == (1, 0, 1)


def test_field_with_a_known_fold():
    # u_x = 3 on the plane x = 5, 0 elsewhere. Central differences: du_x/dx = (3-0)/2 at x = 4 -> det 2.5;
    # (0-3)/2 at x = 6 -> det -0.5 (fold); 0 at x = 5 -> det 1; elsewhere det 1.
    ddf = np.zeros((3, 10, 10, 10))
    ddf[0, 5] = 3.0
    det = jacobian_determinant(ddf)
    assert det[4] == pytest.approx(np.full((10, 10), 2.5))
    assert det[6] == pytest.approx(np.full((10, 10), -0.5))
    assert percent_nonpositive_jacobian(ddf) == pytest.approx(10.0)  # 100 of 1000 voxels
    # positive voxels: 100 with log 2.5, 800 with log 1 = 0: std = log(2.5) * sqrt(p(1-p)), p = 1/9
    assert std_log_jacobian(ddf) == pytest.approx(math.log(2.5) * math.sqrt(8) / 9)


def test_jacobian_of_a_shear_and_a_scaling():
    # u = (0.5 y, 0, -0.5 z): J = [[1, 0.5, 0], [0, 1, 0], [0, 0, 0.5]] -> det 0.5 everywhere (exact for linear u)
    x, y, z = np.meshgrid(np.arange(6.0), np.arange(6.0), np.arange(6.0), indexing="ij")
    ddf = np.stack([0.5 * y, 0 * y, -0.5 * z])
    assert jacobian_determinant(ddf) == pytest.approx(np.full((6, 6, 6), 0.5))
    assert std_log_jacobian(ddf) == pytest.approx(0.0)


def test_field_error_inside_the_gland_in_mm():
    true = np.zeros((3, 10, 10, 10))
    pred = np.zeros((3, 10, 10, 10))
    pred[0], pred[1] = 3.0, 2.0  # (3, 2, 0) voxels -> (3*1, 2*2, 0) mm = 5 mm everywhere
    pred[:, 0] = 50.0  # large errors outside the gland must not count
    gland = labels((10, 10, 10), GLAND)[0] > 0.5
    assert ddf_error_mm(pred, true, gland, (1.0, 2.0, 0.5)) == pytest.approx({"mean": 5.0, "p95": 5.0, "max": 5.0})


def test_field_error_p95_is_the_95th_percentile_of_the_error_norms():
    true = np.zeros((3, 10, 10, 1))
    pred = np.zeros((3, 10, 10, 1))
    pred[2] = np.arange(1.0, 101.0).reshape(10, 10, 1)  # errors 1, 2, ..., 100 mm along z, unit spacing
    err = ddf_error_mm(pred, true, np.ones((10, 10, 1), bool), (1.0, 1.0, 1.0))
    # linear-interpolated 95th percentile of 1..100: 1 + 0.95 * 99 = 95.05
    assert err == pytest.approx({"mean": 50.5, "p95": 95.05, "max": 100.0})
