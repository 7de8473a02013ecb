"""Composed transforms: rigid (4x4, LPS) + deformable (network box field), resampling, and the files out.

Conventions (``../docs/pipeline.md``):

- a *rigid* is a 4x4 homogeneous matrix acting on LPS mm points and mapping FIXED points to MOVING
  points (ITK/ANTs "resampling" direction);
- a *box field* is a displacement field (H, W, D, 3) in LPS mm on the network box (see
  :mod:`scripts.spatial.geometry`), zero outside the box;
- the *composed* transform is ``T(p) = R(p + u(p))``, written as a displacement field
  ``T(p) - p`` (X, Y, Z, 3) in LPS mm on the fixed image's own grid. Outside the box only R acts.
- files: NIfTI displacement field (X, Y, Z, 1, 3), intent "vector", affine of its grid
  (:func:`write_field_nifti`; ITK, ANTs and 3D Slicer read it as a displacement field in LPS);
  ITK ``.h5`` ``DisplacementFieldTransform`` (:func:`write_field_h5`); ANTs ``.mat`` affine
  (:func:`write_ants_rigid`).
"""

from __future__ import annotations

import os
import platform

import ants
import h5py
import numpy as np
import torch

from scripts.data.nifti import InputError, atomic_write, load_array, read_nifti, write_nifti
from scripts.spatial.geometry import (
    NetworkBox,
    apply_affine,
    grid_points,
    lps_affine,
    mm_to_box_ddf,
    sample,
    sample_box_field,
)

__all__ = [
    "FieldNetwork",
    "field_to_box_ddf",
    "ants_image",
    "compose_field",
    "inverse_composed_field",
    "invert_box_field",
    "warp",
    "write_field_nifti",
    "read_field_nifti",
    "write_field_h5",
    "rigid_to_ants",
    "rigid_from_ants",
    "write_ants_rigid",
    "read_ants_rigid",
]


def compose_field(box_field_mm, box: NetworkBox, rigid, affine_ras, shape) -> np.ndarray:
    """Displacement ``R(p + u(p)) - p`` (X, Y, Z, 3, LPS mm) at the voxel centres of a grid.

    Args:
        box_field_mm: deformable part u on the box, (H, W, D, 3) LPS mm; ``None`` for rigid only.
        box: the network box it lives on.
        rigid: 4x4 fixed -> moving LPS matrix R; ``None`` for identity.
        affine_ras, shape: the output grid (usually the fixed image's), nibabel affine and 3-D shape.
    """
    points = grid_points(affine_ras, shape)
    moved = points if box_field_mm is None else points + sample_box_field(box_field_mm, box, points)
    if rigid is not None:
        moved = apply_affine(np.asarray(rigid, np.float64), moved)
    return moved - points


def inverse_composed_field(inverse_box_field_mm, box: NetworkBox, rigid, affine_ras, shape) -> np.ndarray:
    """Displacement of the inverse ``q -> W(R^-1 q)`` (X, Y, Z, 3, LPS mm) on a grid (usually the moving image's).

    ``inverse_box_field_mm`` is the inverse deformable part w on the box ((H, W, D, 3) LPS mm,
    ``W(p) = p + w(p)``), ``None`` for rigid only; ``rigid`` is the forward (fixed -> moving) matrix.
    """
    points = grid_points(affine_ras, shape)
    back = points if rigid is None else apply_affine(np.linalg.inv(np.asarray(rigid, np.float64)), points)
    if inverse_box_field_mm is not None:
        back = back + sample_box_field(inverse_box_field_mm, box, back)
    return back - points


