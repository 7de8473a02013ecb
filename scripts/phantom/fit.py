"""Ideal rigid and affine fits of a phantom case's true transform: what a perfect pre-stage would leave.

A method that is only rigid (or only affine) cannot do better than the least-squares rigid (affine)
map of the gland onto its true position. These fits, taken over the gland voxels of the moving
image, calibrate the phantom (docs/phantom.md) and give the benchmarks their ``ideal rigid`` and
``ideal affine`` rows. Rigid: ``scipy.spatial.transform.Rotation.align_vectors`` (Kabsch) on the
centred points; affine: ``numpy.linalg.lstsq``.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

__all__ = ["fit_rigid", "fit_affine", "apply_map", "ideal_fits", "calibration"]


def fit_rigid(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(N, 3), (N, 3) mm -> the 4×4 rotation + translation minimising Σ |M s - t|²."""
    cs, ct = source.mean(0), target.mean(0)
    rot, _ = Rotation.align_vectors(target - ct, source - cs)
    m = np.eye(4)
    m[:3, :3] = rot.as_matrix()
    m[:3, 3] = ct - m[:3, :3] @ cs
    return m


def fit_affine(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(N, 3), (N, 3) mm -> the 4×4 affine minimising Σ |M s - t|² (N ≥ 4 points not in a plane)."""
    a = np.hstack([source, np.ones((len(source), 1))])
    sol, *_ = np.linalg.lstsq(a, target, rcond=None)
    m = np.eye(4)
    m[:3] = sol.T
    return m


def apply_map(m: np.ndarray, points: np.ndarray) -> np.ndarray:
    """4×4 map applied to (N, 3) points."""
    return points @ m[:3, :3].T + m[:3, 3]


def ideal_fits(case: dict, direction: str = "mr2us", stride: int = 2) -> dict:
    """The ideal rigid and affine maps of a generated case (``scripts.phantom.synth.generate_case``) and what they leave.

    The maps take MOVING-world points to FIXED-world points (RAS mm): for ``mr2us`` MR -> TRUS (``phi``),
    for ``us2mr`` TRUS -> MR (``phi⁻¹``), fitted over every ``stride``-th voxel of the moving image's true gland.
    Returns ``rigid``/``affine`` (4, 4) and, per map and for ``none`` (identity), the landmark error
    (mm, one per landmark, true centre mapped vs its true position in the fixed world).
    """
    from scripts.phantom.synth import voxel_to_world

    if direction not in ("mr2us", "us2mr"):
        raise ValueError(f"direction={direction!r}: expected 'mr2us' or 'us2mr'")
    phi = case["transform"]
    mod = "mr" if direction == "mr2us" else "us"
    label, affine = case[f"{mod}_true_label" if f"{mod}_true_label" in case else f"{mod}_label"], case[f"{mod}_affine"]
    gland = label[::stride, ::stride, ::stride, 0] > 0
    step = affine.copy()
    step[:3, :3] = affine[:3, :3] * stride
    source = voxel_to_world(step, gland.shape)[gland.reshape(-1)]
    target = phi.forward(source) if direction == "mr2us" else phi.inverse(source)
    lm_mr = np.array([lm["mr_centre_ras_mm"] for lm in case["truth"]["landmarks"]])
    lm_us = np.array([lm["us_centre_ras_mm"] for lm in case["truth"]["landmarks"]])
    lm_moving, lm_fixed = (lm_mr, lm_us) if direction == "mr2us" else (lm_us, lm_mr)
    out = {"rigid": fit_rigid(source, target), "affine": fit_affine(source, target)}
    errors = {"none": np.linalg.norm(lm_moving - lm_fixed, axis=1)}
    for name in ("rigid", "affine"):
        errors[name] = np.linalg.norm(apply_map(out[name], lm_moving) - lm_fixed, axis=1)
    out["landmark_error_mm"] = errors
    return out


def calibration(preset: str = "realistic", cases: int = 40, seed: int = 0, spacing_mm: float = 1.6) -> dict:
    """Mean landmark error (mm, MR -> TRUS) left by no registration, the ideal rigid and the ideal affine over
    ``cases`` cases of ``preset``, from the geometry alone (no images are rendered; gland sampled every
    ``spacing_mm`` in the MR world). The numbers docs/phantom.md calibrates the presets against."""
    from scripts.phantom.synth import PRESETS, draw_geometry

    per_case = {"none": [], "rigid": [], "affine": []}
    for index in range(cases):
        _, anat, phi, _ = draw_geometry(seed, index, "full", PRESETS[preset].anatomy, PRESETS[preset].transform)
        half = np.max(anat.gland_radii) * 1.5
        g = np.stack(np.meshgrid(*(np.arange(-half, half, spacing_mm),) * 3, indexing="ij"), -1).reshape(-1, 3)
        g = g + anat.gland_centre
        g = g[anat.gland_level(g) < 0]
        target = phi.forward(g)
        lm = np.array([x["centre"] for x in anat.landmarks])
        lm_us = phi.forward(lm)
        maps = {"none": np.eye(4), "rigid": fit_rigid(g, target), "affine": fit_affine(g, target)}
        for name, m in maps.items():
            per_case[name].append(float(np.linalg.norm(apply_map(m, lm) - lm_us, axis=1).mean()))
    return {name: {"mean": float(np.mean(v)), "sd": float(np.std(v)), "per_case": v} for name, v in per_case.items()}
