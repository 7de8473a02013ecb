"""The pair stage: read and check a pair, rigid pre-alignment, the network box, the network's inputs.

One :class:`PairStage` object, declared once in ``configs/pair.json`` and loaded by both ``configs/train.json``
(wrapped by :class:`scripts.data.transforms.PairToBoxd`) and ``configs/inference.json`` (inside the
:class:`scripts.inference.registrar.Registrar`), so a network is trained on exactly the geometry it is run on.
Frames: images keep their NIfTI (RAS) affines; the rigid matrix is 4x4 LPS mm, fixed -> moving (ANTs'
convention); the box is the fixed image's network grid (:func:`scripts.spatial.geometry.network_box`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.transforms import ScaleIntensityRangePercentiles

from scripts.data.nifti import MIN_VOXELS_PER_AXIS, InputError, load_array, read_gland_mask, read_nifti
from scripts.spatial.geometry import NetworkBox, apply_affine, grid_points, network_box, sample, world_to_voxel

__all__ = ["Volume", "PairStage", "load_pair_stage", "check_contrast", "check_overlap"]


@dataclass
class Volume:
    """One image or label volume: ``data`` (X, Y, Z) or (X, Y, Z, C) float array, ``affine`` 4x4 voxel -> RAS mm."""

    data: np.ndarray
    affine: np.ndarray


def check_contrast(data: np.ndarray, path, what: str = "image") -> None:
    """Raise :class:`InputError` when an image is constant: percentile scaling and mutual information need contrast."""
    if data.size and data.min() == data.max():
        raise InputError(f"{path}: {what} is constant (every voxel is {data.flat[0]:g}); registration needs contrast")


def check_overlap(moving: Volume, rigid, box: NetworkBox, moving_path, fixed_path) -> None:
    """Raise :class:`InputError` when no voxel of the network ``box`` (on the fixed image) maps, through the
    LPS fixed -> moving ``rigid``, into the moving image's field of view: the network would see no moving image."""
    index = world_to_voxel(apply_affine(rigid, grid_points(box.affine, box.shape)), moving.affine)
    if not np.all((index >= -0.5) & (index <= np.asarray(moving.data.shape[:3], np.float64) - 0.5), axis=-1).any():
        raise InputError(
            f"{moving_path}: field of view does not overlap that of {fixed_path} after the rigid "
            "pre-alignment (check both images' affines, or enable the rigid step)"
        )


