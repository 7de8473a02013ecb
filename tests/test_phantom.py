"""Tests of the synthetic MR–TRUS phantom (scripts/phantom*.py): layout, determinism and ground truth.

Expected values are worked out here independently of the generator: label centroids are measured
from the written label volumes, fields are sampled with our own trilinear interpolation, Jacobian
determinants come from our own finite differences, and the hand-worked transforms are checked
against numbers computed on paper.
"""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from scripts.__main__ import main as cli
from scripts.data.nifti import InputError
from scripts.evaluation.metrics import jacobian_determinant
from scripts.phantom.synth import generate_case, split_counts, synth, write_case
from scripts.phantom.transform import PhantomTransform
from scripts.spatial.geometry import RAS_LPS_FLIP

SMALL_SPACING = 2.4
FLIP = RAS_LPS_FLIP
SPLIT_OF = {0: "train", 1: "val", 2: "holdout"}  # 3 cases with the default fractions: one per split


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Three small cases written through the bundle CLI (case 2 has an oblique TRUS grid)."""
    root = tmp_path_factory.mktemp("phantom") / "data"
    cli(["synth", "--out", str(root), "--cases", "3", "--seed", "7", "--size", "small"])
    return root


def load(root, split, folder, case):
    return nib.load(str(Path(root) / split / folder / f"case{case:06d}.nii.gz"))


def truth(root, case):
    return json.loads((Path(root) / SPLIT_OF[case] / "truth" / f"case{case:06d}.json").read_text())


def world_to_voxel(affine, points):
    return (np.asarray(points) - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T


def sample_ras(field_img, points):
    """Our own trilinear sampling of a stored (X,Y,Z,1,3) LPS field at RAS points -> RAS displacements."""
    data = np.asarray(field_img.dataobj)[..., 0, :]
    vox = world_to_voxel(field_img.affine, points).T
    return np.stack([ndimage.map_coordinates(data[..., c], vox, order=1) for c in range(3)], -1) * FLIP


def centroid_ras(label_img, channel):
    data = np.asarray(label_img.dataobj)[..., channel]
    idx = np.argwhere(data > 0).mean(0)
    return label_img.affine[:3, :3] @ idx + label_img.affine[:3, 3]


def jacobian_det(field_img):
    u = np.asarray(field_img.dataobj, dtype=np.float64)[..., 0, :] * FLIP
    return jacobian_determinant(np.moveaxis(u, -1, 0), np.linalg.inv(field_img.affine[:3, :3]))


def test_layout_shapes_affines(dataset):
    assert sorted(p.name for p in dataset.iterdir()) == ["holdout", "phantom.json", "train", "val"]
    for case, split in SPLIT_OF.items():
        mr, us = load(dataset, split, "mr_images", case), load(dataset, split, "us_images", case)
        assert mr.shape == (40, 43, 43) and us.shape == (27, 39, 29)
        for img in (mr, us):
            assert np.allclose(np.linalg.norm(img.affine[:3, :3], axis=0), SMALL_SPACING)
            assert img.get_data_dtype() == np.float32
        for lab_folder, img in (("mr_labels", mr), ("us_labels", us)):
            lab = load(dataset, split, lab_folder, case)
            assert lab.shape == img.shape + (6,) and lab.get_data_dtype() == np.uint8
            assert np.allclose(lab.affine, img.affine)
            data = np.asarray(lab.dataobj)
            assert set(np.unique(data)) <= {0, 1} and data[..., 0].sum() > 100
        for ddf_folder, fixed in (("ddf_mr2us", us), ("ddf_us2mr", mr)):
            ddf = load(dataset, split, ddf_folder, case)
            assert ddf.shape == fixed.shape + (1, 3) and np.allclose(ddf.affine, fixed.affine)
            assert ddf.header.get_intent()[0] == "vector"
        assert (dataset / split / "preview" / f"case{case:06d}.png").stat().st_size > 1000
    # every third case (index 2) stores TRUS with an oblique direction; case 0 is axis aligned
    direction = lambda c: load(dataset, SPLIT_OF[c], "us_images", c).affine[:3, :3] / SMALL_SPACING  # noqa: E731
    assert np.allclose(np.abs(direction(0)), np.round(np.abs(direction(0))))
    assert np.abs(direction(2)).max() < 0.999


def test_label_channels_match_truth(dataset):
    for case, split in SPLIT_OF.items():
        t = truth(dataset, case)
        labelled = {lm["channel"] for lm in t["landmarks"] if lm["channel"] is not None}
        assert 2 <= len(t["landmarks"]) <= 5 and labelled == set(range(2, 2 + min(4, len(t["landmarks"]))))
        for folder in ("mr_labels", "us_labels"):
            data = np.asarray(load(dataset, split, folder, case).dataobj)
            for ch in range(1, 6):
                assert (data[..., ch].sum() > 0) == (ch == 1 or ch in labelled), (folder, case, ch)
            # urethra and landmarks lie inside the gland
            assert not np.any(data[..., 1:].max(-1) & (1 - data[..., 0]))


def test_deterministic_per_seed_and_case(dataset):
    # case 1 regenerated alone equals the file written as the 2nd of 3 cases: depends on (seed, index) only
    again = generate_case(7, 1, "small")
    assert np.array_equal(again["us_image"], np.asarray(load(dataset, "val", "us_images", 1).dataobj))
    assert np.array_equal(again["mr_label"], np.asarray(load(dataset, "val", "mr_labels", 1).dataobj))
    other = generate_case(8, 1, "small")
    assert not np.array_equal(other["mr_label"], again["mr_label"])


def test_fields_map_landmark_centres(dataset):
    tol = 0.5 * SMALL_SPACING
    for case, split in SPLIT_OF.items():
        mr2us, us2mr = load(dataset, split, "ddf_mr2us", case), load(dataset, split, "ddf_us2mr", case)
        for lm in truth(dataset, case)["landmarks"]:
            mr_c, us_c = np.array(lm["mr_centre_ras_mm"]), np.array(lm["us_centre_ras_mm"])
            assert np.linalg.norm(us_c + sample_ras(mr2us, us_c[None])[0] - mr_c) < tol
            assert np.linalg.norm(mr_c + sample_ras(us2mr, mr_c[None])[0] - us_c) < tol


def test_labels_rendered_at_mapped_centres(dataset):
    """Each image's landmark label sits at that image's analytic centre (rendered per image, not resampled)."""
    for case, split in SPLIT_OF.items():
        mr_lab, us_lab = load(dataset, split, "mr_labels", case), load(dataset, split, "us_labels", case)
        t = truth(dataset, case)
        moved = np.linalg.norm(np.subtract(t["gland_centre_us_ras_mm"], t["gland_centre_mr_ras_mm"]))
        assert moved > 2.0  # the two images really differ
        for lm in t["landmarks"]:
            if lm["channel"] is None:
                continue
            assert np.linalg.norm(centroid_ras(mr_lab, lm["channel"]) - lm["mr_centre_ras_mm"]) < SMALL_SPACING
            assert np.linalg.norm(centroid_ras(us_lab, lm["channel"]) - lm["us_centre_ras_mm"]) < SMALL_SPACING


def test_fields_compose_to_identity_in_gland(dataset):
    tol = 0.5 * SMALL_SPACING
    for case, split in SPLIT_OF.items():
        fields = {"us": load(dataset, split, "ddf_mr2us", case), "mr": load(dataset, split, "ddf_us2mr", case)}
        for grid, other in (("us", "mr"), ("mr", "us")):
            lab = load(dataset, split, f"{grid}_labels", case)
            idx = np.argwhere(np.asarray(lab.dataobj)[..., 0] > 0)
            p = idx @ lab.affine[:3, :3].T + lab.affine[:3, 3]
            u = np.asarray(fields[grid].dataobj)[..., 0, :][tuple(idx.T)] * FLIP
            q = p + u
            err = np.linalg.norm(q + sample_ras(fields[other], q) - p, axis=1)
            assert err.max() < tol, (case, grid, err.max())
        ic = truth(dataset, case)["inverse_consistency"]
        assert ic["mr2us_then_us2mr_in_us_gland"]["max_mm"] < tol


def test_jacobian_determinant_positive(dataset):
    for case, split in SPLIT_OF.items():
        for folder in ("ddf_mr2us", "ddf_us2mr"):
            det = jacobian_det(load(dataset, split, folder, case))
            assert det.min() > 0, (case, folder, det.min())
            assert det.max() > 1.05 or det.min() < 0.95  # a real deformation, not a rigid motion


def test_transform_hand_worked():
    no_elastic = dict(
        elastic_centres=np.zeros((1, 3)),
        elastic_amplitudes=np.zeros((1, 3)),
        elastic_sigma=10.0,
        probe_point=np.zeros(3),
        probe_axis=[0, 0, 1],
    )
    shift = PhantomTransform(np.eye(3), np.zeros(3), [3.0, 0, 0], compression=0.0, compression_width=10.0, **no_elastic)
    assert np.allclose(shift.forward([[1.0, 2, 3]]), [[4.0, 2, 3]])
    quarter = np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])  # 90° about +z
    turn = PhantomTransform(quarter, [1.0, 0, 0], np.zeros(3), compression=0.0, compression_width=10.0, **no_elastic)
    assert np.allclose(turn.forward([[2.0, 0, 5]]), [[1.0, 1, 5]])  # (2,0,5) about (1,0,0): +x arm turns to +y
    # probe push: a point s mm from the axis moves outwards by a·exp(-1/2); points on the axis stay
    push = PhantomTransform(np.eye(3), np.zeros(3), np.zeros(3), compression=6.0, compression_width=12.0, **no_elastic)
    assert np.allclose(push.forward([[12.0, 0, 7], [0, 0, 4]]), [[12 + 6 * np.exp(-0.5), 0, 7], [0, 0, 4]])
    # the numerical inverse undoes a full transform with elastic field and compression
    rng = np.random.default_rng(0)
    full = PhantomTransform(
        np.eye(3),
        np.zeros(3),
        [1.0, 2, 0],
        rng.normal(0, 10, (6, 3)),
        rng.normal(0, 2, (6, 3)),
        15.0,
        [0, -20, 0],
        [0, 0, 1],
        6.0,
        12.0,
    )
    x = rng.normal(0, 20, (50, 3))
    assert np.abs(full.inverse(full.forward(x)) - x).max() < 1e-4


def test_ddf_sign_convention_on_disk(tmp_path):
    """A stored field is LPS mm: the first two components are the negated RAS displacement."""
    case = generate_case(3, 0, "small")
    phi = case["transform"]
    p = np.array([[0.0, 0.0, 0.0]])  # MR world origin = centre of the MR grid (voxel ((40-1)/2, ...)
    write_case(case, tmp_path, "train", "case000000", preview=False)
    img = nib.load(str(tmp_path / "train" / "ddf_us2mr" / "case000000.nii.gz"))
    expected_ras = phi.forward(p)[0] - p[0]
    assert np.allclose(sample_ras(img, p)[0], expected_ras, atol=0.05)
    assert np.allclose(img.affine[:3, 3], [-46.8, -50.4, -50.4])  # -(n-1)/2 * 2.4 mm


def test_split_counts_by_hand():
    assert split_counts(8, "0.7,0.15,0.15") == [6, 1, 1]
    assert split_counts(20, (0.7, 0.15, 0.15)) == [14, 3, 3]
    assert split_counts(3, "0.7,0.15,0.15") == [1, 1, 1]
    assert split_counts(1, "0.7,0.15,0.15") == [1, 0, 0]
    assert split_counts(4, "0,0,1") == [0, 0, 4]  # a zero fraction stays empty
    assert split_counts(5, "0,1,1") == [0, 3, 2]
    with pytest.raises(InputError):
        split_counts(5, "0.7,0.3")


def test_refuses_non_empty_output(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match=str(tmp_path)):
        synth(str(tmp_path), cases=1, preview=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    synth(str(tmp_path), cases=1, preview=False, overwrite=True)
    assert (tmp_path / "train" / "mr_images" / "case000000.nii.gz").is_file()
    with pytest.raises(InputError, match="size"):
        synth(str(tmp_path / "new"), cases=1, size="huge")


def test_full_case_shapes_and_spacing(tmp_path):
    write_case(generate_case(0, 2, "full"), tmp_path, "train", "case000002", preview=False)
    shapes = {"mr": (120, 128, 128), "us": (81, 118, 88)}
    for mod, shape in shapes.items():
        img = nib.load(str(tmp_path / "train" / f"{mod}_images" / "case000002.nii.gz"))
        lab = nib.load(str(tmp_path / "train" / f"{mod}_labels" / "case000002.nii.gz"))
        assert img.shape == shape and lab.shape == shape + (6,)
        assert np.allclose(nib.affines.voxel_sizes(img.affine), 0.8) and np.allclose(lab.affine, img.affine)
        assert np.asarray(lab.dataobj)[..., 0].sum() > 10000  # a gland of tens of cm³ at 0.512 mm³ per voxel
    us = nib.load(str(tmp_path / "train" / "us_images" / "case000002.nii.gz"))
    assert np.abs(us.affine[:3, :3] / 0.8).max() < 0.999  # index 2: oblique TRUS
