"""Composed rigid + deformable transforms: analytic values, and ANTs/ITK applying the written files.

The pair, rigid and deformation are the analytic ones of ``_oblique.py`` (oblique anisotropic fixed
grid, permuted/flipped moving grid, deformation with distinct x, y, z components).
"""

import ants
import h5py
import itk
import nibabel as nib
import numpy as np
import pytest
from _oblique import FIX, FIX_SHAPE, MOV, MOV_SHAPE, RIGID, dice, full_map, gland, image, points, u

from scripts.data.nifti import write_nifti
from scripts.spatial.composed import (
    compose_field,
    inverse_composed_field,
    invert_box_field,
    read_ants_rigid,
    read_field_nifti,
    warp,
    write_ants_rigid,
    write_field_h5,
    write_field_nifti,
)
from scripts.spatial.geometry import network_box

SIZE, CROP = (16, 16, 12), 2


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """Bundle-side results and the files written for ANTs/ITK."""
    d = tmp_path_factory.mktemp("oblique")
    box = network_box(FIX, FIX_SHAPE, SIZE, CROP)
    u_box = u(points(box.affine, box.shape))
    moving = image(points(MOV, MOV_SHAPE)).astype(np.float32)
    moving_gland = gland(points(MOV, MOV_SHAPE))
    composed = compose_field(u_box, box, RIGID, FIX, FIX_SHAPE)
    write_nifti(moving, MOV, d / "moving.nii.gz")
    write_nifti(moving_gland, MOV, d / "moving_gland.nii.gz")
    write_nifti(np.zeros(FIX_SHAPE, np.float32), FIX, d / "fixed.nii.gz")
    write_field_nifti(composed, FIX, d / "composed.nii.gz")
    write_field_h5(composed, FIX, d / "composed.h5")
    write_field_nifti(u_box, box.affine, d / "warp.nii.gz")
    write_ants_rigid(RIGID, d / "rigid.mat")
    warped = warp(np.stack([moving, moving_gland], -1), MOV, composed, FIX)
    return {
        "dir": d,
        "box": box,
        "u_box": u_box,
        "moving": moving,
        "composed": composed,
        "image": warped[..., 0],
        "gland": warped[..., 1] > 0.5,
    }


def test_composed_field_is_analytic_inside_box_and_rigid_outside(scene):
    box, composed = scene["box"], scene["composed"]
    p = points(FIX, FIX_SHAPE)
    index = (p - (np.diag([-1, -1, 1]) @ box.affine[:3, 3])) @ np.linalg.inv(
        np.diag([-1, -1, 1]) @ box.affine[:3, :3]
    ).T
    inner = np.all((index >= 0.5) & (index <= np.array(SIZE) - 1.5), -1)
    outside = np.any((index < -0.5) | (index > np.array(SIZE) - 0.5), -1)
    assert inner.sum() > 1000 and outside.sum() > 500  # the depth slabs exist in this scene
    err = np.linalg.norm(composed - (full_map(p) - p), axis=-1)
    assert err[inner].max() < 0.05  # linear interpolation of a smooth field on ~2 mm voxels
    rigid_only = p @ RIGID[:3, :3].T + RIGID[:3, 3] - p
    np.testing.assert_allclose(composed[outside], rigid_only[outside], atol=1e-9)


def test_bundle_warp_matches_analytic_labels(scene):
    p = points(FIX, FIX_SHAPE)
    expected = gland(full_map(p))
    assert expected.sum() > 500
    assert dice(scene["gland"], expected) >= 0.95


def _check_same(image, labels, scene, where):
    span = scene["moving"].max() - scene["moving"].min()
    assert np.abs(image - scene["image"]).max() <= 1e-3 * span, where
    assert dice(labels > 0.5, scene["gland"]) >= 0.99, where


def test_ants_applies_written_files(scene):
    d = scene["dir"]
    fixed = ants.image_read(str(d / "fixed.nii.gz"))
    for files in ([d / "composed.nii.gz"], [d / "warp.nii.gz", d / "rigid.mat"]):
        files = [str(f) for f in files]
        img = ants.apply_transforms(fixed, ants.image_read(str(d / "moving.nii.gz")), files).numpy()
        lab = ants.apply_transforms(fixed, ants.image_read(str(d / "moving_gland.nii.gz")), files).numpy()
        _check_same(img, lab, scene, files)


def test_itk_applies_written_files(scene):
    d = scene["dir"]
    fixed = itk.imread(str(d / "fixed.nii.gz"), itk.F)
    read = itk.imread(str(d / "composed.nii.gz"), itk.Vector[itk.F, 3])  # ITK's reader, as Slicer/ANTs use it
    field = itk.image_from_array(itk.array_from_image(read).astype(np.float64), is_vector=True)
    field.CopyInformation(read)  # the resampler needs a double-precision transform
    from_nifti = itk.DisplacementFieldTransform[itk.D, 3].New()
    from_nifti.SetDisplacementField(field)
    from_h5 = itk.transformread(str(d / "composed.h5"))[0]
    for name, transform in (("h5", from_h5), ("nifti", from_nifti)):
        out = []
        for f in ("moving.nii.gz", "moving_gland.nii.gz"):
            res = itk.resample_image_filter(
                itk.imread(str(d / f), itk.F), transform=transform, use_reference_image=True, reference_image=fixed
            )
            out.append(itk.array_from_image(res).transpose(2, 1, 0))
        _check_same(out[0], out[1], scene, name)


