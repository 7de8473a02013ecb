"""Rigid pre-alignment with ANTs (antspyx): on the gland masks first, mutual information on the images otherwise.

The result is a 4x4 matrix acting on LPS mm points and mapping FIXED points to MOVING points (the
convention of :mod:`scripts.spatial.composed`), kept so that the bundle can compose it with the deformable part.

ANTs' registration is not invariant to how a volume is stored: a copy with flipped or permuted axes (same voxels,
same positions) gave a mask-based rigid result 0.46 mm different on average over the gland (up to 2.6 mm) on realistic
phantom pairs, and a mutual-information one 10 mm (up to 52 mm). Every input is therefore handed to ANTs in one
storage order, the closest RAS+ order (:func:`canonical_image`); docs/pipeline.md, "Header rules and storage order".
"""

from __future__ import annotations

import inspect
import os
import tempfile

import ants
import nibabel as nib
import numpy as np
from scipy import ndimage

from scripts.data.nifti import MIN_VOXELS_PER_AXIS, InputError, load_array, read_nifti
from scripts.spatial.composed import ants_image, read_ants_rigid, rigid_to_ants, write_ants_rigid
from scripts.spatial.geometry import RAS2LPS

__all__ = ["rigid_prealign", "rigid_settings", "scaled_schedule", "mask_centre", "overlap_dice", "canonical_image"]


def canonical_image(image, affine_ras=None):
    """The same ANTs image stored in the closest RAS+ order (nibabel's ``as_closest_canonical``): every voxel keeps
    its value and physical position; the array's axes are permuted/flipped and the direction columns and spacing
    follow exactly (only reordered and negated). Returned as is when already in that order.

    The new origin (the old last voxel along each flipped axis) is rounded to float32, as a NIfTI header would
    store it, so that a non-canonical file and its canonical copy written by nibabel, or two copies whose headers
    round the same grid identically, give ANTs bit-identical images. ``affine_ras``: the file's nibabel affine, whose
    (float32) columns then give that origin instead of ITK's normalised directions times pixdim.
    """
    direction = np.asarray(image.direction, np.float64)
    spacing, origin = np.asarray(image.spacing, np.float64), np.asarray(image.origin, np.float64)
    steps = direction * spacing if affine_ras is None else (RAS2LPS @ np.asarray(affine_ras, np.float64))[:3, :3]
    ras = np.eye(4)
    ras[:3, :3] = RAS2LPS[:3, :3] @ steps
    ornt = nib.orientations.io_orientation(ras)  # per array axis: its RAS+ axis and sign
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return image
    new_direction, new_spacing = np.empty((3, 3)), np.empty(3)
    shift = np.zeros(3)
    for axis, (target, sign) in enumerate(ornt.astype(int)):
        if sign < 0:  # the last voxel along this axis becomes the first
            shift[axis] = image.shape[axis] - 1
        new_direction[:, target], new_spacing[target] = direction[:, axis] * sign, spacing[axis]
    new_origin = (steps @ shift + origin).astype(np.float32).astype(np.float64)
    data = np.ascontiguousarray(nib.orientations.apply_orientation(image.numpy(), ornt))
    return ants.from_numpy(data, origin=new_origin.tolist(), spacing=new_spacing.tolist(), direction=new_direction)


def _read(x, what: str, mask: bool = False):
    """An ANTs image of a NIfTI path or an ANTs image, in the closest RAS+ storage order (:func:`canonical_image`).

    A path is checked by :func:`scripts.data.nifti.read_nifti` (its header rule: nibabel, ITK and ANTs read one geometry;
    at least ``MIN_VOXELS_PER_AXIS`` voxels per axis) and read by ANTs as before; a mask may be a channel-last
    label, whose channel 0 (the gland) is used.
    """
    if not isinstance(x, (str, os.PathLike)):
        return canonical_image(x)
    img = read_nifti(x, ndim=(3, 4) if mask else 3, what=what, min_size=MIN_VOXELS_PER_AXIS)
    if img.ndim == 4:
        return canonical_image(ants_image(load_array(img, x, what)[..., 0], img.affine), img.affine)
    return canonical_image(ants.image_read(str(x)), img.affine)


def mask_centre(mask) -> np.ndarray:
    """Centre of mass (LPS mm) of a binary ANTs image."""
    # not ants.get_center_of_mass: it weighs by intensity (no > 0.5) and differs in the last digits
    index = np.asarray(ndimage.center_of_mass(mask.numpy() > 0.5))
    direction, spacing = np.asarray(mask.direction, np.float64), np.asarray(mask.spacing, np.float64)
    return np.asarray(mask.origin, np.float64) + direction @ (spacing * index)


