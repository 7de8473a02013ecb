"""Network box, reorientation and voxel <-> mm conversions, checked against hand-computed values."""

import numpy as np
import pytest
from _oblique import FIX, FIX_SHAPE, RAS2LPS, points

from scripts.spatial.geometry import box_ddf_to_mm, grid_points, mm_to_box_ddf, network_box, reoriented_grid, sample

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
        np.testing.assert_allclose(
            points(affine, shape).reshape(-1, 3).mean(0), points(FIX, FIX_SHAPE).reshape(-1, 3).mean(0), atol=1e-9
        )
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
    np.testing.assert_allclose(
        grid_points(box.affine, box.shape).reshape(-1, 3).mean(0),
        points(FIX, FIX_SHAPE).reshape(-1, 3).mean(0),
        atol=1e-9,
    )


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


# ---------------------------------------------------------------- one geometry for every reader (scripts/data/nifti.py)


def _header_file(path, affine, scode=1, qcode=1, sform=None, shape=(6, 7, 5), raw=None):
    """A NIfTI file whose qform is ``affine`` (code ``qcode``) and sform ``sform`` or ``affine`` (code ``scode``);
    ``raw``: {byte offset: float32 value} written into the stored header afterwards (what nibabel would repair)."""
    import struct

    import nibabel as nib

    img = nib.Nifti1Image(np.arange(np.prod(shape), dtype=np.float32).reshape(shape), affine)
    img.set_qform(affine, code=qcode)
    img.set_sform(affine if sform is None else sform, code=scode)
    nib.save(img, str(path))
    if raw:
        data = bytearray(path.read_bytes())
        for offset, value in raw.items():
            data[offset : offset + 4] = struct.pack("<f", value)
        path.write_bytes(bytes(data))
    return path


def _corners_lps(path, reader):
    """LPS mm positions of the 8 corner voxels of ``path`` as nibabel, ITK or ANTs read them."""
    import nibabel as nib

    img = nib.load(str(path))
    shape = img.shape[:3]
    corners = np.array(
        [[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)], float
    )
    if reader == "nibabel":
        lps = RAS2LPS @ img.affine
        return corners @ lps[:3, :3].T + lps[:3, 3]
    if reader == "itk":
        import itk

        im = itk.imread(str(path), itk.F)
        direction = itk.array_from_matrix(im.GetDirection())
        spacing, origin = np.asarray(itk.spacing(im)), np.asarray(itk.origin(im))
    else:
        import ants

        im = ants.image_read(str(path))
        direction, spacing, origin = np.asarray(im.direction), np.asarray(im.spacing), np.asarray(im.origin)
    return origin + (corners * spacing) @ direction.T


def _itk_written_oblique(path):
    """A slightly oblique volume stored in ITK's LPS order, written by ITK (through ANTs): both codes 1, and a qform
    that misses the sform by 0.015 mm at the corners (the float32 quaternion of a rotation 0.03 degrees from 180),
    which read_nifti accepts because it stores the sform's own parameters; ITK and nibabel read the sform."""
    import ants
    from _oblique import rotation

    direction = rotation((1, 2, 3), 0.03)  # 0.03 degrees off ITK's identity (LPS), 179.97 degrees from RAS
    ants.from_numpy(
        np.random.default_rng(0).random((40, 50, 30)).astype(np.float32),
        origin=[-30.0, 20.0, 10.0],
        spacing=[0.5, 0.6, 3.0],
        direction=direction,
    ).to_file(str(path))
    return path


FLIP_Y = np.diag([1.0, -1, 1, 1])
FLIP_Y[1, 3] = 6  # index j -> 6 - j on a 7-voxel axis
PERMUTE = np.eye(4)[[2, 0, 1, 3]]
ACCEPTED = {
    "qform and sform, one affine (write_nifti, ITK)": lambda p: _header_file(p, FIX),
    "sform only (nib.Nifti1Image's default)": lambda p: _header_file(p, FIX, scode=2, qcode=0),
    "qform only": lambda p: _header_file(p, FIX, scode=0, qcode=1),
    "codes 2 and 2, one affine (ITK reads the qform)": lambda p: _header_file(p, AXIAL, scode=2, qcode=2),
    "oblique, anisotropic": lambda p: _header_file(p, FIX, shape=FIX_SHAPE),
    "flipped axis": lambda p: _header_file(p, FIX @ FLIP_Y),
    "permuted axes": lambda p: _header_file(p, FIX @ PERMUTE, shape=(5, 6, 7)),
    "ITK-written oblique LPS volume": _itk_written_oblique,
}


@pytest.mark.parametrize("variant", list(ACCEPTED))
def test_nibabel_itk_and_ants_read_one_geometry_from_every_accepted_header(variant, tmp_path):
    from scripts.data.nifti import read_nifti

    path = ACCEPTED[variant](tmp_path / "image.nii")
    read_nifti(path)  # accepted
    reference = _corners_lps(path, "nibabel")
    for reader in ("itk", "ants"):
        np.testing.assert_allclose(_corners_lps(path, reader), reference, atol=1e-4, err_msg=reader)