def test_h5_field_holds_what_itks_own_writer_writes(scene, tmp_path):
    composed = scene["composed"]
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ FIX
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    field = itk.image_from_array(np.ascontiguousarray(composed.transpose(2, 1, 0, 3)), is_vector=True)
    field.SetSpacing(spacing.tolist())
    field.SetOrigin(lps[:3, 3].tolist())
    field.SetDirection(itk.matrix_from_array(lps[:3, :3] / spacing))
    transform = itk.DisplacementFieldTransform[itk.D, 3].New()
    transform.SetDisplacementField(field)
    itk.transformwrite([transform], str(tmp_path / "itk.h5"))
    with h5py.File(scene["dir"] / "composed.h5") as ours, h5py.File(tmp_path / "itk.h5") as theirs:
        for key in ("TransformType", "TransformFixedParameters", "TransformParameters"):
            a, b = ours[f"TransformGroup/0/{key}"][()], theirs[f"TransformGroup/0/{key}"][()]
            assert a.dtype.kind == b.dtype.kind and a.shape == b.shape, key
            (
                np.testing.assert_array_equal(a, b, err_msg=key)
                if a.dtype.kind == "O"
                else np.testing.assert_allclose(a, b, atol=1e-12)
            )


def test_nifti_field_header_and_round_trip(scene):
    img = nib.load(str(scene["dir"] / "composed.nii.gz"))
    assert img.shape == FIX_SHAPE + (1, 3)
    assert img.header.get_intent()[0] == "vector"
    field, affine = read_field_nifti(scene["dir"] / "composed.nii.gz")
    np.testing.assert_allclose(affine, FIX, atol=1e-5)
    np.testing.assert_allclose(field, scene["composed"], atol=1e-5)


def test_rigid_mat_round_trip_and_point_action(scene):
    np.testing.assert_allclose(read_ants_rigid(scene["dir"] / "rigid.mat"), RIGID, atol=1e-7)
    tx = ants.read_transform(str(scene["dir"] / "rigid.mat"))
    np.testing.assert_allclose(tx.apply_to_point((1.0, 2.0, 3.0)), RIGID[:3, :3] @ [1, 2, 3] + RIGID[:3, 3], atol=1e-7)


def test_inverse_maps_landmarks_back_and_ants_applies_it(scene, tmp_path):
    box, composed = scene["box"], scene["composed"]
    w_box = invert_box_field(scene["u_box"], box)
    inverse = inverse_composed_field(w_box, box, RIGID, MOV, MOV_SHAPE)
    # landmark centres: gland centre of the fixed image and two more interior points
    landmarks = np.array([[1.0, 0.5, -0.5], [-4.0, 3.0, 2.0], [3.0, -2.0, -3.0]])
    from scripts.spatial.geometry import sample

    forward = landmarks + sample(composed, FIX, landmarks)
    np.testing.assert_allclose(forward, full_map(landmarks), atol=0.05)
    back = forward + sample(inverse, MOV, forward)
    assert np.linalg.norm(back - landmarks, axis=-1).max() < 0.5
    # ANTs: moving -> fixed with the inverted rigid and the inverse box warp
    write_field_nifti(w_box, box.affine, tmp_path / "inverse_warp.nii.gz")
    fixed_data = image(points(FIX, FIX_SHAPE)).astype(np.float32)
    write_nifti(fixed_data, FIX, tmp_path / "fixed_img.nii.gz")
    ours = warp(fixed_data, FIX, inverse, MOV)
    theirs = ants.apply_transforms(
        ants.image_read(str(scene["dir"] / "moving.nii.gz")),
        ants.image_read(str(tmp_path / "fixed_img.nii.gz")),
        [str(scene["dir"] / "rigid.mat"), str(tmp_path / "inverse_warp.nii.gz")],
        whichtoinvert=[True, False],
    ).numpy()
    assert np.abs(ours - theirs).max() <= 1e-3 * (fixed_data.max() - fixed_data.min())


def test_flipped_fixed_grid_gives_flipped_composed_field(scene):
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, FIX_SHAPE[0] - 1
    affine = FIX @ flip
    box = network_box(affine, FIX_SHAPE, SIZE, CROP)
    composed = compose_field(u(points(box.affine, box.shape)), box, RIGID, affine, FIX_SHAPE)
    np.testing.assert_allclose(composed, scene["composed"][::-1], atol=1e-9)
