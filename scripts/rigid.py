"""Rigid pre-alignment with ANTs (antspyx): on the gland masks first, mutual information on the images otherwise.

The result is a 4x4 matrix acting on LPS mm points and mapping FIXED points to MOVING points (the
convention of :mod:`scripts.transform_io`), kept so that the bundle can compose it with the deformable part.
"""

from __future__ import annotations

import inspect
import os
import tempfile

import ants
import numpy as np

from scripts.io import InputError
from scripts.transform_io import read_ants_rigid, rigid_to_ants, write_ants_rigid

__all__ = ["rigid_prealign", "rigid_settings", "scaled_schedule", "mask_centre", "overlap_dice"]


def mask_centre(mask) -> np.ndarray:
    """Centre of mass (LPS mm) of a binary ANTs image."""
    index = np.argwhere(mask.numpy() > 0.5).mean(0)
    direction, spacing = np.asarray(mask.direction, np.float64), np.asarray(mask.spacing, np.float64)
    return np.asarray(mask.origin, np.float64) + direction @ (spacing * index)


def overlap_dice(fixed_mask, moving_mask, rigid) -> float:
    """Dice between the fixed mask and the moving mask resampled (nearest) onto it through ``rigid``."""
    warped = rigid_to_ants(rigid).apply_to_image(moving_mask, reference=fixed_mask, interpolation="nearestneighbor").numpy() > 0.5
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


def _register(fixed, moving, initial, metric, iterations, shrink_factors, smoothing_sigmas, sampling_rate, bins,
              random_seed=None, schedule_spacing_mm=None):
    """One ``ants.registration`` Rigid run; returns the fixed -> moving 4x4 LPS matrix (initial transform included).

    The schedule is scaled to the finer voxel size of the two images (:func:`scaled_schedule`).
    ``random_seed`` seeds the jitter of ANTs' regular metric sampling (antspyx takes it only as the global
    ``ants.config._random_seed``, restored afterwards); ``None`` or 0: ANTs seeds from the clock.
    """
    spacing = min(min(fixed.spacing), min(moving.spacing))
    shrink_factors, smoothing_sigmas = scaled_schedule(shrink_factors, smoothing_sigmas, spacing, schedule_spacing_mm)
    previous, ants.config._random_seed = ants.config._random_seed, random_seed
    try:
        return _run_registration(fixed, moving, initial, metric, iterations, shrink_factors, smoothing_sigmas,
                                 sampling_rate, bins)
    finally:
        ants.config._random_seed = previous


def _run_registration(fixed, moving, initial, metric, iterations, shrink_factors, smoothing_sigmas, sampling_rate, bins):
    with tempfile.TemporaryDirectory() as tmp:
        kwargs = {}
        if initial is not None:
            init_path = os.path.join(tmp, "init.mat")
            write_ants_rigid(initial, init_path)
            kwargs["initial_transform"] = [init_path]
        result = ants.registration(
            fixed, moving, type_of_transform="Rigid", aff_metric=metric, aff_sampling=bins,
            aff_random_sampling_rate=sampling_rate, aff_iterations=tuple(iterations),
            aff_shrink_factors=tuple(shrink_factors), aff_smoothing_sigmas=tuple(smoothing_sigmas),
            outprefix=os.path.join(tmp, "rigid_"), **kwargs,
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
    ``mask_smoothing_mm``, which gives the metric a gradient beyond the mask edges), initialised by translating the fixed mask's centre onto the moving mask's
    centre. The default schedule (shrink 8 then 4, no full-resolution level: about 6 and 3 mm on μ-RegPro's
    0.8 mm grids) takes 1–3 s per pair where the former one (shrink 4/2/1, 200/100/50 iterations) took 20–60 s; on
    the 20 realistic phantom test pairs of docs/first_model.md the rigid rows' TRE is 4.31 mm on true masks
    (former 4.35) and 6.12 mm on predicted masks (former 6.03). The result is accepted when the aligned masks
    overlap with Dice >= ``min_mask_dice``; otherwise (or without masks) a Rigid registration of the images
    with Mattes mutual information (``mi_bins`` bins), initialised by their centres of mass.

    Args:
        fixed_image, moving_image, fixed_mask, moving_mask: ANTs images or NIfTI paths (masks: gland > 0.5); the
            images are read only when the mask registration is not used.
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
        raise InputError(f"rigid_args: iterations, shrink_factors and smoothing_sigmas need one value per level, "
                         f"got {levels[0]}, {levels[1]} and {levels[2]} values")
    load = lambda x: ants.image_read(str(x)) if isinstance(x, (str, os.PathLike)) else x  # noqa: E731
    schedule = dict(iterations=iterations, shrink_factors=shrink_factors, smoothing_sigmas=smoothing_sigmas,
                    sampling_rate=sampling_rate, bins=mi_bins, random_seed=random_seed,
                    schedule_spacing_mm=schedule_spacing_mm)
    info = {"method": "mutual_information", "mask_dice": None, "initial_translation_mm": None}
    if fixed_mask is not None and moving_mask is not None:
        fixed_mask = ants.threshold_image(load(fixed_mask), 0.5, 1e9).astype("float32")
        moving_mask = ants.threshold_image(load(moving_mask), 0.5, 1e9).astype("float32")
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
    return _register(load(fixed_image), load(moving_image), None, "mattes", **schedule), info


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
