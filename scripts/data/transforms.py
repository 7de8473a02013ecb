"""Dictionary transforms the configs need and MONAI lacks.

:class:`PairToBoxd` builds a training pair on the same physical network box, with the same rigid
pre-alignment, as the inference pipeline (MONAI's spatial transforms resample on array grids and know
nothing of the ANTs rigid or the box).

MONAI has the ``Warp`` block (warp an image with a dense displacement field) but no dictionary
transform around it, so validation postprocessing uses :class:`Warpd` to warp the moving labels with
the network's predicted field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.networks.blocks import Warp
from monai.transforms import MapTransform, Transform
from monai.utils import ensure_tuple_rep

from scripts.data.datalist import DIRECTIONS
from scripts.data.nifti import InputError, load_array, read_nifti
from scripts.evaluation.metrics import centroid
from scripts.inference.pair import Volume
from scripts.spatial.composed import ants_image
from scripts.spatial.geometry import apply_affine, grid_points, sample

__all__ = ["Warpd", "PairToBoxd", "LandmarkErrord", "TrueFieldToBoxd", "ThresholdKeepingStructures"]


class ThresholdKeepingStructures(Transform):
    """Binarise warped soft labels (C, X, Y, Z) channel by channel so that no structure vanishes.

    A channel is cut at ``threshold``, or at ``fraction`` of its own peak where that is lower: a structure
    larger than the grid comes out as with a plain threshold (``AsDiscrete(threshold=...)``), one that linear
    resampling onto a coarser fixed grid spread below the threshold keeps its most likely voxels (those near its
    peak) instead of disappearing. A channel with no value above zero stays empty (the structure left the fixed
    field of view; ``result.json``'s ``label_channels_lost`` lists it). Hand-written: MONAI's ``AsDiscrete``
    thresholds every channel at one value. Use it as the inference config's ``postprocessing``
    (``configs/keep_structures.json``).
    """

    def __init__(self, threshold: float = 0.5, fraction: float = 0.5):
        self.threshold, self.fraction = float(threshold), float(fraction)

    def __call__(self, labels) -> torch.Tensor:
        labels = torch.as_tensor(labels, dtype=torch.float32)
        peak = labels.flatten(1).amax(1).view(-1, *([1] * (labels.ndim - 1)))
        level = torch.clamp(self.fraction * peak, max=self.threshold)
        return ((labels >= level) & (peak > 0)).to(torch.float32)


class Warpd(MapTransform):  # hand-written: MONAI has the Warp block but no dictionary transform around it
    """Warp the (C, H, W, D) items under ``keys`` with the displacement field under ``ddf_key``.

    The field is (3, H, W, D) in VOXELS of the same grid (MONAI ``Warp`` convention:
    ``out(p) = item(p + ddf(p))``). Sampling runs in fp32 (the field may come from an autocast
    forward). Results are stored under ``output_keys`` (default: overwrite ``keys``) as plain
    tensors on the field's device.

    Args:
        keys: items to warp, e.g. ``"moving_label"``.
        ddf_key: item holding the field, e.g. ``"pred"``.
        output_keys: where to store the warped items, one per key.
        mode: interpolation ("bilinear" keeps soft labels soft; "nearest" for hard labels).
        padding_mode: value outside the grid ("zeros" or "border").
    """

    def __init__(
        self,
        keys: KeysCollection,
        ddf_key: str = "pred",
        output_keys: KeysCollection | None = None,
        mode: str = "bilinear",
        padding_mode: str = "zeros",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.ddf_key = ddf_key
        self.output_keys = ensure_tuple_rep(output_keys, len(self.keys)) if output_keys is not None else self.keys
        if len(self.output_keys) != len(self.keys):
            raise ValueError(f"output_keys {self.output_keys} must match keys {self.keys} one to one")
        self.warp = Warp(mode=mode, padding_mode=padding_mode)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        ddf = torch.as_tensor(d[self.ddf_key]).float()
        if ddf.ndim != 4 or ddf.shape[0] != 3:
            raise ValueError(f"{self.ddf_key!r} must be a (3, H, W, D) field, got shape {tuple(ddf.shape)}")
        for key, out in self.key_iterator(d, self.output_keys):
            item = torch.as_tensor(d[key]).to(device=ddf.device, dtype=torch.float32)
            if item.shape[1:] != ddf.shape[1:]:
                raise ValueError(
                    f"{key!r} grid {tuple(item.shape[1:])} differs from the field's {tuple(ddf.shape[1:])}"
                )
            with torch.autocast(device_type=ddf.device.type, enabled=False):
                d[out] = self.warp(item[None], ddf[None])[0]
        return d


class PairToBoxd(Transform):
    """A case dict of file paths -> the network's inputs on the fixed image's network box, as inference builds them.

    The ``pair`` stage (:class:`scripts.inference.pair.PairStage`, ``configs/pair.json``) is the one inference runs:
    the same reading and checks, rigid pre-alignment on the gland masks, network box and network inputs; this
    transform adds the labels, sampled on the box (moving through the rigid, linear).

    Masks: channel 0 of each label (ground truth) or, with ``mask_dir``, the gland masks that
    ``configs/seg_inference.json`` predicted (``<mask_dir>/{mr,us}_glands/<case>.nii.gz``).

    Input keys: ``case``, ``direction``, ``moving_image``, ``fixed_image``, ``moving_label``, ``fixed_label`` (paths).
    Output: ``image`` (2, H, W, D) = [moving, fixed]; ``moving_label`` and ``fixed_label`` (C, H, W, D), soft, on
    the box; ``rigid`` (4, 4) LPS fixed -> moving; float32 tensors. (H, W, D) = ``pair.spatial_size``.
    """

    def __init__(self, pair, mask_dir: str | None = None):
        self.pair, self.mask_dir = pair, mask_dir

    def _masks(self, data, labels) -> list:
        if self.mask_dir is None:
            return [Volume(label.data[..., 0], label.affine) for label in labels]
        moving, fixed = DIRECTIONS[data["direction"]]
        paths = [Path(self.mask_dir) / f"{mod}_glands" / f"{data['case']}.nii.gz" for mod in (moving, fixed)]
        return [self.pair.read_mask(p, "gland mask") for p in paths]

    def __call__(self, data: Mapping) -> dict:
        images = [self.pair.read(data[f"{role}_image"], f"{role} image") for role in ("moving", "fixed")]
        labels = []
        for role in ("moving", "fixed"):
            lab = read_nifti(data[f"{role}_label"], ndim=(3, 4), what=f"{role} label")
            array = load_array(lab, data[f"{role}_label"], f"{role} label")
            labels.append(Volume(array if array.ndim == 4 else array[..., None], lab.affine))
        masks = self._masks(data, labels)
        (moving, fixed), (moving_mask, fixed_mask) = images, masks
        ants = [ants_image(v.data, v.affine) for v in (fixed, moving, fixed_mask, moving_mask)]
        rigid, _ = self.pair.rigid(*ants)
        box = self.pair.box(moving, fixed, rigid, data["moving_image"], data["fixed_image"])
        out = dict(data)
        out["image"] = self.pair.inputs(moving, fixed, rigid, box, masks)
        fixed_points = grid_points(box.affine, box.shape)
        for label, points, key in zip(
            labels, (apply_affine(rigid, fixed_points), fixed_points), ("moving_label", "fixed_label")
        ):
            out[key] = torch.as_tensor(
                np.moveaxis(sample(label.data, label.affine, points), -1, 0), dtype=torch.float32
            )
        out["rigid"] = torch.as_tensor(rigid, dtype=torch.float32)
        return out


def _box_of(fixed_image, pair):
    """The network box of a case, rebuilt from its fixed image's header (no voxel data read)."""
    header = read_nifti(fixed_image, ndim=3, what="fixed image")
    return pair.box_on(header.affine, header.shape)


class LandmarkErrord(MapTransform):
    """Landmark error (mm) between pairs of box-grid labels, for validation curves.

    For each ``(moving_key, fixed_key)`` pair of (C, H, W, D) labels on the network box of one case
    (already thresholded), the error is the mean over landmark channels (1..C-1; the gland, channel 0,
    when C == 1) of the distance in mm between the two channels' centroids. A channel empty in either
    label (e.g. cut off by the depth crop) is left out; none left gives NaN. Centroids go to mm through
    the box affine, rebuilt from the fixed image's header (``fixed_image`` path of the case dict) with
    :func:`scripts.spatial.geometry.network_box`, so anisotropic box voxels are measured correctly. This is the
    float-centroid TRE of :mod:`scripts.evaluation.metrics` on the box grid (written here: MONAI has no centroid metric).

    Args:
        keys: the moving-side labels, e.g. ``("warped_label", "moving_label")``.
        fixed_key: the fixed label, same grid.
        output_keys: where each (0-d tensor) error goes, one per key.
        pair: the pair stage whose box the labels are on (:class:`scripts.inference.pair.PairStage`).
    """

    def __init__(self, keys: KeysCollection, fixed_key: str, output_keys: KeysCollection, pair):
        super().__init__(keys)
        self.fixed_key, self.output_keys = fixed_key, ensure_tuple_rep(output_keys, len(self.keys))
        self.pair = pair

    @staticmethod
    def _centroids(label: torch.Tensor) -> list:
        """Float centroid (voxel indices) of each channel ``> 0.5``, None for an empty one."""
        return [
            centroid(c, "float") if (c > 0.5).any() else None for c in torch.as_tensor(label).detach().cpu().numpy()
        ]

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        box = _box_of(d["fixed_image"], self.pair)
        fixed = self._centroids(d[self.fixed_key])
        channels = range(1, len(fixed)) if len(fixed) > 1 else range(1)
        for key, out in self.key_iterator(d, self.output_keys):
            moving = self._centroids(d[key])
            errors = [
                np.linalg.norm(apply_affine(box.affine, moving[c]) - apply_affine(box.affine, fixed[c]))
                for c in channels
                if moving[c] is not None and fixed[c] is not None
            ]
            d[out] = torch.tensor(float(np.mean(errors)) if errors else float("nan"))
        return d


class TrueFieldToBoxd:
    """The phantom's true map as the network's target, for ``loss#field_weight`` > 0 (synthetic pre-training).

    Adds ``true_ddf`` (3, H, W, D), box voxels, in the network's convention: the true map T(p) = p + d(p)
    (``<split>/ddf_<direction>/<case>.nii.gz`` beside the images folder, or ``field_dir``; fixed grid, ITK
    convention, LPS mm) seen after the case's rigid R (``rigid`` of :class:`PairToBoxd`): u(p) = R^-1(T(p)) - p
    at the box points, so that R(p + u(p)) = T(p) as the pipeline composes (``compose_field``).

    Deliberately not a MONAI ``Transform``: ``PersistentDataset`` caches and hashes the transforms before the
    first non-``Transform`` only, so this one, placed last, runs per step (a field read and a sampling) and the
    pre-stage cache of the runs without it is reused as it is.

    Args:
        pair: the pair stage whose box the network works on (:class:`scripts.inference.pair.PairStage`).
        field_dir: folder of the true fields; default ``<fixed image folder>/../ddf_<direction>``.
    """

    def __init__(self, pair, field_dir: str | None = None):
        self.pair, self.field_dir = pair, field_dir

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        fixed = Path(d["fixed_image"])
        folder = Path(self.field_dir) if self.field_dir else fixed.parent.parent / f"ddf_{d['direction']}"
        path = folder / f"{d['case']}.nii.gz"
        if not path.is_file():
            raise InputError(
                f"{path}: missing; loss#field_weight > 0 trains on each case's true field "
                "(the phantom writes <split>/ddf_<direction>/<case>.nii.gz)"
            )
        from scripts.spatial.composed import field_to_box_ddf  # here: it imports ANTs, ITK

        box = _box_of(fixed, self.pair)
        d["true_ddf"] = torch.as_tensor(field_to_box_ddf(path, box, d["rigid"]), dtype=torch.float32)
        return d
