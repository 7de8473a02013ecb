"""Quality verdict (scripts/evaluation/qc.py): hand-made folders with known numbers, registrations of a small synthetic
pair through given rigids (a 20 mm failure: fail; identity: pass; the gland-shift threshold's boundary), and
phantom registrations (ground-truth field: pass; swapped cases: fail)."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import register_pair
from conftest import write_case as write_small_case

from scripts.evaluation.pictures import write_index
from scripts.evaluation.qc import QC_FILE, deformable_part, gland_shift, quality_check
from scripts.inference.registrar import lost_channels
from scripts.phantom.synth import generate_case, write_case
from scripts.spatial.composed import FieldNetwork, write_field_nifti
from scripts.spatial.geometry import network_box

SIZE = (32, 40, 24)


def _folder(path, field, affine, rigid, method="given"):
    """A minimal registration output folder: composed field + result.json (no labels)."""
    write_field_nifti(field, affine, path / "transform_fixed_to_moving.nii.gz")
    result = {
        "direction": "mr2us",
        "moving_image": "m.nii.gz",
        "fixed_image": "f.nii.gz",
        "files": {"forward_field": "transform_fixed_to_moving.nii.gz"},
        "deformable": "network",
        "rigid": {"matrix_lps_fixed_to_moving": np.asarray(rigid).tolist(), "method": method, "mask_dice": None},
    }
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
    return (
        d / "mr_images" / f"{moving_case}.nii.gz",
        d / "us_images" / f"{fixed_case}.nii.gz",
        d / "mr_labels" / f"{moving_case}.nii.gz",
        d / "us_labels" / f"{fixed_case}.nii.gz",
    )


def test_ground_truth_registration_passes_with_the_dice_of_the_files(phantom, tmp_path):
    moving, fixed, moving_label, fixed_label = _paths(phantom, "case000002", "case000002")
    img = nib.load(str(fixed))
    box = network_box(img.affine, img.shape, SIZE, 0)
    register_pair(
        moving,
        fixed,
        tmp_path,
        moving_label,
        network=FieldNetwork(phantom / "ddf_mr2us" / "case000002.nii.gz", box),
        spatial_size=SIZE,
        depth_crop=0,
        use_rigid=False,
    )
    qc = quality_check(tmp_path, fixed_label, "label", moving_gland=moving_label)
    a = nib.load(str(tmp_path / "warped_label.nii.gz")).get_fdata()[..., 0] > 0.5
    b = nib.load(str(fixed_label)).get_fdata()[..., 0] > 0.5
    assert qc["metrics"]["gland_dice"] == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))
    assert qc["metrics"]["gland_dice"] >= 0.9
    assert qc["verdict"] == "pass", qc["reasons"]
    assert 3.0 < qc["checks"]["max_deformable_mm"]["value"] < 30.0  # the phantom moves the gland by several mm
    assert qc["metrics"]["unregistered_gland_dice"] < qc["metrics"]["registered_gland_dice"]
    assert 1.0 < qc["metrics"]["gland_shift_mm"] < 15.0


def test_swapped_cases_fail(phantom, tmp_path):
    # MR of case 1 registered (rigid, mutual information) to the TRUS of case 2: the rigid moves the gland ~20 mm
    moving, _, moving_label, _ = _paths(phantom, "case000001", "case000001")
    _, fixed, _, fixed_label = _paths(phantom, "case000002", "case000002")
    register_pair(moving, fixed, tmp_path, moving_label, spatial_size=SIZE, depth_crop=0)
    qc = quality_check(tmp_path, fixed_label, "label", moving_gland=moving_label)
    assert qc["verdict"] == "fail"
    assert not qc["checks"]["gland_dice"]["ok"] and qc["checks"]["gland_dice"]["severity"] == "warn"
    assert not qc["checks"]["gland_dice_drop"]["ok"]  # Dice ~0.79 at identity, ~0.2 after the rigid
    assert qc["reasons"][0].startswith("gland_dice_drop") and any(r.startswith("gland_dice =") for r in qc["reasons"])
    assert qc["metrics"]["rigid"]["method"] == "mutual_information"
    assert qc["metrics"]["rigid"]["mutual_information"] < 0  # ANTs reports MI negated


# a small synthetic pair on one 2 mm grid (24 x 24 x 20): noise images, sphere glands (radius 8 mm) 4 mm apart
GRID = np.diag([2.0, 2.0, 2.0, 1.0])


def _sphere(centre, radius_vox=4.0, shape=(24, 24, 20)):
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return ((i - centre[0]) ** 2 + (j - centre[1]) ** 2 + (k - centre[2]) ** 2 <= radius_vox**2).astype(np.uint8)


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root, rng = tmp_path_factory.mktemp("pair"), np.random.default_rng(0)
    arrays = {name: rng.random((24, 24, 20)).astype(np.float32) for name in ("moving", "fixed")}
    arrays.update(moving_label=_sphere((12, 12, 10)), fixed_label=_sphere((14, 12, 10)))
    for name, data in arrays.items():
        nib.save(nib.Nifti1Image(data, GRID), str(root / f"{name}.nii.gz"))
    return {"arrays": arrays, **{name: root / f"{name}.nii.gz" for name in arrays}}


def _translated(pair, out, t_lps, **kwargs):
    """register_pair through the given rigid ``p -> p + t`` (LPS mm, fixed -> moving), no network."""
    rigid = np.eye(4)
    rigid[:3, 3] = t_lps
    register_pair(
        pair["moving"],
        pair["fixed"],
        out,
        kwargs.pop("labels", pair["moving_label"]),
        network=None,
        rigid=rigid,
        spatial_size=(8, 8, 8),
        depth_crop=0,
        **kwargs,
    )
    return out


def test_a_20mm_rigid_failure_fails_on_overlap_and_shift(pair, tmp_path):
    out = _translated(pair, tmp_path / "case", (20.0, 0.0, 0.0))
    qc = quality_check(out, pair["fixed_label"], "label", moving_gland=pair["moving_label"])
    assert qc["verdict"] == "fail"
    assert [r.split(" ")[0] for r in qc["reasons"][:2]] == ["gland_dice_drop", "gland_shift_mm"]
    assert {qc["checks"][n]["severity"] for n in ("gland_dice_drop", "gland_shift_mm")} == {"fail"}
    # independent numbers: same grid, so identity = the arrays as they are; LPS x = -2 i, so p + (20, 0, 0) mm is
    # voxel i - 10: the warped gland is the moving one shifted by +10 voxels along i
    a, b = pair["arrays"]["moving_label"] > 0, pair["arrays"]["fixed_label"] > 0
    warped = np.zeros_like(a)
    warped[10:] = a[:-10]
    m = qc["metrics"]
    assert m["unregistered_gland_dice"] == pytest.approx(_dice(a, b)) and 0.5 < m["unregistered_gland_dice"] < 0.8
    assert m["registered_gland_dice"] == pytest.approx(_dice(warped, b)) == pytest.approx(m["gland_dice"])
    assert qc["checks"]["gland_dice_drop"]["value"] == pytest.approx(_dice(a, b) - _dice(warped, b))
    assert m["gland_shift_mm"] == pytest.approx(20.0, abs=1e-4) and m["gland_shift_from"] == "moving gland"
    assert json.loads((out / QC_FILE).read_text()) == qc
    # the hostile test's situation: no fixed gland, so no Dice at all; the shift alone fails it
    qc = quality_check(out, moving_gland=pair["moving_label"], overwrite=True)
    assert qc["verdict"] == "fail" and qc["reasons"][0].startswith("gland_shift_mm = 20 (moving gland)")
    assert "gland_dice_drop" not in qc["checks"] and qc["metrics"]["unregistered_gland_dice"] is None
    # nothing but the folder: the fixed field-of-view centre moves by the same 20 mm
    qc = quality_check(out, overwrite=True)
    assert qc["verdict"] == "fail" and qc["metrics"]["gland_shift_from"] == "fixed field-of-view centre"
    assert qc["metrics"]["gland_shift_mm"] == pytest.approx(20.0, abs=1e-4)
    # the folder run's index page shows it
    page = Path(write_index(tmp_path, [{"case": "case", "qc": qc, "pictures": []}])).read_text()
    assert '<tr class="fail"><td>case</td><td class="verdict">fail</td>' in page and "(0 pass, 0 warn, 1 fail)" in page
    assert "tr.fail .verdict{" in page and "gland_shift_mm: 20 (needs &lt;= 15.0) <b>fails</b> (verdict fail)" in page


def test_predicted_masks_of_both_images_are_used(pair, tmp_path):
    # a stand-in segmenter "predicts" the two spheres; no labels anywhere, QC gets no gland argument
    masks = {str(pair["moving"]): pair["arrays"]["moving_label"], str(pair["fixed"]): pair["arrays"]["fixed_label"]}
    out = _translated(
        pair, tmp_path / "case", (20.0, 0.0, 0.0), labels=None, segmenter=lambda path: (masks[str(path)], GRID)
    )
    qc = quality_check(out)
    assert qc["verdict"] == "fail" and qc["reasons"][0].startswith("gland_dice_drop")
    assert qc["metrics"]["overlap_masks"] == {
        "moving": str(out / "moving_gland.nii.gz"),
        "fixed": str(out / "fixed_gland.nii.gz"),
    }
    a, b = pair["arrays"]["moving_label"] > 0, pair["arrays"]["fixed_label"] > 0
    assert qc["metrics"]["unregistered_gland_dice"] == pytest.approx(_dice(a, b))
    assert qc["metrics"]["gland_dice"] is None  # no fixed gland given: the plain Dice check needs one
    assert qc["metrics"]["gland_shift_from"] == "moving gland"


def test_identity_on_an_aligned_pair_and_the_correcting_rigid_pass(pair, tmp_path):
    # aligned pair: the fixed gland is where the moving one is
    out = _translated(pair, tmp_path / "identity", (0.0, 0.0, 0.0))
    qc = quality_check(out, pair["moving_label"], "label", moving_gland=pair["moving_label"])
    assert qc["verdict"] == "pass" and qc["reasons"] == []
    m = qc["metrics"]
    assert m["registered_gland_dice"] == m["unregistered_gland_dice"] == 1.0
    assert qc["checks"]["gland_dice_drop"]["value"] == 0.0 and m["gland_shift_mm"] == pytest.approx(0.0, abs=1e-6)
    # the offset pair (fixed gland 2 voxels further along i) registered by the right 4 mm translation
    out = _translated(pair, tmp_path / "correct", (4.0, 0.0, 0.0))
    qc = quality_check(out, pair["fixed_label"], "label", moving_gland=pair["moving_label"])
    assert qc["verdict"] == "pass" and qc["reasons"] == []
    assert qc["metrics"]["registered_gland_dice"] == 1.0 > qc["metrics"]["unregistered_gland_dice"]
    assert qc["metrics"]["gland_shift_mm"] == pytest.approx(4.0, abs=1e-4)


@pytest.mark.parametrize("limit, ok", [(9.99, False), (10.01, True)])
def test_the_gland_shift_threshold_boundary(pair, tmp_path, limit, ok):
    # an oblique 10 mm translation (6, -8, 0): the gland centroid moves by exactly its length
    out = _translated(pair, tmp_path / "case", (6.0, -8.0, 0.0))
    qc = quality_check(out, moving_gland=pair["moving_label"], max_gland_shift_mm=limit)
    assert qc["checks"]["gland_shift_mm"]["value"] == pytest.approx(10.0, abs=1e-4)
    assert qc["checks"]["gland_shift_mm"]["ok"] is ok
    assert qc["verdict"] == ("pass" if ok else "fail")


def test_gland_shift_is_the_mean_displacement_with_the_rigid_beyond_the_grid():
    # constant field (1, 2, 2) mm on a 4^3 grid at identity (LPS x = -i): 3 mm inside; a point far outside the grid
    # moves by the rigid alone (5 mm); the mean of (1, 2, 2) and (3, 4, 0) has length |(2, 3, 1)|
    field = np.broadcast_to(np.array([1.0, 2.0, 2.0]), (4, 4, 4, 3)).copy()
    rigid = np.eye(4)
    rigid[:3, 3] = (3.0, 4.0, 0.0)
    assert gland_shift(field, np.eye(4), rigid, [[-1.0, -1.0, 1.0]]) == pytest.approx(3.0)
    assert gland_shift(field, np.eye(4), rigid, [[50.0, 0.0, 0.0]]) == pytest.approx(5.0)
    assert gland_shift(field, np.eye(4), rigid, [[-1.0, -1.0, 1.0], [50.0, 0.0, 0.0]]) == pytest.approx(np.sqrt(14))


def test_a_labelled_structure_that_vanishes_in_the_warped_labels_is_reported(tmp_path):
    """A landmark outside the fixed field of view has no voxel in the warped labels: result.json lists its
    channel and the QC warns, naming it (before, it was dropped silently)."""
    paths = write_small_case(tmp_path / "data", "holdout", "case000000", channels=3)
    labels = nib.load(paths["mr_label"])
    data = np.asarray(labels.dataobj).copy()
    data[..., 1] = 0
    data[0, 0, 0, 1] = 1  # MR voxel at x = 0 mm; the TRUS grid starts at x = 12.5 mm
    data[4:8, 4:8, 3:7, 2] = 1  # a landmark inside both fields of view
    nib.save(nib.Nifti1Image(data, labels.affine), str(paths["mr_label"]))
    result = register_pair(paths["mr_image"], paths["us_image"], tmp_path / "out", paths["mr_label"], use_rigid=False)
    assert result["label_channels_lost"] == [1]
    qc = quality_check(tmp_path / "out")
    assert qc["verdict"] == "warn" and not qc["checks"]["label_channels_lost"]["ok"]
    assert any(r.startswith("label_channels_lost = 1 (label channels [1] hold a structure") for r in qc["reasons"])
    # the rule itself: present before (>= threshold somewhere), absent after
    before = np.zeros((4, 4, 4, 3))
    before[..., 0], before[0, 0, 0, 1], before[1, 1, 1, 2] = 1, 0.7, 0.2
    after = np.zeros((5, 5, 5, 3), bool)
    after[..., 0] = True
    assert lost_channels(before, after) == [1]  # channel 2 never reached the threshold: nothing lost


def test_the_keep_structures_postprocessing_keeps_a_landmark_that_the_plain_threshold_loses(tmp_path):
    """A one-voxel MR landmark inside both fields of view: linear resampling onto the coarser, rotated TRUS
    grid spreads it below 0.5, so the plain threshold loses it (reported); configs/keep_structures.json's
    postprocessing keeps its peak voxels, and leaves the large gland exactly as the plain threshold does."""
    from monai.bundle import ConfigParser

    from scripts.data.transforms import ThresholdKeepingStructures

    paths = write_small_case(tmp_path / "data", "holdout", "case000000", channels=2)
    labels = nib.load(paths["mr_label"])
    data = np.asarray(labels.dataobj).copy()
    data[..., 1] = 0
    data[7, 3, 6, 1] = 1  # world (14, 6, 12) mm: inside the TRUS grid (x 12.5-40, y -10-12.5, z 5-25 mm)
    nib.save(nib.Nifti1Image(data, labels.affine), str(paths["mr_label"]))
    plain = register_pair(paths["mr_image"], paths["us_image"], tmp_path / "plain", paths["mr_label"], use_rigid=False)
    assert plain["label_channels_lost"] == [1]
    parser = ConfigParser()
    parser.read_config(["configs/inference.json", "configs/keep_structures.json"])
    keep = parser.get_parsed_content("postprocessing")
    assert isinstance(keep, ThresholdKeepingStructures)
    kept = register_pair(
        paths["mr_image"], paths["us_image"], tmp_path / "keep", paths["mr_label"], use_rigid=False, postprocessing=keep
    )
    assert kept["label_channels_lost"] == []
    a = np.asarray(nib.load(tmp_path / "plain" / "warped_label.nii.gz").dataobj)
    b = np.asarray(nib.load(tmp_path / "keep" / "warped_label.nii.gz").dataobj)
    np.testing.assert_array_equal(a[..., 0], b[..., 0])  # the gland: the same as with the plain threshold
    assert 1 <= b[..., 1].sum() <= 8  # the landmark: its peak voxels only
