"""Evaluate registrations of one μ-RegPro split: per-case CSV, summary JSON and box plots.

Where the warped moving labels come from (``method``):

- ``"warped"``: stored files ``<warped_dir>/<case>.nii.gz`` (``case`` as ``case000065``), 4-D
  channel-last ``(X, Y, Z, C)`` (3-D if C = 1) on the FIXED image's grid (same shape and affine),
  soft (linearly interpolated) or binary;
- ``"identity"``: no registration — the moving labels resampled physically (both affines) onto the
  fixed grid with linear interpolation (``nibabel.processing.resample_from_to``, order 1, 0 outside);
- ``"model"``: a ``predictor(case) -> {"warped_label": (C, X, Y, Z) array on the fixed grid,
  optional "ddf": field in the on-disk convention}`` called on each data dict of
  :func:`scripts.data.datalist.load_split` (the hook a trained network's config plugs into).

Fields (optional, ``ddf_dir`` / ``true_ddf_dir``, ``<case>.nii.gz``) use the bundle's one convention:
ITK-style ``(X, Y, Z, 1, 3)`` (or ``(X, Y, Z, 3)``), LPS mm, on the fixed grid. ``ddf_dir`` gives
the Jacobian metrics; a ground-truth field (e.g. the phantom's) also gives the field error in mm.

Outputs (``<out>/``): ``per_case.csv``, ``summary.json`` (mode and direction named) and
``boxplots.png``. Existing outputs are kept unless ``overwrite``.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to

from scripts.data.datalist import load_split
from scripts.data.nifti import (
    InputError,
    atomic_write,
    load_array,
    read_nifti,
    refuse_existing,
    same_grid,
    write_json,
    write_text,
)
from scripts.evaluation.metrics import MODES, aggregate, case_metrics, minmax_normalise
from scripts.spatial.geometry import RAS_LPS_FLIP

__all__ = ["evaluate", "read_label", "identity_warp", "ddf_to_voxels", "OUTPUTS"]

logger = logging.getLogger(__name__)

METHODS = ("warped", "identity", "model")
OUTPUTS = ("summary.json", "per_case.csv", "boxplots.png")  # summary first: the one a refusal names


def read_label(path, what: str = "label") -> tuple[np.ndarray, nib.Nifti1Image]:
    """Read a 3-D or channel-last 4-D label file as a channel-first ``(C, X, Y, Z)`` float array (and its image)."""
    img = read_nifti(path, ndim=(3, 4), what=what)
    data = load_array(img, path, what, dtype=np.float64)
    data = data[None] if data.ndim == 3 else np.moveaxis(data, -1, 0)
    return data, img


def identity_warp(moving_label: np.ndarray, moving_affine: np.ndarray, fixed_img) -> np.ndarray:
    """ "No registration": resample a ``(C, ...)`` moving label onto the fixed grid through the affines (world mm).

    Linear interpolation, 0 outside the moving volume. Returns ``(C, X, Y, Z)`` on ``fixed_img``'s grid.
    """
    target = (fixed_img.shape[:3], fixed_img.affine)
    return np.stack(
        [
            np.asarray(resample_from_to(nib.Nifti1Image(ch, moving_affine), target, order=1).dataobj)
            for ch in moving_label
        ]
    )


def ddf_to_voxels(ddf_lps_mm: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """On-disk field ``(X, Y, Z, [1,] 3)``, LPS mm -> ``(3, X, Y, Z)`` displacement in voxels of the grid ``affine``."""
    ddf = np.asarray(ddf_lps_mm, dtype=np.float64).reshape(*np.shape(ddf_lps_mm)[:3], 3) * RAS_LPS_FLIP
    return np.moveaxis(ddf @ np.linalg.inv(np.asarray(affine)[:3, :3]).T, -1, 0)


def _read_ddf(path: Path, fixed_img, what: str) -> np.ndarray:
    img = read_nifti(path, ndim=(4, 5), what=what)
    if img.shape[-1] != 3 or (img.ndim == 5 and img.shape[3] != 1):
        raise InputError(f"{path}: {what} has shape {tuple(img.shape)}, expected (X, Y, Z, 1, 3) or (X, Y, Z, 3)")
    if not same_grid(img, fixed_img):
        raise InputError(f"{path}: {what} is not on the fixed image's grid (shape and affine must match)")
    return ddf_to_voxels(load_array(img, path, what, dtype=np.float64), fixed_img.affine)


def case_file(folder, case: str, name: str) -> Path:
    """``<folder>/<case>.nii.gz``, or the pipeline's layout ``<folder>/<case>/<name>`` when that exists."""
    flat, nested = Path(folder) / f"{case}.nii.gz", Path(folder) / case / name
    return nested if nested.exists() and not flat.exists() else flat