class PairStage:
    """What happens to a pair before the network, for training and inference alike.

    Args:
        spatial_size: the network box (H, W, D) in voxels; depth_crop, axcodes: see
            :func:`scripts.spatial.geometry.network_box`.
        use_rigid: run the ANTs rigid step (:func:`scripts.spatial.rigid.rigid_prealign`); false: identity.
        rigid_args: settings of that step (every setting is stored, defaults included: part of the training
            cache key; an unknown name is an :class:`InputError`).
        roi_mask: multiply each scaled box image by its gland mask (the paper's ROI images).
        intensity: per-image intensity transform on the box (default percentiles 1–99 -> [0, 1], clipped).
    """

    def __init__(
        self,
        spatial_size,
        depth_crop: int = 4,
        axcodes: str = "RAS",
        use_rigid: bool = True,
        rigid_args: dict | None = None,
        roi_mask: bool = False,
        intensity=None,
    ):
        from scripts.spatial.rigid import rigid_settings  # here: the rigid module imports ANTs

        self.spatial_size, self.depth_crop, self.axcodes = tuple(int(s) for s in spatial_size), int(depth_crop), axcodes
        self.use_rigid, self.roi_mask = bool(use_rigid), bool(roi_mask)
        self.rigid_args = rigid_settings(rigid_args)
        self.intensity = intensity or ScaleIntensityRangePercentiles(lower=1, upper=99, b_min=0.0, b_max=1.0, clip=True)

    @staticmethod
    def read(path, what: str) -> Volume:
        """A checked 3-D image (at least ``MIN_VOXELS_PER_AXIS`` per axis, finite, not constant)."""
        img = read_nifti(path, ndim=3, what=what, min_size=MIN_VOXELS_PER_AXIS)
        volume = Volume(load_array(img, path, what), img.affine)
        check_contrast(volume.data, path, what)
        return volume

    @staticmethod
    def read_mask(path, what: str) -> Volume:
        """A gland mask: 3-D, or channel 0 of a 4-D channel-last label."""
        data, img = read_gland_mask(path, what)
        return Volume(data, img.affine)

    def rigid(self, fixed, moving, fixed_mask=None, moving_mask=None) -> tuple[np.ndarray, dict]:
        """The 4x4 LPS fixed -> moving matrix and how it was found (paths or ANTs images, masks optional)."""
        if not self.use_rigid:
            return np.eye(4), {"method": "none"}
        from scripts.spatial.rigid import rigid_prealign  # here: the rigid module imports ANTs

        rigid, info = rigid_prealign(fixed, moving, fixed_mask, moving_mask, **self.rigid_args)
        return np.asarray(rigid, np.float64), info

    def box_on(self, fixed_affine, fixed_shape) -> NetworkBox:
        """The network box on a fixed image of this affine and shape (:func:`scripts.spatial.geometry.network_box`)."""
        return network_box(fixed_affine, fixed_shape[:3], self.spatial_size, self.depth_crop, self.axcodes)

    def box(
        self, moving: Volume, fixed: Volume, rigid, moving_path="moving image", fixed_path="fixed image"
    ) -> NetworkBox:
        """The network box on the fixed image, checked to see some of the moving image through ``rigid``."""
        box = self.box_on(fixed.affine, fixed.data.shape)
        check_overlap(moving, rigid, box, moving_path, fixed_path)
        return box

    def inputs(self, moving: Volume, fixed: Volume, rigid, box: NetworkBox, masks=None) -> torch.Tensor:
        """The network input ``(2, H, W, D)`` = [moving seen through ``rigid``, fixed] on ``box``, float32.

        Linear sampling, then ``intensity`` per image; with ``roi_mask``, each scaled image multiplied by its
        gland mask (``masks`` = (moving, fixed) :class:`Volume`; nearest, > 0.5): zeroing after scaling keeps
        the gland's intensity scale.
        """
        if self.roi_mask and masks is None:
            raise InputError("roi_mask needs both gland masks (moving_mask and fixed_mask)")
        fixed_points = grid_points(box.affine, box.shape)
        points = (apply_affine(rigid, fixed_points), fixed_points)
        pair = [sample(v.data, v.affine, p) for v, p in zip((moving, fixed), points)]
        scaled = [torch.as_tensor(self.intensity(torch.as_tensor(x[None], dtype=torch.float32)))[0] for x in pair]
        inputs = torch.stack(scaled)
        if self.roi_mask:
            gland = [sample(m.data, m.affine, p, order=0) > 0.5 for m, p in zip(masks, points)]
            inputs = inputs * torch.as_tensor(np.stack(gland), dtype=inputs.dtype)
        return inputs


def load_pair_stage(config_file, overrides: dict | None = None) -> PairStage:
    """The ``pair`` component of ``config_file`` (``configs/pair.json``), its ids set from ``overrides`` first.

    ``configs/train.json`` and ``configs/inference.json`` both call this with their own ``spatial_size``,
    ``depth_crop``, ``use_rigid`` and ``roi_mask`` (settings stored with trained weights) and ``pair_overrides``
    (e.g. ``{"rigid_args#iterations": [100, 50]}``); every other pair setting has one home, the file.
    """
    parser = ConfigParser()
    parser.read_config(str(config_file))
    for key, value in (overrides or {}).items():
        parser[key] = value
    return parser.get_parsed_content("pair")
