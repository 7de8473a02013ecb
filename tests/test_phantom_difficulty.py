"""benchmarks/phantom_difficulty.py: the ideal-fit fields follow the ITK/ANTs convention, and the field error
of the stored ground truth is zero while that of no registration is the true displacement's size."""

import sys
from pathlib import Path

import ants
import nibabel as nib
import numpy as np
import pytest

from scripts.data.nifti import write_nifti
from scripts.phantom.synth import synth

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import phantom_difficulty as difficulty  # noqa: E402


def _centroid_ras(path):
    img = nib.load(str(path))
    idx = np.argwhere(np.asarray(img.dataobj) > 0.5).mean(0)
    return img.affine[:3, :3] @ idx + img.affine[:3, 3]


def test_an_ideal_map_field_moves_the_moving_image_onto_the_map(tmp_path):
    """A blob at RAS point c of the moving image lands at M c in the fixed image when ANTs applies the field."""
    affine = np.array([[-1.5, 0, 0, 30.0], [0, 1.5, 0, -20.0], [0, 0, 2.0, 5.0], [0, 0, 0, 1]])  # L-R flipped axis
    shape = (40, 40, 30)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1) @ affine[:3, :3].T + affine[:3, 3]
    centre = np.array([5.0, 8.0, 30.0])
    write_nifti((np.linalg.norm(grid - centre, axis=-1) < 6).astype(np.float32), affine, tmp_path / "moving.nii.gz")
    angle = np.deg2rad(8)
    m = np.eye(4)
    m[:3, :3] = [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    m[:3, 3] = [4.0, -3.0, 2.5]
    field = difficulty._ideal_field(affine, shape, m)
    write_nifti(field, affine, tmp_path / "field.nii.gz", intent="vector")
    fixed = ants.image_read(str(tmp_path / "moving.nii.gz"))
    warped = ants.apply_transforms(fixed, fixed, [str(tmp_path / "field.nii.gz")], interpolator="linear")
    ants.image_write(warped, str(tmp_path / "warped.nii.gz"))
    expected = m[:3, :3] @ centre + m[:3, 3]
    np.testing.assert_allclose(_centroid_ras(tmp_path / "moving.nii.gz"), centre, atol=0.05)
    np.testing.assert_allclose(_centroid_ras(tmp_path / "warped.nii.gz"), expected, atol=0.2)


@pytest.fixture(scope="module")
def one_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("difficulty") / "data"
    synth(str(root), cases=1, seed=3, size="small", splits="0,0,1", preset="realistic", preview=False)
    return root


def test_field_errors_of_the_truth_and_of_no_registration(one_case, tmp_path):
    row = difficulty.register_pair(one_case, "holdout", "case000000", "us2mr", 0, tmp_path)
    assert set(difficulty.METHODS) <= set(row)
    truth = np.asarray(nib.load(str(one_case / "holdout" / "ddf_us2mr" / "case000000.nii.gz")).dataobj)
    gland = np.asarray(nib.load(str(one_case / "holdout" / "truth" / "mr_labels" / "case000000.nii.gz")).dataobj)
    size = np.linalg.norm(truth[..., 0, :], axis=-1)[gland[..., 0] > 0]
    assert row["true_field"]["field_error_mm"] < 1e-3
    assert row["none"]["field_error_mm"] == pytest.approx(size.mean(), rel=1e-5)
    assert row["none"]["field_error_p95_mm"] == pytest.approx(np.percentile(size, 95), rel=1e-5)
    # a least-squares fit of the true map over the gland leaves less than the map itself
    assert row["ideal_affine"]["field_error_mm"] < row["none"]["field_error_mm"]
    assert row["ideal_rigid"]["field_error_mm"] < row["none"]["field_error_mm"]
