"""Scoring registered sequences against a phantom sequence folder: ``python -m scripts evaluate-sequences``.

For each case of ``split`` with a registration folder ``<registered_dir>/<case>/`` (what
:func:`scripts.inference.sequence.register_sequence` and ``python -m scripts register`` with a 4-D ``--fixed``
write): the warped label sequence and the field sequence are compared, frame by frame, with the folder's analytic
TRUS labels (``us_sequence_labels``) and true fields (``ddf_mr2us_sequences``); the metrics are
:mod:`scripts.evaluation.sequence_metrics`' plus the gland Dice per frame.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from scripts.data.nifti import InputError, refuse_existing, write_json
from scripts.evaluation.sequence_metrics import sequence_metrics

__all__ = ["landmark_centroids_mm", "score_sequence", "evaluate_sequences"]

LANDMARK_CHANNELS = (2, 3, 4, 5)
SUMMARY_KEYS = ("dice_mean", "tre_mean_mm", "tre_sd_mm", "interframe_error_mean_mm", "consistency", "jitter_mm")


def landmark_centroids_mm(labels: np.ndarray, affine: np.ndarray, channels=LANDMARK_CHANNELS) -> np.ndarray:
    """(X, Y, Z, C) labels -> (N, 3) RAS mm centroids of each channel's ``> 0.5`` voxels (NaN rows where empty)."""
    out = []
    for c in channels:
        mask = labels[..., c] > 0.5 if c < labels.shape[-1] else np.zeros(labels.shape[:3], bool)
        vox = np.asarray(ndimage.center_of_mass(mask)) if mask.any() else np.full(3, np.nan)
        out.append(affine[:3, :3] @ vox + affine[:3, 3])
    return np.asarray(out)


def score_sequence(fields, warped, true_fields, true_labels, affine, motion_mm=None) -> dict:
    """One case: ``fields``/``true_fields`` (T, X, Y, Z, 3) mm, ``warped``/``true_labels`` (T, X, Y, Z, C) on the
    fixed grid of ``affine``. Returns :func:`sequence_metrics` with the gland Dice per frame and the landmark
    centroids (RAS mm) of both."""
    frames = fields.shape[0]
    pred_pts = np.stack([landmark_centroids_mm(warped[t], affine) for t in range(frames)])
    true_pts = np.stack([landmark_centroids_mm(true_labels[t], affine) for t in range(frames)])
    gland = true_labels[..., 0] > 0.5
    m = sequence_metrics(fields, true_fields, gland, pred_pts, true_pts, motion_mm)
    dice = [float(2 * (w & g).sum() / max(w.sum() + g.sum(), 1)) for w, g in zip(warped[..., 0] > 0.5, gland)]
    m.update(dice=dice, dice_mean=float(np.mean(dice)))
    m.update(pred_points_ras_mm=np.round(pred_pts, 3).tolist(), true_points_ras_mm=np.round(true_pts, 3).tolist())
    return m


def _frames_first(path, what: str) -> tuple[np.ndarray, np.ndarray]:
    """A (X, Y, Z, T[, C]) NIfTI as (T, X, Y, Z, C) and its affine."""
    if not Path(path).is_file():
        raise InputError(f"{path}: {what} is missing")
    img = nib.load(str(path))
    data = np.asarray(img.dataobj, np.float32)
    if data.ndim != 5:
        raise InputError(f"{path}: {what} must be (X, Y, Z, T, C); got {data.shape}")
    return np.moveaxis(data, 3, 0), img.affine


def evaluate_sequences(
    dataset_dir, registered_dir, split: str = "holdout", out: str = "eval_sequences", overwrite: bool = False
) -> dict:
    """Score every registered case of ``split``; write ``<out>/per_case.json`` and ``<out>/summary.json``.

    Args:
        dataset_dir: a sequence folder (``python -m scripts synth --sequence T``).
        registered_dir: one folder per case (``<case>/warped_label_sequence.nii.gz`` and
            ``<case>/transform_fixed_to_moving_sequence.nii.gz``).
        split, out, overwrite: which split; where the results go; replace earlier results.
    Returns the summary: each metric's mean over cases, and the large-motion success count.
    """
    root, registered, out = Path(dataset_dir) / split, Path(registered_dir), Path(out)
    refuse_existing([out / "per_case.json", out / "summary.json"], overwrite)
    cases = sorted(p.name[: -len(".nii.gz")] for p in (root / "us_sequences").glob("*.nii.gz"))
    cases = [c for c in cases if (registered / c).is_dir()]
    if not cases:
        raise InputError(f"{registered}: no registered case of {root / 'us_sequences'} (expected <case>/ folders)")
    rows = {}
    for case in cases:
        fields, affine = _frames_first(
            registered / case / "transform_fixed_to_moving_sequence.nii.gz", "field sequence"
        )
        warped, _ = _frames_first(registered / case / "warped_label_sequence.nii.gz", "warped label sequence")
        true_fields, _ = _frames_first(root / "ddf_mr2us_sequences" / f"{case}.nii.gz", "true field sequence")
        true_labels, _ = _frames_first(root / "us_sequence_labels" / f"{case}.nii.gz", "label sequence")
        truth = json.loads((root / "truth" / f"{case}.json").read_text())["sequence"]["frames_truth"]
        if fields.shape != true_fields.shape or warped.shape != true_labels.shape:
            raise InputError(
                f"{registered / case}: sequences {fields.shape}, {warped.shape} do not match the truth's "
                f"{true_fields.shape}, {true_labels.shape} (frames, grid, channels)"
            )
        motion = [f["motion_p95_mm"] for f in truth]
        rows[case] = score_sequence(fields, warped, true_fields, true_labels, affine, motion)
    summary = {k: float(np.nanmean([r[k] for r in rows.values()])) for k in SUMMARY_KEYS}
    summary.update(
        cases=len(rows),
        large_motion_frames=sum(r["large_motion_frames"] for r in rows.values()),
        large_motion_successes=sum(r["large_motion_successes"] for r in rows.values()),
    )
    write_json(rows, out / "per_case.json", overwrite)
    write_json(summary, out / "summary.json", overwrite)
    return summary
