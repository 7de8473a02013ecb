"""ANTs rigid pre-alignment recovers a known rigid misalignment (from masks, and from the images by MI)."""

import ants
import nibabel as nib
import numpy as np
import pytest
from _oblique import FIX, FIX_SHAPE, MOV, MOV_SHAPE, RAS2LPS, RIGID, gland, image, points

from scripts.data.nifti import write_nifti
from scripts.spatial.rigid import rigid_prealign


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
    matrix, info = rigid_prealign(
        pair / "fixed.nii.gz", pair / "moving.nii.gz", pair / "fixed_mask.nii.gz", pair / "moving_mask.nii.gz"
    )
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
    matrix, info = rigid_prealign(
        pair / "fixed.nii.gz", moving, ants.image_read(str(pair / "fixed_mask.nii.gz")), wrong
    )
    assert info["method"] == "mutual_information" and info["mask_dice"] < 0.5
    assert _point_error(matrix) < 1.5


def test_schedule_keeps_its_physical_levels_on_other_voxel_sizes():
    from scripts.spatial.rigid import scaled_schedule

    assert scaled_schedule((8, 4), (3, 2), 0.8, 0.8) == ((8, 4), (3.0, 2.0))  # μ-RegPro's grids: as configured
    assert scaled_schedule((8, 4), (3, 2), 2.4, 0.8) == (
        (3, 1),
        (1.125, 0.5),
    )  # 7.2 and 2.4 mm levels, not 19.2 and 9.6
    assert scaled_schedule((8, 4), (3, 2), 0.4, 0.8) == ((16, 8), (6.0, 4.0))
    assert scaled_schedule((8, 4), (3, 2), 2.4, None) == ((8, 4), (3, 2))


def test_a_schedule_with_unequal_levels_is_one_clear_error(pair):
    from scripts.data.nifti import InputError

    with pytest.raises(InputError, match="one value per level, got 3, 2 and 2 values"):
        rigid_prealign(pair / "fixed.nii.gz", pair / "moving.nii.gz", iterations=(50, 25, 10))


# nibabel orientations (per array axis: its new position, flipped or not): copies of the same voxels at the same
# positions, stored in another order (the fixed grid is oblique, the moving one axis-permuted and flipped already)
STORAGE = {
    "fixed flipped": {"fixed": [[0, -1], [1, 1], [2, -1]]},
    "fixed permuted": {"fixed": [[2, 1], [0, 1], [1, 1]]},
    "moving flipped and permuted": {"moving": [[1, 1], [2, -1], [0, 1]]},
    "both flipped and permuted": {"fixed": [[1, -1], [2, 1], [0, 1]], "moving": [[0, -1], [1, 1], [2, -1]]},
}
FILES = {"fixed": ("fixed", "fixed_mask"), "moving": ("moving", "moving_mask")}


# The fixed grid of ``pair`` with its direction columns on a 2^-16 grid and its origin on a 2^-8 mm grid (within
# 1e-5 in the cosines and 0.002 mm of FIX): a flipped copy's origin, origin + column * (n - 1), is then exact in a NIfTI
# header's float32, so the copies below describe bit for bit the same grid. (Flipping an arbitrary float32 origin
# rounds it by ~1e-6 mm, and ANTs' rigid result is sensitive to that: docs/pipeline.md, "Header rules and storage
# order".)
FIX_EXACT = FIX.copy()
FIX_EXACT[:3, :3] = np.round(FIX[:3, :3] * 2**16) / 2**16
FIX_EXACT[:3, 3] = np.round(FIX[:3, 3] * 2**8) / 2**8


@pytest.fixture(scope="module")
def exact_pair(tmp_path_factory):
    """``pair`` on FIX_EXACT."""
    from scripts.data.nifti import write_nifti

    d = tmp_path_factory.mktemp("rigid_exact")
    q = points(FIX_EXACT, FIX_SHAPE) @ RIGID[:3, :3].T + RIGID[:3, 3]
    write_nifti(image(q).astype(np.float32), FIX_EXACT, d / "fixed.nii.gz")
    write_nifti(gland(q), FIX_EXACT, d / "fixed_mask.nii.gz")
    write_nifti(image(points(MOV, MOV_SHAPE)).astype(np.float32), MOV, d / "moving.nii.gz")
    write_nifti(gland(points(MOV, MOV_SHAPE)), MOV, d / "moving_mask.nii.gz")
    return d


