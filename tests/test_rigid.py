"""ANTs rigid pre-alignment recovers a known rigid misalignment (from masks, and from the images by MI)."""

import ants
import numpy as np
import pytest
from _oblique import FIX, FIX_SHAPE, MOV, MOV_SHAPE, RIGID, gland, image, points

from scripts.io import write_nifti
from scripts.rigid import rigid_prealign


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Moving content on its grid; the fixed image is the moving content seen through RIGID (no deformation)."""
    d = tmp_path_factory.mktemp("rigid")
    p = points(FIX, FIX_SHAPE)
    q = p @ RIGID[:3, :3].T + RIGID[:3, 3]
    write_nifti(image(q).astype(np.float32), FIX, d / "fixed.nii.gz")
    write_nifti(gland(q), FIX, d / "fixed_mask.nii.gz")
    write_nifti(image(points(MOV, MOV_SHAPE)).astype(np.float32), MOV, d / "moving.nii.gz")
    write_nifti(gland(points(MOV, MOV_SHAPE)), MOV, d / "moving_mask.nii.gz")
    return d


def _point_error(matrix):
    """Largest error (mm) of ``matrix`` against RIGID over the corners of a 16 mm cube around the gland."""
    corners = np.array([[x, y, z] for x in (-8, 8) for y in (-8, 8) for z in (-8, 8)], float)
    apply = lambda m: corners @ m[:3, :3].T + m[:3, 3]  # noqa: E731
    return np.linalg.norm(apply(matrix) - apply(RIGID), axis=1).max()


def test_masks_recover_rigid(pair):
    matrix, info = rigid_prealign(pair / "fixed.nii.gz", pair / "moving.nii.gz", pair / "fixed_mask.nii.gz",
                                  pair / "moving_mask.nii.gz")
    assert info["method"] == "masks"
    assert info["mask_dice"] > 0.9
    # the default schedule stops at shrink 3 here (about 3 mm on this 1 mm, 30-voxel pair): no full-resolution level
    assert _point_error(matrix) < 1.5
    np.testing.assert_allclose(matrix[:3, :3] @ matrix[:3, :3].T, np.eye(3), atol=1e-5)  # a rotation


def test_images_by_mutual_information_without_masks(pair):
    matrix, info = rigid_prealign(pair / "fixed.nii.gz", pair / "moving.nii.gz")
    assert info["method"] == "mutual_information"
    assert _point_error(matrix) < 1.5


def test_implausible_mask_result_falls_back_to_images(pair):
    # a moving "mask" far from the gland: centres align but the shapes cannot overlap well
    moving = ants.image_read(str(pair / "moving.nii.gz"))
    wrong = moving.new_image_like(np.zeros(MOV_SHAPE, np.float32))
    arr = wrong.numpy()
    arr[0:3, 0:3, :] = 1  # a thin rod
    wrong = wrong.new_image_like(arr)
    matrix, info = rigid_prealign(pair / "fixed.nii.gz", moving, ants.image_read(str(pair / "fixed_mask.nii.gz")), wrong)
    assert info["method"] == "mutual_information" and info["mask_dice"] < 0.5
    assert _point_error(matrix) < 1.5


def test_schedule_keeps_its_physical_levels_on_other_voxel_sizes():
    from scripts.rigid import scaled_schedule

    assert scaled_schedule((8, 4), (3, 2), 0.8, 0.8) == ((8, 4), (3.0, 2.0))  # μ-RegPro's grids: as configured
    assert scaled_schedule((8, 4), (3, 2), 2.4, 0.8) == ((3, 1), (1.125, 0.5))  # 7.2 and 2.4 mm levels, not 19.2 and 9.6
    assert scaled_schedule((8, 4), (3, 2), 0.4, 0.8) == ((16, 8), (6.0, 4.0))
    assert scaled_schedule((8, 4), (3, 2), 2.4, None) == ((8, 4), (3, 2))


def test_a_schedule_with_unequal_levels_is_one_clear_error(pair):
    from scripts.io import InputError

    with pytest.raises(InputError, match="one value per level, got 3, 2 and 2 values"):
        rigid_prealign(pair / "fixed.nii.gz", pair / "moving.nii.gz", iterations=(50, 25, 10))