def overlap_dice(fixed_mask, moving_mask, rigid) -> float:
    """Dice between the fixed mask and the moving mask resampled (nearest) onto it through ``rigid``."""
    warped = (
        rigid_to_ants(rigid).apply_to_image(moving_mask, reference=fixed_mask, interpolation="nearestneighbor").numpy()
        > 0.5
    )
    fixed = fixed_mask.numpy() > 0.5
    return float(2 * np.sum(warped & fixed) / max(np.sum(warped) + np.sum(fixed), 1))


def scaled_schedule(shrink_factors, smoothing_sigmas, spacing_mm: float, schedule_spacing_mm: float | None):
    """Shrink factors and smoothing sigmas (voxels) given for ``schedule_spacing_mm`` voxels, scaled for ``spacing_mm``
    voxels so that each level keeps about the same physical size: shrink ``max(1, round(s * ratio))``, sigma scaled
    by the same factor as its shrink; ``ratio = schedule_spacing_mm / spacing_mm`` (None: unchanged)."""
    if not schedule_spacing_mm:
        return tuple(shrink_factors), tuple(smoothing_sigmas)
    ratio = schedule_spacing_mm / spacing_mm
    shrink = tuple(max(1, int(round(s * ratio))) for s in shrink_factors)
    return shrink, tuple(float(g) * n / s for g, n, s in zip(smoothing_sigmas, shrink, shrink_factors))


def _register(
    fixed,
    moving,
    initial,
    metric,
    iterations,
    shrink_factors,
    smoothing_sigmas,
    sampling_rate,
    bins,
    random_seed=None,
    schedule_spacing_mm=None,
):
    """One ``ants.registration`` Rigid run; returns the fixed -> moving 4x4 LPS matrix (initial transform included).

    The schedule is scaled to the finer voxel size of the two images (:func:`scaled_schedule`).
    ``random_seed`` seeds the jitter of ANTs' regular metric sampling (antspyx takes it only as the global
    ``ants.config._random_seed``, restored afterwards); ``None`` or 0: ANTs seeds from the clock.
    """
    spacing = min(min(fixed.spacing), min(moving.spacing))
    shrink_factors, smoothing_sigmas = scaled_schedule(shrink_factors, smoothing_sigmas, spacing, schedule_spacing_mm)
    previous, ants.config._random_seed = ants.config._random_seed, random_seed
    try:
        return _run_registration(
            fixed, moving, initial, metric, iterations, shrink_factors, smoothing_sigmas, sampling_rate, bins
        )
    finally:
        ants.config._random_seed = previous


def _run_registration(
    fixed, moving, initial, metric, iterations, shrink_factors, smoothing_sigmas, sampling_rate, bins
):
    with tempfile.TemporaryDirectory() as tmp:
        kwargs = {}
        if initial is not None:
            init_path = os.path.join(tmp, "init.mat")
            write_ants_rigid(initial, init_path)
            kwargs["initial_transform"] = [init_path]
        result = ants.registration(
            fixed,
            moving,
            type_of_transform="Rigid",
            aff_metric=metric,
            aff_sampling=bins,
            aff_random_sampling_rate=sampling_rate,
            aff_iterations=tuple(iterations),
            aff_shrink_factors=tuple(shrink_factors),
            aff_smoothing_sigmas=tuple(smoothing_sigmas),
            outprefix=os.path.join(tmp, "rigid_"),
            **kwargs,
        )
        return read_ants_rigid(result["fwdtransforms"][0])