def _stored(pair, folder, orientations):
    """Copies of the pair's four files, each image and its mask stored in the order ``orientations[role]``."""
    from nibabel.orientations import apply_orientation, inv_ornt_aff

    from scripts.data.nifti import write_nifti

    folder.mkdir()
    for role, names in FILES.items():
        ornt = np.asarray(orientations.get(role, [[0, 1], [1, 1], [2, 1]]), float)
        for name in names:
            img = nib.load(str(pair / f"{name}.nii.gz"))
            write_nifti(
                apply_orientation(np.asarray(img.dataobj), ornt),
                img.affine @ inv_ornt_aff(ornt, img.shape),
                folder / f"{name}.nii.gz",
            )
    return folder


def _rigid_single_threaded(folders, masks: bool):
    """rigid_prealign's matrix for each folder's pair, in a fresh process with ANTs single-threaded: its threads add
    up the mutual information in a varying order, which alone moves that result by ~0.01-0.05 mm (docs/reliability.md,
    "Determinism"); the thread count is read when ITK loads."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = (
        "import json, sys\nfrom scripts.spatial.rigid import rigid_prealign\nout = []\n"
        "for d in sys.argv[2:]:\n"
        "    f = [f'{d}/{n}.nii.gz' for n in ('fixed', 'moving', 'fixed_mask', 'moving_mask')]\n"
        "    out.append(rigid_prealign(*(f if sys.argv[1] == '1' else f[:2]))[0].tolist())\n"
        "print(json.dumps(out))"
    )
    env = {**os.environ, "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-c", code, "1" if masks else "0", *map(str, folders)],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [np.asarray(m) for m in json.loads(done.stdout.strip().splitlines()[-1])]


@pytest.mark.parametrize("masks", [True, False], ids=["masks", "mutual_information"])
def test_flipped_or_permuted_copies_give_the_same_rigid(exact_pair, tmp_path, masks):
    """ANTs is not invariant to the storage order (before: the copies moved the result by 0.25 mm on average over the
    gland, up to 0.48 mm, on this pair; 0.46 mm, up to 2.6 mm, on realistic phantom pairs, docs/pipeline.md);
    rigid_prealign hands it every image in the closest RAS+ order instead: the same data, the same matrix."""
    from scripts.spatial.rigid import _read

    pair = exact_pair
    folders = [_stored(pair, tmp_path / name.replace(" ", "_"), o) for name, o in STORAGE.items()]
    for folder in folders:  # ANTs gets the same voxels on the same grid
        for role in ("fixed", "moving", "fixed_mask", "moving_mask"):
            ours, theirs = (_read(d / f"{role}.nii.gz", role, mask="mask" in role) for d in (pair, folder))
            np.testing.assert_array_equal(theirs.numpy(), ours.numpy())
            for attribute in ("origin", "spacing", "direction"):
                np.testing.assert_array_equal(getattr(theirs, attribute), getattr(ours, attribute))
    reference, *copies = _rigid_single_threaded([pair, *folders], masks)
    assert _point_error(reference) < 1.5  # the right answer, too
    fixed_mask = nib.load(str(pair / "fixed_mask.nii.gz"))
    lps = RAS2LPS @ fixed_mask.affine
    gland_mm = np.argwhere(np.asarray(fixed_mask.dataobj) > 0.5) @ lps[:3, :3].T + lps[:3, 3]
    for name, matrix in zip(STORAGE, copies):
        moved = np.linalg.norm((matrix - reference)[:3, :3] @ gland_mm.T + (matrix - reference)[:3, 3:], axis=0)
        assert moved.max() <= 0.01, f"{name}: the rigid result moves the gland by up to {moved.max():.3g} mm"