_SHEAR = FIX.copy()
_SHEAR[:3, 1] += 0.05 * FIX[:3, 0]
_SINGULAR = FIX.copy()
_SINGULAR[:3, 2] = 0.0
_NAN = FIX.copy()
_NAN[0, 3] = np.nan
_MOVED = FIX.copy()
_MOVED[:3, 3] += [2.0, 0.0, 0.0]
_PIXDIM = 80  # byte offset of pixdim[1] in a NIfTI-1 header (pixdim[0], qfac, at 76)
_NEAR_180 = np.eye(4)  # the grid of _itk_written_oblique, in RAS: its float32 qform misses it by 0.015 mm
_NEAR_180[:3, :3] = np.diag([-1.0, -1, 1]) @ __import__("_oblique").rotation((1, 2, 3), 0.03) * [0.5, 0.6, 3.0]
# (make, the message after "<path>: image", what ANTs/ITK do with the file: "differs" from nibabel by
# more than 1e-3 mm at a corner, "fails", or "same" (ITK 5.4 agrees, other readers and older ITK do not))
REFUSED = {
    "no orientation (both codes 0)": (lambda p: _header_file(p, FIX, 0, 0), " has no orientation", "differs"),
    "sform and qform disagree (sform_code 1)": (
        lambda p: _header_file(p, FIX, 1, 1, sform=_MOVED),
        "'s sform (code 1) and qform (code 1) disagree by 2 mm",
        "same",
    ),
    "sform and qform disagree (sform_code 2)": (
        lambda p: _header_file(p, FIX, 2, 1, sform=_MOVED),
        "'s sform (code 2) and qform (code 1) disagree by 2 mm",
        "differs",
    ),
    "pixdim differs from the sform's voxel size": (
        lambda p: _header_file(p, FIX, 1, 0, raw={_PIXDIM: 1.5}),
        "'s voxel size in pixdim (1.5, 1.2, 1.1) mm differs",
        "differs",
    ),
    "sheared sform": (lambda p: _header_file(p, FIX, 1, 0, sform=_SHEAR), " has a sheared sform", "fails"),
    "singular sform": (lambda p: _header_file(p, FIX, 1, 0, sform=_SINGULAR), " has a singular sform", "fails"),
    "non-finite sform": (lambda p: _header_file(p, FIX, 1, 0, sform=_NAN), " has a non-finite sform", "fails"),
    "zero voxel size": (
        lambda p: _header_file(p, FIX, 0, 1, raw={_PIXDIM + 4: 0.0}),
        " has voxel size (1, 0, 1.1) mm in pixdim",
        "same",
    ),
    "negative voxel size": (
        lambda p: _header_file(p, FIX, 0, 1, raw={_PIXDIM + 4: -1.2}),
        " has voxel size (1, -1.2, 1.1) mm in pixdim",
        "differs",
    ),
    "qfac neither 1 nor -1": (
        lambda p: _header_file(p, FIX, 0, 1, raw={76: -0.5}),
        " has qfac (pixdim[0]) -0.5",
        "differs",
    ),
    "qform too imprecise for sform_code 2": (
        lambda p: _header_file(p, _NEAR_180, 2, 1, shape=(40, 50, 30)),
        "'s qform stores its sform only to",
        "differs",
    ),
}


@pytest.mark.parametrize("variant", list(REFUSED))
def test_headers_read_differently_are_refused_naming_the_file(variant, tmp_path):
    import re

    from scripts.data.nifti import InputError, read_nifti

    make, message, ants_reads = REFUSED[variant]
    path = make(tmp_path / "image.nii")
    with pytest.raises(InputError) as err:
        read_nifti(path)
    assert str(err.value).startswith(f"{path}: image{message}"), str(err.value)
    assert "\n" not in str(err.value) and re.search(r"nibabel|resample|fslorient|code", str(err.value))
    try:  # the reason, checked against ANTs (ITK's NIfTI reader) as installed
        gap = np.abs(_corners_lps(path, "ants") - _corners_lps(path, "nibabel")).max()
        seen = "fails" if np.isnan(gap) else "same" if gap <= 1e-3 else "differs"
    except RuntimeError:
        seen = "fails"
    assert seen == ants_reads


def test_too_few_voxels_along_an_axis_is_refused_when_asked(tmp_path):
    from scripts.data.nifti import MIN_VOXELS_PER_AXIS, InputError, read_nifti

    path = _header_file(tmp_path / "slab.nii", FIX, shape=(6, 7, 1))
    assert read_nifti(path).shape == (6, 7, 1)  # any one-slice image is a valid NIfTI file ...
    with pytest.raises(
        InputError,
        match=r"slab\.nii: fixed image has 1 voxel along axis 2 \(shape \(6, 7, 1\)\); "
        r"registration needs at least 4 along every axis",
    ):
        read_nifti(path, ndim=3, what="fixed image", min_size=MIN_VOXELS_PER_AXIS)  # ... but not one to register