def rigid_prealign(
    fixed_image,
    moving_image,
    fixed_mask=None,
    moving_mask=None,
    min_mask_dice: float = 0.5,
    mask_smoothing_mm: float = 2.0,
    iterations=(200, 100),
    shrink_factors=(8, 4),
    smoothing_sigmas=(3, 2),
    schedule_spacing_mm: float | None = 0.8,
    sampling_rate: float = 1.0,
    mi_bins: int = 32,
    random_seed: int | None = 1,
) -> tuple[np.ndarray, dict]:
    """Rigid fixed -> moving alignment.

    With both masks: a Rigid ANTs registration of the masks (mean squares on masks smoothed by a Gaussian of
    ``mask_smoothing_mm``, which gives the metric a gradient beyond the mask edges), initialised by translating the
    fixed mask's centre onto the moving mask's centre. The default schedule (shrink 8 then 4, no full-resolution
    level: about 6 and 3 mm on μ-RegPro's 0.8 mm grids) takes 1–3 s per pair where the former one (shrink 4/2/1,
    200/100/50 iterations) took 20–60 s, with the same accuracy on the phantom test pairs (the rigid rows of
    docs/first_model.md). The result is accepted when the aligned masks
    overlap with Dice >= ``min_mask_dice``; otherwise (or without masks) a Rigid registration of the images
    with Mattes mutual information (``mi_bins`` bins), initialised by their centres of mass.

    Every input is handed to ANTs in the closest RAS+ storage order (:func:`canonical_image`), so copies stored with
    flipped or permuted axes give ANTs the same data and the same matrix (``tests/test_rigid.py``; exceptions: where
    the copies' float32 headers round the grid's origin differently, docs/pipeline.md); images and masks already in
    that order are used as they are, with the same result as before.

    Args:
        fixed_image, moving_image, fixed_mask, moving_mask: ANTs images or NIfTI paths (masks: gland > 0.5, or
            channel 0 of a channel-last label); paths are read with :func:`scripts.data.nifti.read_nifti` (its header rule,
            at least ``MIN_VOXELS_PER_AXIS`` voxels per axis). The images are read only when the mask registration
            is not used.
        iterations, shrink_factors, smoothing_sigmas: the multi-resolution schedule of both registrations, for
            images of ``schedule_spacing_mm`` voxels (μ-RegPro's 0.8 mm); on other voxel sizes the shrink factors
            and sigmas are scaled to keep the levels' physical size (a 2.4 mm image gets shrink 3 and 1; None: as given).
        sampling_rate: fraction of voxels the metric samples (1.0: all).
        random_seed: seed of ANTs' sampling jitter (``None`` or 0: ANTs seeds from the clock). Results are bit-identical between
            runs only when ANTs also runs single-threaded: ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1`` set before
            Python starts (its threads add up metric values in varying order).

    Returns:
        ``(matrix, info)``: 4x4 LPS fixed -> moving matrix; ``info`` has ``method`` ("masks" or
        "mutual_information"), ``mask_dice`` (after alignment, or None) and ``initial_translation_mm``.
    """
    levels = [len(iterations), len(shrink_factors), len(smoothing_sigmas)]
    if len(set(levels)) > 1:
        raise InputError(
            f"rigid_args: iterations, shrink_factors and smoothing_sigmas need one value per level, "
            f"got {levels[0]}, {levels[1]} and {levels[2]} values"
        )
    schedule = dict(
        iterations=iterations,
        shrink_factors=shrink_factors,
        smoothing_sigmas=smoothing_sigmas,
        sampling_rate=sampling_rate,
        bins=mi_bins,
        random_seed=random_seed,
        schedule_spacing_mm=schedule_spacing_mm,
    )
    info = {"method": "mutual_information", "mask_dice": None, "initial_translation_mm": None}
    if fixed_mask is not None and moving_mask is not None:
        fixed_mask = ants.threshold_image(_read(fixed_mask, "fixed mask", mask=True), 0.5, 1e9).astype("float32")
        moving_mask = ants.threshold_image(_read(moving_mask, "moving mask", mask=True), 0.5, 1e9).astype("float32")
        if fixed_mask.sum() > 0 and moving_mask.sum() > 0:
            initial = np.eye(4)
            initial[:3, 3] = mask_centre(moving_mask) - mask_centre(fixed_mask)
            smooth = lambda m: ants.smooth_image(m, mask_smoothing_mm, sigma_in_physical_coordinates=True)  # noqa: E731
            matrix = _register(smooth(fixed_mask), smooth(moving_mask), initial, "meansquares", **schedule)
            dice = overlap_dice(fixed_mask, moving_mask, matrix)
            info.update(mask_dice=dice, initial_translation_mm=initial[:3, 3].tolist())
            if dice >= min_mask_dice:
                info["method"] = "masks"
                return matrix, info
    fixed_image, moving_image = _read(fixed_image, "fixed image"), _read(moving_image, "moving image")
    return _register(fixed_image, moving_image, None, "mattes", **schedule), info


def rigid_settings(rigid_args: dict | None = None) -> dict:
    """Every setting :func:`rigid_prealign` runs with: its defaults, updated by ``rigid_args``.

    Stored by the training pre-stage so that its cache key changes when a default does (an unknown name is an
    ``InputError`` here rather than a ``TypeError`` at the first case).
    """
    params = inspect.signature(rigid_prealign).parameters
    inputs = ("fixed_image", "moving_image", "fixed_mask", "moving_mask")
    defaults = {k: p.default for k, p in params.items() if k not in inputs}
    unknown = sorted(set(rigid_args or {}) - set(defaults))
    if unknown:
        raise InputError(f"rigid_args: unknown setting(s) {unknown}; rigid_prealign takes {sorted(defaults)}")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in {**defaults, **(rigid_args or {})}.items()}
