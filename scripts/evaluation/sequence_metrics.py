"""Metrics of a registered TRUS sequence: per-frame accuracy and its coherence over time.

Inputs, for one case of ``T`` frames on one fixed (TRUS) grid:

- ``pred``, ``true``: (T, X, Y, Z, 3) displacement fields in mm (fixed -> moving offsets, any one frame of axes
  for both, e.g. LPS as written by the bundle and the phantom);
- ``mask``: (X, Y, Z) or (T, X, Y, Z) region where fields are compared (e.g. the true gland of each frame);
- ``pred_points``, ``true_points``: (T, N, 3) mm, the landmark positions each method gives and the truth's
  (NaN rows: a landmark missing in that frame, left out).

Definitions (docs/dynamic.md):

- ``tre_mm`` (T,): per frame, the mean over landmarks of ``|pred_point - true_point|``;
- ``tre_sd_mm``: standard deviation over frames of ``tre_mm`` (population, ddof 0);
- ``interframe_error_mm`` (T-1,): per pair of consecutive frames, the mean over the mask of
  ``|Δpred - Δtrue|``, ``Δu_t = u_t - u_(t-1)``: how far the predicted change between frames is from the true
  change (both frames' masks must hold);
- ``consistency``: ``1 - Σ|Δpred - Δtrue| / Σ|Δtrue|`` over all those voxels and pairs: 1 when the predicted
  changes are the true ones, 0 when no better than predicting no change, negative when worse;
- ``jitter_mm``: the mean over the mask and frames 2..T-1 of ``|e_t - 2 e_(t-1) + e_(t-2)|``, ``e = pred - true``:
  the error's frame-to-frame wobble (a constant or steadily drifting error has none);
- ``success_rate``: the share of frames with ``motion > motion_threshold_mm`` whose ``tre_mm`` is below
  ``tre_threshold_mm`` (NaN when no frame moved that far), with ``motion`` each frame's true motion
  (e.g. the phantom's ``motion_p95_mm``).
"""

from __future__ import annotations

import numpy as np

from scripts.data.nifti import InputError

__all__ = ["frame_tre_mm", "sequence_metrics", "SUCCESS_TRE_MM", "LARGE_MOTION_MM"]

# a registration "succeeds" on a frame when its landmark error is below 5 mm: the radius of a 0.5 cc lesion
# (about 4.9 mm), the smallest clinically significant volume a targeted biopsy aims at
SUCCESS_TRE_MM = 5.0
LARGE_MOTION_MM = 5.0  # the paper's "deformations > 5 mm" frames


def frame_tre_mm(pred_points: np.ndarray, true_points: np.ndarray) -> np.ndarray:
    """(T, N, 3), (T, N, 3) mm -> (T,) mean landmark distance per frame; NaN rows are left out (NaN if none)."""
    pred, true = np.asarray(pred_points, np.float64), np.asarray(true_points, np.float64)
    if pred.shape != true.shape or pred.ndim != 3 or pred.shape[-1] != 3:
        raise InputError(f"points must both be (T, N, 3); got {pred.shape} and {true.shape}")
    d = np.linalg.norm(pred - true, axis=-1)  # NaN where either is missing
    with np.errstate(invalid="ignore"):
        counts = np.sum(~np.isnan(d), axis=1)
        return np.where(counts > 0, np.nansum(d, axis=1) / np.maximum(counts, 1), np.nan)


def sequence_metrics(
    pred: np.ndarray,
    true: np.ndarray,
    mask: np.ndarray,
    pred_points: np.ndarray,
    true_points: np.ndarray,
    motion_mm=None,
    tre_threshold_mm: float = SUCCESS_TRE_MM,
    motion_threshold_mm: float = LARGE_MOTION_MM,
) -> dict:
    """The module's metrics of one case (shapes and definitions in the module docstring)."""
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    if pred.shape != true.shape or pred.ndim != 5 or pred.shape[-1] != 3 or pred.shape[0] < 2:
        raise InputError(f"fields must both be (T >= 2, X, Y, Z, 3) mm; got {pred.shape} and {true.shape}")
    frames = pred.shape[0]
    mask = np.asarray(mask, bool)
    mask = np.broadcast_to(mask, (frames, *pred.shape[1:4])) if mask.ndim == 3 else mask
    if mask.shape != pred.shape[:4]:
        raise InputError(f"mask must be (X, Y, Z) or (T, X, Y, Z) = {pred.shape[:4]}; got {mask.shape}")
    tre = frame_tre_mm(pred_points, true_points)
    if tre.shape[0] != frames:
        raise InputError(f"points have {tre.shape[0]} frames, the fields {frames}")

    both = mask[1:] & mask[:-1]  # (T-1, X, Y, Z)
    miss = np.linalg.norm(np.diff(pred, axis=0) - np.diff(true, axis=0), axis=-1)
    change = np.linalg.norm(np.diff(true, axis=0), axis=-1)
    interframe = np.array([m[b].mean() if b.any() else np.nan for m, b in zip(miss, both)])
    total_change = change[both].sum()
    error = pred - true
    wobble = np.linalg.norm(error[2:] - 2 * error[1:-1] + error[:-2], axis=-1)
    three = mask[2:] & mask[1:-1] & mask[:-2]
    out = {
        "tre_mm": tre.tolist(),
        "tre_mean_mm": float(np.nanmean(tre)) if np.isfinite(tre).any() else float("nan"),
        "tre_sd_mm": float(np.nanstd(tre)) if np.isfinite(tre).any() else float("nan"),
        "interframe_error_mm": interframe.tolist(),
        "interframe_error_mean_mm": float(np.nanmean(interframe)) if np.isfinite(interframe).any() else float("nan"),
        "consistency": float(1 - miss[both].sum() / total_change) if total_change > 0 else float("nan"),
        "jitter_mm": float(wobble[three].mean()) if frames >= 3 and three.any() else float("nan"),
    }
    if motion_mm is not None:
        motion = np.asarray(motion_mm, np.float64)
        large = motion > motion_threshold_mm
        out["large_motion_frames"] = int(large.sum())
        out["large_motion_successes"] = int(np.sum(large & (tre < tre_threshold_mm)))
        out["success_rate"] = (
            out["large_motion_successes"] / out["large_motion_frames"] if large.any() else float("nan")
        )
    return out