def _warped(case: dict, method: str, warped_dir, predictor, moving, moving_img, fixed_img):
    """(warped label (C, X, Y, Z), predicted field in the on-disk convention or None) for one case."""
    if method == "identity":
        return identity_warp(moving, moving_img.affine, fixed_img), None
    if method == "model":
        pred = predictor(case)
        return np.asarray(pred["warped_label"], dtype=np.float64), pred.get("ddf")
    path = case_file(warped_dir, case["case"], "warped_label.nii.gz")
    warped, img = read_label(path, "warped label")
    if not same_grid(img, fixed_img):
        raise InputError(f"{path}: warped label is not on the fixed image's grid ({case['fixed_label']})")
    if warped.shape[0] != moving.shape[0]:
        raise InputError(f"{path}: warped label has {warped.shape[0]} channels, the moving label {moving.shape[0]}")
    return warped, None


def _nan_to_none(obj):
    """JSON has no NaN: replace float NaN by null, recursively."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj


def _csv_text(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _boxplots(path: Path, dsc: list, tre: list, tre_mm: list, title: str, mode: str, overwrite: bool) -> None:
    """Box plots of the per-case DSC, official/float TRE (voxels) and clinical TRE (mm), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (dsc, "DSC (gland, soft)"),
        (tre, f"TRE ({mode} mode, voxels)"),
        ([v for v in tre_mm if not math.isnan(v)], "landmark TRE (mm, Euclidean)"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
    for ax, (values, panel_title) in zip(axes, panels):
        ax.boxplot(values) if values else ax.text(0.5, 0.5, "no values", ha="center")
        ax.set_title(panel_title)
        ax.set_xticks([])
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100), overwrite)
    plt.close(fig)


