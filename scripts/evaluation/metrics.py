"""Registration metrics: the μ-RegPro challenge metrics (``official`` and ``float`` modes) and clinical extras.

Shapes: labels are channel-first ``(C, X, Y, Z)`` arrays, channel 0 = prostate gland, channels 1.. =
landmarks; single masks are ``(X, Y, Z)``. Displacement fields are ``(3, X, Y, Z)`` in VOXEL units of
the fixed grid (index i of the fixed image maps to index i + u(i); the moving point in the same
index frame). ``spacing`` is the fixed image's voxel size in mm, ``(sx, sy, sz)``.

Label form each metric receives (the thresholds are part of the definitions):

========================================  =================================================
metric                                    label form
========================================  =================================================
DSC, RDSC                                 soft: fixed min-max normalised, warped as given
centroid errors: TRE, RTRE, RTs (+ refs)  thresholded ``> 0.5``
HD95 (+ HD95_0)                           resized, min-max normalised, thresholded ``> 0``
clinical TRE in mm                        thresholded ``> 0.5`` (real-valued centroids)
error against a ground-truth field        gland mask of the fixed label ``> 0.5``
Jacobian metrics                          no labels (the field only)
========================================  =================================================

``official`` mode gives the organisers' evaluation code's numbers (their integer arithmetic: truncated
centroids, truncated mean of absolute coordinate differences, truncated mean of squares; their HD95 over whole
masks; checked against their code, ``benchmarks/muregpro_official.py``); ``float`` mode keeps the same
definitions with real-valued centroids and means and the surface HD95. DSC and the extras are the same in both
modes. See docs/evaluation.md for the list of official-mode quirks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from scripts.data.nifti import InputError

__all__ = [
    "MODES",
    "SCORE_WEIGHTS",
    "minmax_normalise",
    "resize_linear",
    "soft_dice",
    "centroid",
    "centroid_error",
    "landmark_errors",
    "rms",
    "n_kept",
    "hd95",
    "hd95_official",
    "mean_hd95",
    "centroid_distances_mm",
    "jacobian_determinant",
    "percent_nonpositive_jacobian",
    "std_log_jacobian",
    "ddf_error_mm",
    "case_metrics",
    "aggregate",
    "challenge_score",
]

MODES = ("official", "float")
# Weights of the μ-RegPro score: each term is DSC, RDSC or 1 - clip(metric / reference).
SCORE_WEIGHTS = {"DSC": 0.2, "RDSC": 0.1, "TRE": 0.3, "RTRE": 0.1, "RTs": 0.1, "HD95": 0.2}


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise InputError(f"metric mode must be one of {MODES}, got {mode!r}")
    return mode


def minmax_normalise(label: np.ndarray) -> np.ndarray:
    """Min-max normalise each channel of a ``(C, ...)`` label to [0, 1], as the organisers' data generator does.

    Their ``resize_3d_image`` runs on one channel at a time and leaves a constant channel as it is (an empty
    label stays zeros, a full one stays ones); so does this.
    """
    label = np.asarray(label, dtype=np.float64)
    axes = tuple(range(1, label.ndim))
    lo, hi = label.min(axis=axes, keepdims=True), label.max(axis=axes, keepdims=True)
    span = hi - lo
    return np.where(span > 0, (label - lo) / np.where(span > 0, span, 1.0), label)


def resize_linear(label: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Array resize of a ``(C, X, Y, Z)`` label to ``(C, *shape)`` as the organisers did: index space, affines ignored.

    Their code calls ``skimage.transform.resize`` with its defaults; this is that function written with the scipy
    calls it wraps (scikit-image is not otherwise needed here): where an axis shrinks, a Gaussian anti-aliasing
    filter of sigma ``(factor - 1) / 2`` voxels on that axis (``factor`` = input / output size) first; then linear
    interpolation with half-pixel centres (``ndimage.zoom(order=1, grid_mode=True)``) and mirror padding
    (scikit-image's ``mode="reflect"``); the result clipped to the channel's input range.
    """
    label = np.asarray(label, dtype=np.float64)
    shape = tuple(int(s) for s in shape)
    if label.shape[1:] == shape:
        return label
    factors = np.divide(label.shape[1:], shape)
    out = []
    for ch in label:
        lo, hi = ch.min(), ch.max()
        if np.any(factors > 1):
            ch = ndimage.gaussian_filter(ch, np.maximum(0, (factors - 1) / 2), mode="mirror")
        out.append(np.clip(ndimage.zoom(ch, 1 / factors, order=1, mode="mirror", grid_mode=True), lo, hi))
    return np.stack(out)


