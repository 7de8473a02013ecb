"""Quality verdict (scripts/qc.py): hand-made folders with known numbers, and phantom registrations
(ground-truth field: pass; swapped cases: warn)."""

import json

import nibabel as nib
import numpy as np
import pytest

from scripts.geometry import network_box
from scripts.phantom import generate_case, write_case
from scripts.pipeline import field_as_network, register_pair
from scripts.qc import QC_FILE, deformable_part, quality_check
from scripts.transform_io import write_field_nifti

SIZE = (32, 40, 24)


def _folder(path, field, affine, rigid, method="given"):
    """A minimal registration output folder: composed field + result.json (no labels)."""
    write_field_nifti(field, affine, path / "transform_fixed_to_moving.nii.gz")
    result = {"direction": "mr2us", "moving_image": "m.nii.gz", "fixed_image": "f.nii.gz",
              "files": {"forward_field": "transform_fixed_to_moving.nii.gz"}, "deformable": "network",
              "rigid": {"matrix_lps_fixed_to_moving": np.asarray(rigid).tolist(), "method": method, "mask_dice": None}}
    (path / "result.json").write_text(json.dumps(result))


def test_folding_and_displacement_numbers_match_hand_values(tmp_path):
    # identity RAS grid 10^3: LPS x of voxel i is -i. Deformable u_x = -1.5 (x - c) with c = -4.5 folds everywhere:
    # d(x + u_x)/dx = -0.5. Largest |u| = 1.5 * 4.5 = 6.75 mm. Rigid: 90 deg about z, then t = (5, -3, 2).
    i, j, k = np.meshgrid(*[np.arange(10.0)] * 3, indexing="ij")
    p = np.stack([-i, -j, k], axis=-1)
    u = np.zeros_like(p)
    u[..., 0] = -1.5 * (p[..., 0] + 4.5)
    rot = np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])
    rigid = np.eye(4)
    rigid[:3, :3], rigid[:3, 3] = rot, [5.0, -3.0, 2.0]
    composed = (p + u) @ rot.T + rigid[:3, 3] - p  # R(p + u(p)) - p
    np.testing.assert_allclose(deformable_part(composed, np.eye(4), rigid), u, atol=1e-9)
    _folder(tmp_path, composed, np.eye(4), rigid)
    qc = quality_check(tmp_path, max_deformable_mm=6.0)
    assert qc["verdict"] == "warn"
    assert qc["checks"]["nonpositive_jacobian_pct"]["value"] == pytest.approx(100.0)
    assert qc["checks"]["max_deformable_mm"]["value"] == pytest.approx(6.75, abs=1e-4)
    assert not qc["checks"]["max_deformable_mm"]["ok"]
    assert qc["metrics"]["gland_dice"] is None and "gland_dice" not in qc["checks"]
    assert len(qc["reasons"]) == 2
    assert json.loads((tmp_path / QC_FILE).read_text()) == qc


def test_a_smooth_small_deformation_passes(tmp_path):
    i, j, k = np.meshgrid(*[np.arange(10.0)] * 3, indexing="ij")
    u = np.stack([np.sin(i / 3), np.zeros_like(i), 0.5 * np.cos(k / 4)], axis=-1)  # |du/dx| <= 1/3: no folding
    _folder(tmp_path, u, np.eye(4), np.eye(4))
    qc = quality_check(tmp_path)
    assert qc["verdict"] == "pass" and qc["reasons"] == []
    assert qc["checks"]["nonpositive_jacobian_pct"]["value"] == 0.0
    assert qc["checks"]["max_deformable_mm"]["value"] == pytest.approx(np.linalg.norm(u, axis=-1).max(), abs=1e-5)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    for index in (1, 2):
        write_case(generate_case(0, index, "small"), root, "train", f"case{index:06d}", preview=False)
    return root / "train"


def _paths(d, moving_case, fixed_case):
    return (d / "mr_images" / f"{moving_case}.nii.gz", d / "us_images" / f"{fixed_case}.nii.gz",
            d / "mr_labels" / f"{moving_case}.nii.gz", d / "us_labels" / f"{fixed_case}.nii.gz")


def test_ground_truth_registration_passes_with_the_dice_of_the_files(phantom, tmp_path):
    moving, fixed, moving_label, fixed_label = _paths(phantom, "case000002", "case000002")
    img = nib.load(str(fixed))
    box = network_box(img.affine, img.shape, SIZE, 0)
    register_pair(moving, fixed, tmp_path, moving_label, network=field_as_network(phantom / "ddf_mr2us" /
                  "case000002.nii.gz", box), spatial_size=SIZE, depth_crop=0, use_rigid=False)
    qc = quality_check(tmp_path, fixed_label, "label")
    a = nib.load(str(tmp_path / "warped_label.nii.gz")).get_fdata()[..., 0] > 0.5
    b = nib.load(str(fixed_label)).get_fdata()[..., 0] > 0.5
    assert qc["metrics"]["gland_dice"] == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))
    assert qc["metrics"]["gland_dice"] >= 0.9
    assert qc["verdict"] == "pass", qc["reasons"]
    assert 3.0 < qc["checks"]["max_deformable_mm"]["value"] < 30.0  # the phantom moves the gland by several mm


def test_swapped_cases_get_a_warn_verdict(phantom, tmp_path):
    # MR of case 1 registered (rigid, mutual information) to the TRUS of case 2
    moving, _, moving_label, _ = _paths(phantom, "case000001", "case000001")
    _, fixed, _, fixed_label = _paths(phantom, "case000002", "case000002")
    register_pair(moving, fixed, tmp_path, moving_label, spatial_size=SIZE, depth_crop=0)
    qc = quality_check(tmp_path, fixed_label, "label")
    assert qc["verdict"] == "warn"
    assert not qc["checks"]["gland_dice"]["ok"]
    assert any(r.startswith("gland_dice") for r in qc["reasons"])
    assert qc["metrics"]["rigid"]["method"] == "mutual_information"
    assert qc["metrics"]["rigid"]["mutual_information"] < 0  # ANTs reports MI negated