def invert_box_field(box_field_mm, box: NetworkBox, iterations: int = 50, tolerance_mm: float = 1e-3) -> np.ndarray:
    """Numerical inverse of a box displacement field (H, W, D, 3, LPS mm) with ITK's fixed-point inverter.

    For fields that do not come from a velocity (ground truth, external fields); the network's own
    inverse is the integral of -v instead. Uses ``ants.invert_displacement_field``.
    """
    field = _ants_field(box_field_mm, box.affine)
    zero = _ants_field(np.zeros_like(box_field_mm), box.affine)
    inverse = ants.invert_displacement_field(
        field,
        zero,
        maximum_number_of_iterations=iterations,
        mean_error_tolerance_threshold=tolerance_mm,
        max_error_tolerance_threshold=10 * tolerance_mm,
        enforce_boundary_condition=False,
    )
    return inverse.numpy().astype(np.float64)


def warp(data, src_affine_ras, field_mm, dst_affine_ras, order: int = 1) -> np.ndarray:
    """ONE resampling of a volume through a composed field: ``out(p) = data(p + field(p))``.

    Args:
        data: (X, Y, Z) or (X, Y, Z, C) on the source grid (``src_affine_ras``), e.g. the moving image.
        field_mm: (X', Y', Z', 3) LPS mm displacement on the destination grid (``dst_affine_ras``).
        order: 1 linear, 0 nearest. Zero padding outside the source volume.
    Returns:
        float64 array (X', Y', Z'[, C]) on the destination grid, interpolated in float32 arithmetic (images and
        labels: about 1e-6 relative to float64, and 1.6x faster).
    """
    points = grid_points(dst_affine_ras, field_mm.shape[:3]) + field_mm
    return sample(data, src_affine_ras, points, order=order, single=True)


def write_field_nifti(field_mm, affine_ras, path, overwrite: bool = False):
    """Write (X, Y, Z, 3) LPS mm as an ITK displacement-field NIfTI: (X, Y, Z, 1, 3) float32, intent "vector"."""
    data = np.asarray(field_mm, np.float32)[:, :, :, None, :]
    return write_nifti(data, affine_ras, path, overwrite=overwrite, intent="vector")


def read_field_nifti(path):
    """Read a displacement-field NIfTI written in this convention; returns ``(field (X, Y, Z, 3) LPS mm, affine)``."""
    img = read_nifti(path, ndim=5, what="displacement field")
    if img.shape[3:] != (1, 3):
        raise InputError(f"{path}: displacement field has shape {img.shape}, expected (X, Y, Z, 1, 3)")
    return load_array(img, path, "displacement field", np.float64)[:, :, :, 0, :], img.affine


def _itk_geometry(affine_ras):
    """ITK/ANTs grid description of a nibabel affine: LPS origin (3,), spacing (3,) mm, unit direction columns (3, 3)."""
    lps = lps_affine(affine_ras)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    return lps[:3, 3], spacing, lps[:3, :3] / spacing


def ants_image(data, affine_ras, has_components: bool = False):
    """An ANTs image of an (X, Y, Z[, 3]) array on a nibabel grid (ANTs works in LPS)."""
    origin, spacing, direction = _itk_geometry(affine_ras)
    return ants.from_numpy(
        np.asarray(data, np.float32),
        origin=origin.tolist(),
        spacing=spacing.tolist(),
        direction=direction,
        has_components=has_components,
    )


def _ants_field(field_mm, affine_ras):
    """An ANTs vector image (3 components) holding an (X, Y, Z, 3) LPS mm field on a nibabel grid."""
    return ants_image(field_mm, affine_ras, has_components=True)