def evaluate(
    dataset_dir: str | None = None,
    split: str = "val",
    direction: str = "mr2us",
    warped_dir: str | None = None,
    method: str = "warped",
    mode: str = "official",
    out: str = "eval",
    overwrite: bool = False,
    datalist: str | None = None,
    ddf_dir: str | None = None,
    true_ddf_dir: str | None = None,
    predictor: Callable[[dict], dict] | None = None,
    fraction: float = 0.68,
    percentile: float = 95.0,
    gland_channel: int = 0,
) -> dict:
    """Score the registrations of one split; write ``per_case.csv``, ``summary.json``, ``boxplots.png`` in ``out``.

    Args:
        dataset_dir: μ-RegPro-layout folder (or give ``datalist``, a JSON datalist; see scripts/data/datalist.py).
        split: "train", "val" or "holdout".
        direction: "mr2us" (moving MR, fixed TRUS) or "us2mr" (the challenge's).
        warped_dir: folder of stored warped labels ``<case>.nii.gz`` on the fixed grid (method "warped"), or
            the registration pipeline's output folder (``<case>/warped_label.nii.gz``).
        method: "warped", "identity" (no registration) or "model" (needs ``predictor``).
        mode: "official" (the challenge's integer arithmetic) or "float".
        out: output folder.
        overwrite: replace existing outputs (otherwise refuse before computing anything).
        ddf_dir: optional folder of predicted fields (on-disk convention) for the Jacobian metrics, or the
            pipeline's output folder (``<case>/transform_fixed_to_moving.nii.gz``).
        true_ddf_dir: optional folder of ground-truth fields for the field error in mm.
        predictor: callable for method "model" (see module docstring).
        fraction: share of cases/channels kept by RDSC, RTRE and RTs (0.68).
        percentile: HD95's percentile (95).
        gland_channel: label channel of the gland (DSC; left out of the clinical TRE).

    Returns the summary dict written to ``summary.json``.
    """
    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}, got {mode!r}")
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {method!r}")
    if method == "warped" and warped_dir is None:
        raise InputError("method 'warped' needs warped_dir (a folder of warped labels <case>.nii.gz)")
    if method == "warped" and not Path(warped_dir).is_dir():
        raise InputError(f"{warped_dir}: warped label folder does not exist")
    if method == "model" and predictor is None:
        raise InputError("method 'model' needs a predictor")
    if true_ddf_dir is not None and ddf_dir is None and method != "model":
        raise InputError("true_ddf_dir needs predicted fields (ddf_dir, or method 'model' with a predictor)")
    if not 0 < float(fraction) <= 1 or not 0 < float(percentile) <= 100:
        raise InputError(f"fraction must be in (0, 1] and percentile in (0, 100], got {fraction!r} and {percentile!r}")
    if isinstance(gland_channel, bool) or not isinstance(gland_channel, int) or gland_channel < 0:
        raise InputError(f"gland_channel must be a label channel index (0, 1, ...), got {gland_channel!r}")
    out = Path(out)
    overwrite = refuse_existing([out / name for name in OUTPUTS], overwrite)

    cases = load_split(dataset_dir, split, direction, datalist=datalist)
    per_case, rows = [], []
    for case in cases:
        fixed, fixed_img = read_label(case["fixed_label"], "fixed label")
        moving, moving_img = read_label(case["moving_label"], "moving label")
        if gland_channel >= len(fixed):
            raise InputError(
                f"{case['fixed_label']}: has {len(fixed)} label channels, so there is no gland_channel {gland_channel}"
            )
        moving = minmax_normalise(moving)  # the official pipeline normalises the moving labels before warping
        warped, ddf = _warped(case, method, warped_dir, predictor, moving, moving_img, fixed_img)
        if ddf_dir is not None:
            ddf = _read_ddf(
                case_file(ddf_dir, case["case"], "transform_fixed_to_moving.nii.gz"), fixed_img, "displacement field"
            )
        elif ddf is not None:
            ddf = ddf_to_voxels(ddf, fixed_img.affine)
        true_ddf = None
        if true_ddf_dir is not None:
            true_ddf = _read_ddf(Path(true_ddf_dir) / f"{case['case']}.nii.gz", fixed_img, "ground-truth field")
        spacing = np.sqrt(np.sum(np.asarray(fixed_img.affine)[:3, :3] ** 2, axis=0))
        if warped.shape != fixed.shape:
            raise InputError(
                f"{case['fixed_label']}: the predictor's warped label {warped.shape} is not on this grid {fixed.shape}"
            )
        m = case_metrics(fixed, warped, moving, mode, spacing, ddf, true_ddf, gland_channel, percentile)
        per_case.append(m)
        logger.info("%s: DSC %.3f, errors %s", case["case"], m["dsc"], m["errors"])
    summary = aggregate(per_case, mode, fraction)

    for i, (case, m) in enumerate(zip(cases, per_case)):
        row = {"case": case["case"], "dsc": m["dsc"], "tre": summary["per_case"]["tre"][i]}
        row.update(rts=summary["per_case"]["rts"][i], hd95=m["hd95"])
        row.update({f"error_ch{c}": e for c, e in enumerate(m["errors"])})
        row.update(tre_0=summary["per_case"]["tre0"][i], rts_0=summary["per_case"]["rts0"][i], hd95_0=m["hd95_0"])
        row.update({f"error0_ch{c}": e for c, e in enumerate(m["errors0"])})
        row.update({f"hd95_ch{c}": h for c, h in enumerate(m["hd95_channels"])})
        extra = ("tre_mm", "n_landmarks_used", "n_landmarks_empty_fixed", "n_landmarks_empty_warped")
        row.update({k: m[k] for k in extra})
        row.update({k: m[k] for k in ("jacobian_nonpositive_pct", "log_jacobian_std") if k in m})
        row.update({k: m[k] for k in ("ddf_error_mean_mm", "ddf_error_p95_mm", "ddf_error_max_mm") if k in m})
        rows.append(row)

    tre_mm = [m["tre_mm"] for m in per_case]
    valid_mm = [v for v in tre_mm if not math.isnan(v)]
    result = {
        "mode": mode,
        "direction": direction,
        "split": split,
        "method": method,
        "n_cases": summary["n_cases"],
        "units": "official metrics: voxels of the fixed grid (HD95, TRE, RTRE, RTs); clinical: mm",
        "metrics": summary["metrics"],
        "references": summary["references"],
        "kept_channels": summary["kept_channels"],
        "kept_channels_0": summary["kept_channels_0"],
        "clinical": {
            "tre_mm_mean": float(np.mean(valid_mm)) if valid_mm else None,
            "tre_mm_median": float(np.median(valid_mm)) if valid_mm else None,
            "n_landmarks_used": int(sum(m["n_landmarks_used"] for m in per_case)),
            "n_landmarks_excluded_empty_fixed": int(sum(m["n_landmarks_empty_fixed"] for m in per_case)),
            "n_landmarks_excluded_empty_warped": int(sum(m["n_landmarks_empty_warped"] for m in per_case)),
            "n_cases_without_landmarks": len(tre_mm) - len(valid_mm),
        },
    }
    groups = {
        "regularity": ("jacobian_nonpositive_pct", "log_jacobian_std"),
        "field_error": ("ddf_error_mean_mm", "ddf_error_p95_mm", "ddf_error_max_mm"),
    }
    for group, keys in groups.items():
        if keys[0] in per_case[0]:  # mean over cases, NaN (e.g. an empty gland) left out
            result[group] = {f"{k}_mean": float(np.nanmean([m[k] for m in per_case])) for k in keys}
    result = _nan_to_none(result)

    write_text(_csv_text(rows), out / "per_case.csv", overwrite)
    write_json(result, out / "summary.json", overwrite)
    title = f"{split}, {direction}, {method}: {len(cases)} cases"
    dsc = [m["dsc"] for m in per_case]
    _boxplots(out / "boxplots.png", dsc, summary["per_case"]["tre"], tre_mm, title, mode, overwrite)
    logger.info("%s (%s mode, %s): %s", out / "summary.json", mode, direction, result["metrics"])
    return result