def soft_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Soft Dice ``2·Σ(a·b) / Σ(a+b)`` of two same-shape arrays (soft labels); 0 when the denominator is 0."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    den = float(np.sum(a + b))
    return 0.0 if den == 0 else float(2.0 * np.sum(a * b) / den)


def centroid(mask: np.ndarray, mode: str = "official", threshold: float = 0.5) -> np.ndarray:
    """Centroid of the voxels of an ``(X, Y, Z)`` label ``> threshold``, in voxel indices.

    ``official``: integer sum of indices // count (each coordinate truncated to an integer).
    ``float``: real mean. An empty mask gives (0, 0, 0) in both modes (the official convention).
    """
    above = np.asarray(mask) > threshold
    if _check_mode(mode) == "official":  # not scipy's center_of_mass: the organisers' integer division
        idx = np.argwhere(above)
        return idx.sum(axis=0) // len(idx) if len(idx) else np.zeros(3, dtype=np.int64)
    return np.asarray(ndimage.center_of_mass(above)) if above.any() else np.zeros(3)


def centroid_error(c1: np.ndarray, c2: np.ndarray, mode: str = "official"):
    """Mean absolute difference of the 3 centroid coordinates (voxels); truncated to an integer in ``official``."""
    diff = np.abs(np.asarray(c1) - np.asarray(c2))
    return int(diff.sum() // 3) if _check_mode(mode) == "official" else float(diff.mean())


def landmark_errors(label_a: np.ndarray, label_b: np.ndarray, mode: str = "official") -> list:
    """Per-channel centroid errors (voxels, list of C) of two ``(C, ...)`` labels, thresholded ``> 0.5``.

    The two labels may be on different grids: centroids are compared as raw indices (this is how the
    official references are made).
    """
    return [centroid_error(centroid(a, mode), centroid(b, mode), mode) for a, b in zip(label_a, label_b)]


def rms(errors: Sequence, mode: str = "official") -> float:
    """``sqrt(mean(e²))`` of one case's channel errors; ``official`` takes an integer (truncated) mean of squares.

    No errors (all channels dropped) gives 0.
    """
    errors = np.asarray(errors)
    if errors.size == 0:
        return 0.0
    if _check_mode(mode) == "official":  # TensorFlow's cast to float32 before the square root
        return float(np.sqrt(np.float32(int(np.sum(errors.astype(np.int64) ** 2)) // errors.size)))
    return float(np.sqrt(np.mean(errors.astype(np.float64) ** 2)))


def n_kept(n: int, fraction: float = 0.68) -> int:
    """How many of ``n`` values the robust metrics keep: ``round(fraction·n)``.

    With fraction 0.68 the product 68·n/100 = 17·n/25 never ends in exactly .5, so half-to-even
    (Python, NumPy, TensorFlow) and half-up rounding agree for every n.
    """
    return int(round(fraction * n))


def _surface(mask: np.ndarray) -> np.ndarray:
    # border = mask minus its erosion with the 6-connected cross (voxels on the array edge count as border)
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1))


def hd95(pred: np.ndarray, ref: np.ndarray, percentile: float = 95.0) -> float:
    """95th percentile of the symmetric surface distances of two boolean ``(X, Y, Z)`` masks, in voxels.

    Surfaces are the masks minus their 6-connected erosion; distances from each surface voxel to the
    nearest voxel of the other surface (Euclidean distance transform, unit spacing); the percentile
    (linear interpolation) of both directions pooled. Either surface empty -> 0 (official convention).
    """
    sa, sb = _surface(np.asarray(pred, bool)), _surface(np.asarray(ref, bool))
    if not sa.any() or not sb.any():
        return 0.0
    d_ab = ndimage.distance_transform_edt(~sb)[sa]
    d_ba = ndimage.distance_transform_edt(~sa)[sb]
    return float(np.percentile(np.concatenate([d_ab, d_ba]), percentile))


def _organisers_mask(x: np.ndarray) -> np.ndarray:
    """A label channel as the organisers' HD95 sees it after their min-max step: ``> min``, or ``!= 0`` if constant."""
    lo, hi = x.min(), x.max()
    return x > lo if hi > lo else x != 0


# hand-written: reproduces the organisers' medpy-derived quirks (5-D erosion), which no library HD95 does
def hd95_official(pred: np.ndarray, ref: np.ndarray, percentile: float = 95.0) -> float:
    """The organisers' HD95 of one ``(X, Y, Z)`` channel, in voxels; ``pred`` soft, on ``ref``'s grid or another.

    Their code (adapted from medpy) works on ``(1, X, Y, Z, 1)`` arrays and erodes them with a 5-D cross: the two
    length-1 axes have no neighbours, so the erosion removes every voxel and each "surface" is the whole mask.
    The distances are therefore those of every voxel of one mask to the nearest voxel of the other (0 inside the
    overlap), both directions pooled, at the percentile; none at all gives 0. Measured to a mask with no voxel,
    scipy's distance transform of the 5-D array still gives numbers, ``sqrt(1 + i² + j² + k²)`` at voxel (i, j, k)
    (a vanished landmark scores them); that case runs on the same 5-D array, to give the same numbers. ``pred`` on
    another grid is resized (:func:`resize_linear`) and min-max normalised first.
    """
    pred, ref = np.asarray(pred, np.float64), np.asarray(ref, np.float64)
    if pred.shape != ref.shape:
        pred = minmax_normalise(resize_linear(pred[None], ref.shape))[0]
    pred_a, pred_b, ref_mask = _organisers_mask(pred), pred != 0, _organisers_mask(ref)

    def distances(to_mask, from_mask):
        if not from_mask.any():
            return np.zeros(0)
        if to_mask.any():  # then the length-1 axes add nothing, and the 3-D transform is faster
            return ndimage.distance_transform_edt(~to_mask)[from_mask]
        return ndimage.distance_transform_edt(~to_mask[None, ..., None])[from_mask[None, ..., None]]  # as theirs

    pooled = np.concatenate([distances(ref_mask, pred_a), distances(pred_b, ref_mask)])
    return float(np.percentile(pooled, percentile)) if pooled.size else 0.0


def mean_hd95(
    pred_label: np.ndarray, ref_label: np.ndarray, percentile: float = 95.0, mode: str = "official"
) -> tuple[float, list]:
    """HD95 of one case: mean over all C channels (voxels of the reference grid); returns (mean, per-channel list).

    ``official``: :func:`hd95_official` of each channel, as the organisers computed it. ``float``: the surface
    HD95 their code was adapted from (:func:`hd95`), of ``pred_label`` array-resized to the reference grid, both
    min-max normalised and thresholded ``> 0``.
    """
    if _check_mode(mode) == "official":
        values = [hd95_official(p, r, percentile) for p, r in zip(pred_label, ref_label)]
    else:
        pred = minmax_normalise(resize_linear(pred_label, ref_label.shape[1:]))
        ref = minmax_normalise(ref_label)
        values = [hd95(p > 0, r > 0, percentile) for p, r in zip(pred, ref)]
    return float(np.mean(values)), values


def centroid_distances_mm(
    fixed_label: np.ndarray, warped_label: np.ndarray, spacing: Sequence[float], channels: Sequence[int]
) -> dict:
    """Clinical landmark error: Euclidean distance (mm) of the real-valued centroids of ``> 0.5`` masks.

    Both labels are ``(C, X, Y, Z)`` on the fixed grid; ``spacing`` is its voxel size (mm). Only the
    listed ``channels`` count; a channel empty in either label is excluded (NaN) and counted.
    Returns ``distances`` (one per listed channel, NaN if excluded), ``tre_mm`` (RMS of the valid
    distances, NaN if none), ``n_used``, ``n_empty_fixed``, ``n_empty_warped`` (a channel empty in
    both is counted as empty in the fixed label only).
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    out = {"distances": [], "n_used": 0, "n_empty_fixed": 0, "n_empty_warped": 0}
    for ch in channels:
        f, w = fixed_label[ch] > 0.5, warped_label[ch] > 0.5
        if not f.any():
            out["n_empty_fixed"] += 1
        elif not w.any():
            out["n_empty_warped"] += 1
        else:
            diff = (np.asarray(ndimage.center_of_mass(f)) - ndimage.center_of_mass(w)) * spacing
            out["distances"].append(float(np.linalg.norm(diff)))
            out["n_used"] += 1
            continue
        out["distances"].append(float("nan"))
    valid = [d for d in out["distances"] if not math.isnan(d)]
    out["tre_mm"] = float(np.sqrt(np.mean(np.square(valid)))) if valid else float("nan")
    return out


def jacobian_determinant(ddf: np.ndarray, mm_to_voxel: np.ndarray | None = None, dtype=np.float64) -> np.ndarray:
    """Determinant of the Jacobian of x -> x + u(x) for a ``(3, X, Y, Z)`` displacement; returns ``(X, Y, Z)``.

    ``ddf`` in voxel units (the determinant does not depend on a shared voxel-to-mm matrix), or in mm with
    ``mm_to_voxel``, the inverse of the grid's 3x3 voxel -> mm matrix. Derivatives by ``np.gradient``: central
    differences inside, one-sided first-order differences on the array border; arithmetic in ``dtype``.
    """
    ddf = np.asarray(ddf, dtype=dtype)
    if ddf.ndim != 4 or ddf.shape[0] != 3:
        raise InputError(f"displacement field must have shape (3, X, Y, Z), got {ddf.shape}")
    j = np.stack([np.stack(np.gradient(ddf[i]), axis=-1) for i in range(3)], axis=-2)  # (X, Y, Z, 3 comp, 3 axis)
    if mm_to_voxel is not None:
        j = j @ np.asarray(mm_to_voxel).astype(dtype)
    j = j + np.eye(3, dtype=dtype)
    # cofactor expansion, not np.linalg.det: the phantom's pinned float32 truth values were made with it
    return (
        j[..., 0, 0] * (j[..., 1, 1] * j[..., 2, 2] - j[..., 1, 2] * j[..., 2, 1])
        - j[..., 0, 1] * (j[..., 1, 0] * j[..., 2, 2] - j[..., 1, 2] * j[..., 2, 0])
        + j[..., 0, 2] * (j[..., 1, 0] * j[..., 2, 1] - j[..., 1, 1] * j[..., 2, 0])
    )


def percent_nonpositive_jacobian(ddf_vox: np.ndarray) -> float:
    """Percentage (0-100) of voxels whose Jacobian determinant is <= 0 (folding)."""
    return float(100.0 * np.mean(jacobian_determinant(ddf_vox) <= 0))


def std_log_jacobian(ddf_vox: np.ndarray) -> float:
    """Population standard deviation of log(det J) over the voxels with det J > 0 (NaN if none)."""
    det = jacobian_determinant(ddf_vox)
    pos = det[det > 0]
    return float(np.std(np.log(pos))) if pos.size else float("nan")


def ddf_error_mm(ddf_vox: np.ndarray, true_ddf_vox: np.ndarray, mask: np.ndarray, spacing: Sequence[float]) -> dict:
    """Mean, 95th percentile and max Euclidean difference (mm) of two ``(3, X, Y, Z)`` voxel-unit fields in a mask.

    Voxel differences become mm by the fixed grid's ``spacing`` (exact for any rotation of the grid,
    as a rotation keeps lengths). An empty mask gives NaN.
    """
    diff = (np.asarray(ddf_vox, np.float64) - np.asarray(true_ddf_vox, np.float64)) * np.reshape(spacing, (3, 1, 1, 1))
    norm = np.sqrt(np.sum(diff**2, axis=0))[np.asarray(mask, bool)]
    if norm.size == 0:
        return {"mean": float("nan"), "p95": float("nan"), "max": float("nan")}
    return {"mean": float(norm.mean()), "p95": float(np.percentile(norm, 95)), "max": float(norm.max())}


def case_metrics(
    fixed_label: np.ndarray,
    warped_label: np.ndarray,
    moving_label: np.ndarray,
    mode: str = "official",
    spacing: Sequence[float] | None = None,
    ddf: np.ndarray | None = None,
    true_ddf: np.ndarray | None = None,
    gland_channel: int = 0,
    percentile: float = 95.0,
) -> dict:
    """All per-case metrics of one registration.

    Args:
        fixed_label: ``(C, X, Y, Z)`` fixed label on the fixed grid (min-max normalised here).
        warped_label: ``(C, X, Y, Z)`` moving label warped onto the fixed grid, soft or binary; used as given
            (the official code does not normalise it again, except inside HD95).
        moving_label: ``(C, X', Y', Z')`` unwarped moving label on the moving grid (min-max normalised here),
            for the references: centroid errors in raw indices of the two grids, HD95_0 after array resize.
        mode: "official" or "float" (centroid errors only).
        spacing: fixed voxel size (mm) for the clinical TRE and the field error; ``None`` skips them.
        ddf: ``(3, X, Y, Z)`` predicted displacement in fixed-grid voxels, for the Jacobian metrics.
        true_ddf: ground-truth displacement, same form; needs ``ddf`` and ``spacing``.
        gland_channel: the channel left out of the clinical TRE (the official metrics use every channel).
        percentile: HD95's percentile.

    Returns a JSON-friendly dict: ``dsc``; ``errors`` and ``errors0`` (per-channel centroid errors,
    voxels, after / before registration); ``hd95`` and ``hd95_0`` (voxels) with per-channel lists;
    with ``spacing``: ``tre_mm``, ``landmark_mm``, ``n_landmarks_used``, ``n_landmarks_empty_fixed``,
    ``n_landmarks_empty_warped``; with ``ddf``: ``jacobian_nonpositive_pct``, ``log_jacobian_std``;
    with ``true_ddf``: ``ddf_error_mean_mm``, ``ddf_error_max_mm``.
    """
    _check_mode(mode)
    fixed = minmax_normalise(fixed_label)
    moving = minmax_normalise(moving_label)
    warped = np.asarray(warped_label, dtype=np.float64)
    if warped.shape != fixed.shape:
        raise InputError(f"warped label shape {warped.shape} differs from the fixed label's {fixed.shape}")
    if moving.shape[0] != fixed.shape[0]:
        raise InputError(f"moving label has {moving.shape[0]} channels, fixed label {fixed.shape[0]}")
    out = {
        "dsc": soft_dice(fixed[gland_channel], warped[gland_channel]),
        "errors": landmark_errors(fixed, warped, mode),
        "errors0": landmark_errors(fixed, moving, mode),
    }
    out["hd95"], out["hd95_channels"] = mean_hd95(warped, fixed, percentile, mode)
    out["hd95_0"], out["hd95_0_channels"] = mean_hd95(moving, fixed, percentile, mode)
    if spacing is not None:
        landmarks = [c for c in range(fixed.shape[0]) if c != gland_channel]
        clin = centroid_distances_mm(fixed, warped, spacing, landmarks)
        out.update(
            tre_mm=clin["tre_mm"],
            landmark_mm=clin["distances"],
            n_landmarks_used=clin["n_used"],
            n_landmarks_empty_fixed=clin["n_empty_fixed"],
            n_landmarks_empty_warped=clin["n_empty_warped"],
        )
    if ddf is not None:
        out["jacobian_nonpositive_pct"] = percent_nonpositive_jacobian(ddf)
        out["log_jacobian_std"] = std_log_jacobian(ddf)
    if true_ddf is not None:
        if ddf is None or spacing is None:
            raise InputError("a ground-truth field needs the predicted field and the voxel spacing")
        err = ddf_error_mm(ddf, true_ddf, fixed[gland_channel] > 0.5, spacing)
        out["ddf_error_mean_mm"], out["ddf_error_p95_mm"], out["ddf_error_max_mm"] = err["mean"], err["p95"], err["max"]
    return out


def _mean(values, mode: str) -> float:
    """Mean of per-case values; ``official`` averages in float32, as TensorFlow did with its float32 RMS values."""
    return float(np.mean(np.asarray(values, np.float32 if mode == "official" else np.float64)))


def _centroid_summary(errors: list[list], mode: str, fraction: float) -> dict:
    """TRE, RTRE, RTs of an (N cases x C channels) error table, dropping channels that are 0 in every case."""
    table = np.asarray(errors, dtype=np.int64 if mode == "official" else np.float64)
    keep = np.any(table != 0, axis=0)
    kept = table[:, keep]
    per_case_tre = [rms(row, mode) for row in kept]
    k = n_kept(kept.shape[1], fraction)
    per_case_rts = [rms(np.sort(row)[:k], mode) for row in kept]
    best = np.sort(per_case_tre)[: n_kept(len(per_case_tre), fraction)]
    return {
        "TRE": _mean(per_case_tre, mode),
        "RTRE": _mean(best, mode) if best.size else 0.0,
        "RTs": _mean(per_case_rts, mode),
        "per_case_tre": per_case_tre,
        "per_case_rts": per_case_rts,
        "kept_channels": [int(c) for c in np.flatnonzero(keep)],
    }


def challenge_score(metrics: dict, references: dict, weights: dict | None = None) -> float:
    """μ-RegPro score: w·DSC + w·RDSC + Σ w·(1 - clip(m / m_0, 0, 1)) over TRE, RTRE, RTs, HD95.

    ``metrics`` holds DSC, RDSC, TRE, RTRE, RTs, HD95; ``references`` holds TRE_0, RTRE_0, RTs_0, HD95_0.

    A zero reference makes the ratio 0 when the metric is also 0 and 1 otherwise (our convention;
    0/0 is undefined in the challenge's formula).
    """
    weights = SCORE_WEIGHTS if weights is None else weights
    total = weights["DSC"] * metrics["DSC"] + weights["RDSC"] * metrics["RDSC"]
    for name in ("TRE", "RTRE", "RTs", "HD95"):
        value, ref = metrics[name], references[f"{name}_0"]
        ratio = value / ref if ref > 0 else float(value > 0)
        total += weights[name] * (1.0 - min(max(ratio, 0.0), 1.0))
    return float(total)


def aggregate(
    per_case: list[dict], mode: str = "official", fraction: float = 0.68, weights: dict | None = None
) -> dict:
    """Challenge metrics over cases from :func:`case_metrics` outputs.

    DSC: mean; RDSC: mean of the best ``round(fraction·N)`` DSC. TRE: mean over cases of
    ``rms(errors)``; RTRE: mean of the lowest ``round(fraction·N)`` per-case TREs; RTs: mean over cases
    of the rms of each case's lowest ``round(fraction·L)`` channel errors. Channels whose error is 0 in
    every case are dropped first (separately for the references). HD95: mean of the per-case channel
    means. The references TRE_0, RTRE_0, RTs_0, HD95_0 are the same on the unregistered labels.

    Returns ``{"mode", "n_cases", "metrics": {...,"score"}, "references": {...}, "kept_channels",
    "kept_channels_0", "per_case": {"tre", "rts", "tre0", "rts0"}}``.
    """
    _check_mode(mode)
    if not per_case:
        raise InputError("no cases to aggregate")
    dsc = np.array([c["dsc"] for c in per_case])
    after = _centroid_summary([c["errors"] for c in per_case], mode, fraction)
    before = _centroid_summary([c["errors0"] for c in per_case], mode, fraction)
    metrics = {
        "DSC": float(dsc.mean()),
        "RDSC": float(np.mean(np.sort(dsc)[::-1][: n_kept(len(dsc), fraction)])),
        "TRE": after["TRE"],
        "RTRE": after["RTRE"],
        "RTs": after["RTs"],
        "HD95": float(np.mean([c["hd95"] for c in per_case])),
    }
    references = {
        "TRE_0": before["TRE"],
        "RTRE_0": before["RTRE"],
        "RTs_0": before["RTs"],
        "HD95_0": float(np.mean([c["hd95_0"] for c in per_case])),
    }
    metrics["score"] = challenge_score(metrics, references, weights)
    return {
        "mode": mode,
        "n_cases": len(per_case),
        "metrics": metrics,
        "references": references,
        "kept_channels": after["kept_channels"],
        "kept_channels_0": before["kept_channels"],
        "per_case": {
            "tre": after["per_case_tre"],
            "rts": after["per_case_rts"],
            "tre0": before["per_case_tre"],
            "rts0": before["per_case_rts"],
        },
    }