def write_field_h5(field_mm, affine_ras, path, overwrite: bool = False):
    """Write (X, Y, Z, 3) LPS mm on a grid as an ITK ``DisplacementFieldTransform`` (``.h5``).

    ITK's HDF5 transform layout, written with h5py: building the transform in ITK Python costs 12-13 s
    per process (the lazy load of its wrapped modules, docs/speed.md) against milliseconds here. The layout:
    one group ``TransformGroup/0`` with the type name, the field as parameters (x fastest, components interleaved,
    float64) and the fixed parameters size, origin (LPS mm), spacing (mm) and direction (row-major).
    ``tests/test_transform_io.py`` checks the file against ITK's own writer and reads it back with ITK.
    """
    origin, spacing, direction = _itk_geometry(affine_ras)
    field = np.asarray(field_mm, np.float64)
    fixed = np.concatenate([field.shape[:3], origin, spacing, direction.ravel()])
    text = h5py.string_dtype("ascii")

    def save(tmp):
        with h5py.File(tmp, "w") as h5:
            for key, value in {
                "HDFVersion": f"HDF5 library version: {h5py.version.hdf5_version}",
                "ITKVersion": "5.4.7",
                "OSName": platform.system(),
                "OSVersion": platform.release(),
            }.items():
                h5.create_dataset(key, data=[value], dtype=text)
            group = h5.create_group("TransformGroup").create_group("0")
            group.create_dataset("TransformType", data=["DisplacementFieldTransform_double_3_3"], dtype=text)
            group.create_dataset("TransformFixedParameters", data=fixed)
            group.create_dataset("TransformParameters", data=np.transpose(field, (2, 1, 0, 3)).ravel())

    return atomic_write(path, save, overwrite)


def rigid_to_ants(rigid):
    """ANTs ``AffineTransform`` (float64) for a 4x4 LPS point matrix."""
    rigid = np.asarray(rigid, np.float64)
    return ants.create_ants_transform(
        transform_type="AffineTransform",
        precision="double",
        dimension=3,
        matrix=rigid[:3, :3],
        translation=rigid[:3, 3],
        center=np.zeros(3),
    )


def rigid_from_ants(transform) -> np.ndarray:
    """4x4 LPS point matrix of any linear ANTs transform (read off its action on four points)."""
    basis = np.vstack([np.zeros(3), np.eye(3)])
    mapped = np.array([transform.apply_to_point(tuple(p)) for p in basis])
    out = np.eye(4)
    out[:3, 3] = mapped[0]
    out[:3, :3] = (mapped[1:] - mapped[0]).T
    return out


def write_ants_rigid(rigid, path, overwrite: bool = False):
    """Write a 4x4 LPS fixed -> moving matrix as an ANTs/ITK ``.mat`` (``AffineTransform_double_3_3``)."""
    transform = rigid_to_ants(rigid)
    return atomic_write(path, lambda tmp: ants.write_transform(transform, tmp), overwrite)


def read_ants_rigid(path) -> np.ndarray:
    """Read an ANTs ``.mat`` linear transform as a 4x4 LPS point matrix."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: transform file does not exist")
    return rigid_from_ants(ants.read_transform(str(path)))


class FieldNetwork:
    """A stand-in registration network returning a given fixed-grid displacement field (ITK convention) as a box
    DDF, to push a ground-truth field through exactly the registrar's post-stage. Follows the network contract
    (:mod:`scripts.networks.contract`): ``forward_train(image (1, 2, H, W, D))`` -> ``{"ddf": (1, 3, H, W, D) box
    voxels, "velocity": None, "features": None}``; no integrator (the registrar inverts the field numerically)."""

    integrate = None

    def __init__(self, field_path, box):
        self.ddf = torch.as_tensor(field_to_box_ddf(field_path, box)[None], dtype=torch.float32)

    def forward_train(self, image):
        return {"ddf": self.ddf.to(image.device), "velocity": None, "features": None}

    def __call__(self, image):
        return self.forward_train(image)["ddf"]


def field_to_box_ddf(field_path, box, rigid=None) -> np.ndarray:
    """A fixed-grid displacement field file (ITK convention, LPS mm) as the network's box field (3, H, W, D),
    box voxels, after the LPS fixed -> moving ``rigid`` (None: identity): u(p) = R^-1(p + d(p)) - p at the box
    points, so that R(p + u(p)) is the field's map, as :func:`scripts.spatial.composed.compose_field` composes."""
    field, affine = read_field_nifti(field_path)
    points = grid_points(box.affine, box.shape)
    moved = points + sample(field, affine, points)
    if rigid is not None:
        moved = apply_affine(np.linalg.inv(np.asarray(rigid, np.float64)), moved)
    return mm_to_box_ddf(moved - points, box)
