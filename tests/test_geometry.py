"""Network box, reorientation and voxel <-> mm conversions, checked against hand-computed values."""

import numpy as np
import pytest
from _oblique import FIX, FIX_SHAPE, RAS2LPS, points

from scripts.geometry import (
    box_ddf_to_mm,
    grid_points,
    mm_to_box_ddf,
    network_box,
    reoriented_grid,
    sample,
)

AXIAL = np.array([[-0.8, 0, 0, 10], [0, 0.8, 0, -20], [0, 0, 0.8, 5], [0, 0, 0, 1.0]])  # LAS, 0.8 mm


def test_box_hand_values_axis_aligned():
    box = network_box(AXIAL, (81, 118, 88), spatial_size=(16, 16, 12), depth_crop=2)
    # reoriented to RAS: x runs from the left edge 10 - 0.8 * 80.5 = -54.4 mm; 81 * 0.8 / 16 = 4.05 mm voxels
    # y edge -20 - 0.4 = -20.4, 118 * 0.8 / 16 = 5.9; z edge 5 - 0.4 = 4.6, 88 * 0.8 / 16 = 4.4, 2 slices cropped
    expected = np.diag([4.05, 5.9, 4.4, 1.0])
    expected[:3, 3] = [-54.4 + 2.025, -20.4 + 2.95, 4.6 + 2.5 * 4.4]
    assert box.shape == (16, 16, 12)
    np.testing.assert_allclose(box.affine, expected, atol=1e-9)
    desc = box.to_dict()
    np.testing.assert_allclose(desc["origin_lps_mm"], [52.375, 17.45, 15.6], atol=1e-9)
    np.testing.assert_allclose(desc["direction_lps"], np.diag([-1.0, -1, 1]), atol=1e-12)


def test_depth_is_inferior_superior_for_sagittal_grid():
    # voxel axis 0 runs inferior -> superior (1.5 mm, 40 slices), axis 1 posterior -> anterior, axis 2 right -> left
    affine = np.array([[0, 0, -1.0, 0], [0, 1.0, 0, 0], [1.5, 0, 0, 0], [0, 0, 0, 1.0]])
    box = network_box(affine, (40, 30, 20), spatial_size=(10, 15, 8), depth_crop=1)
    direction = box.affine[:3, :3] / np.linalg.norm(box.affine[:3, :3], axis=0)
    np.testing.assert_allclose(direction, np.eye(3), atol=1e-12)  # R, A, S
    # depth covers 40 * 1.5 = 60 mm in 8 + 2 voxels: 6 mm; in-plane 20 mm / 10 and 30 mm / 15
    np.testing.assert_allclose(box.spacing, [2.0, 2.0, 6.0])


def test_reoriented_grid_same_points():
    affine = np.array([[0, 0, -0.8, 3], [0.9, 0, 0, -2], [0, -1.1, 0, 7], [0, 0, 0, 1.0]])
    new_affine, new_shape = reoriented_grid(affine, (5, 6, 7))
    assert new_shape == (7, 5, 6)  # R <- old axis 2 (flipped), A <- old axis 0, S <- old axis 1 (flipped)
    assert np.all(np.diag(new_affine)[:3] > 0)
    # the same set of physical voxel centres, only re-indexed
    old = np.sort(points(affine, (5, 6, 7)).reshape(-1, 3), axis=0)
    new = np.sort(points(new_affine, new_shape).reshape(-1, 3), axis=0)
    np.testing.assert_allclose(old, new, atol=1e-9)


def test_flipped_and_permuted_fixed_give_the_same_box():
    box = network_box(FIX, FIX_SHAPE, (16, 16, 12), 2)
    flip = np.eye(4)
    flip[1, 1], flip[1, 3] = -1, FIX_SHAPE[1] - 1  # new index j' = n - 1 - j
    swap = np.eye(4)[[2, 0, 1, 3]]  # old voxel index = (c, a, b) of the new index (a, b, c)
    for affine, shape in [(FIX @ flip, FIX_SHAPE), (FIX @ swap, (FIX_SHAPE[1], FIX_SHAPE[2], FIX_SHAPE[0]))]:
        np.testing.assert_allclose(points(affine, shape).reshape(-1, 3).mean(0), points(FIX, FIX_SHAPE).reshape(-1, 3).mean(0), atol=1e-9)
        other = network_box(affine, shape, (16, 16, 12), 2)
        np.testing.assert_allclose(other.affine, box.affine, atol=1e-9)


def test_box_covers_fixed_field_of_view():
    box = network_box(FIX, FIX_SHAPE, (16, 16, 12), 2)
    # in-plane the box edges coincide with the fixed edges: the summed extents match, the depth loses 2 + 2 slices
    extent_fixed = np.sort(np.array(FIX_SHAPE) * np.linalg.norm(FIX[:3, :3], axis=0))
    extent_box = np.array(box.shape) * box.spacing
    depth_voxel = box.spacing[2]
    assert np.isclose(sorted(extent_box[:2].tolist() + [extent_box[2] + 4 * depth_voxel]), extent_fixed).all()
    # the box centre is the fixed centre
    np.testing.assert_allclose(grid_points(box.affine, box.shape).reshape(-1, 3).mean(0),
                               points(FIX, FIX_SHAPE).reshape(-1, 3).mean(0), atol=1e-9)


def test_box_ddf_to_mm_hand_value_and_round_trip():
    box = network_box(AXIAL, (81, 118, 88), (16, 16, 12), 2)
    ddf = np.zeros((3, 16, 16, 12))
    ddf[0], ddf[1], ddf[2] = 1.0, -2.0, 0.5  # voxels along box axes R, A, S
    mm = box_ddf_to_mm(ddf, box)
    # RAS (+4.05, -11.8, +2.2) mm -> LPS (-4.05, +11.8, +2.2)
    np.testing.assert_allclose(mm[3, 4, 5], [-4.05, 11.8, 2.2], atol=1e-12)
    rng = np.random.default_rng(0)
    field = rng.normal(size=(16, 16, 12, 3))
    np.testing.assert_allclose(box_ddf_to_mm(mm_to_box_ddf(field, box), box), field, atol=1e-12)


def test_sample_linear_function_exact_and_zero_outside():
    lps = RAS2LPS @ FIX
    data = points(FIX, FIX_SHAPE) @ np.array([0.5, -1.0, 2.0]) + 3.0  # linear in LPS mm
    rng = np.random.default_rng(1)
    index = rng.uniform(0, np.array(FIX_SHAPE) - 1, size=(51, 3))  # an odd count: uneven split over threads
    world = index @ lps[:3, :3].T + lps[:3, 3]
    exact = world @ np.array([0.5, -1.0, 2.0]) + 3.0
    np.testing.assert_allclose(sample(data, FIX, world), exact, atol=1e-9)
    np.testing.assert_allclose(sample(data, FIX, world, single=True), exact, atol=1e-4 * np.abs(data).max())
    nearest = np.round(index).astype(int)
    np.testing.assert_allclose(sample(data, FIX, world, order=0), data[tuple(nearest.T)], atol=1e-9)
    far = np.array([-3.0, 2, 2]) @ lps[:3, :3].T + lps[:3, 3]  # 3 voxels outside along axis 0
    edge = np.array([-0.3, 2, 2]) @ lps[:3, :3].T + lps[:3, 3]  # within half a voxel: the edge voxel's value
    assert sample(data, FIX, far[None])[0] == 0.0
    assert sample(data, FIX, edge[None])[0] == pytest.approx(data[0, 2, 2], abs=1e-9)
    assert sample(data, FIX, np.zeros((0, 3))).shape == (0,)
