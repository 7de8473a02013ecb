"""Quality verdict of one registration: ``qc.json`` with the numbers and a pass/warn verdict.

Reads what :func:`scripts.pipeline.register_pair` wrote into a case folder (``result.json``, the composed
field, the warped labels) and checks (thresholds are arguments; ``docs/biopsy.md`` explains them):

- ``gland_dice``: Dice of the warped moving gland (label channel 0) and a gland mask on the fixed image
  (predicted by the segmentation network, or a given label); skipped (``null``) without a fixed gland;
- ``nonpositive_jacobian_pct``: % of fixed voxels where the composed transform folds (det J <= 0);
- ``max_deformable_mm``: largest length of the deformable part u (the composed field minus the rigid);
- ``rigid``: the rigid step's final metric: the aligned masks' Dice for the mask-based rigid (and a
  rejected mask result, which fell back to mutual information, fails), else ANTs' Mattes mutual information
  of the fixed image and the rigidly aligned moving image (negative: lower is better), which must not be
  worse than at identity.
"""

from __future__ import annotations

import json
from pathlib import Path

import ants
import numpy as np

from scripts.geometry import apply_affine, grid_points, lps_affine
from scripts.io import InputError, load_array, read_nifti, write_json
from scripts.metrics import percent_nonpositive_jacobian, soft_dice
from scripts.transform_io import read_field_nifti, rigid_to_ants

__all__ = ["QC_FILE", "gland_mask", "deformable_part", "rigid_metric", "quality_check"]

QC_FILE = "qc.json"


def gland_mask(path, what: str = "fixed gland") -> tuple[np.ndarray, np.ndarray]:
    """A gland mask (X, Y, Z) bool from a 3-D mask or a 4-D channel-last label (channel 0), and its affine."""
    img = read_nifti(path, ndim=(3, 4), what=what)
    data = load_array(img, path, what)
    return (data if data.ndim == 3 else data[..., 0]) > 0.5, img.affine


def deformable_part(field_mm, affine_ras, rigid) -> np.ndarray:
    """The deformable part u (X, Y, Z, 3, LPS mm, fixed space) of a composed field ``R(p + u(p)) - p``.

    With ``R(x) = A x + t``: ``u(p) = A^-1 (p + field(p) - R(p))``.
    """
    rigid = np.asarray(rigid, np.float64)
    points = grid_points(affine_ras, field_mm.shape[:3])
    return (points + field_mm - apply_affine(rigid, points)) @ np.linalg.inv(rigid[:3, :3]).T


def rigid_metric(fixed_image, moving_image, rigid) -> dict:
    """Mattes mutual information (ANTs, negative, lower = better) of the fixed image and the moving image
    resampled onto it at identity and through the 4x4 LPS fixed -> moving ``rigid``."""
    fixed = ants.image_read(str(fixed_image)).clone("float")
    moving = ants.image_read(str(moving_image)).clone("float")
    value = lambda m: float(ants.image_mutual_information(  # noqa: E731
        fixed, rigid_to_ants(m).apply_to_image(moving, reference=fixed, interpolation="linear").clone("float")))
    return {"mutual_information": value(rigid), "mutual_information_identity": value(np.eye(4))}


def _check(value, rule: str, threshold) -> dict:
    """One check: ``value`` must be ``rule`` (">=" or "<=") ``threshold``."""
    ok = value is not None and (value >= threshold if rule == ">=" else value <= threshold)
    return {"value": value, "rule": rule, "threshold": threshold, "ok": bool(ok)}


def quality_check(
    case_dir,
    fixed_gland=None,
    gland_source: str | None = None,
    min_gland_dice: float = 0.7,
    max_nonpositive_jacobian_pct: float = 0.1,
    max_deformable_mm: float = 30.0,
    min_rigid_mask_dice: float = 0.5,
    max_rigid_mi_increase: float = 0.0,
    overwrite: bool = False,
) -> dict:
    """Compute the quality numbers of a registered case folder, decide pass/warn, write ``qc.json``.

    Args:
        case_dir: a folder written by :func:`scripts.pipeline.register_pair`.
        fixed_gland: gland mask on the fixed image's grid (3-D, or 4-D label -> channel 0); ``None``: no Dice.
        gland_source: where that mask came from (recorded: "predicted", "label", a path...).
        min_gland_dice: the warped moving gland must overlap the fixed gland at least this much.
        max_nonpositive_jacobian_pct: at most this % of fixed voxels may fold.
        max_deformable_mm: the deformable part may move no point further than this (mm).
        min_rigid_mask_dice: mask-based rigid: Dice of the aligned masks at least this.
        max_rigid_mi_increase: MI-based rigid: its final metric may exceed the identity's by at most this.
    Returns:
        the ``qc.json`` content: ``verdict`` ("pass"/"warn"), ``reasons`` (one line per failed check),
        ``checks`` (value, threshold, ok per check) and ``metrics``.
    """
    case_dir = Path(case_dir)
    result_path = case_dir / "result.json"
    if not result_path.is_file():
        raise InputError(f"{result_path}: missing; {case_dir} is not a registration output folder")
    result = json.loads(result_path.read_text())
    files = result["files"]
    field, affine = read_field_nifti(case_dir / files["forward_field"])
    rigid = np.asarray(result["rigid"]["matrix_lps_fixed_to_moving"], np.float64)
    checks, metrics = {}, {}

    # gland overlap
    dice = None
    if fixed_gland is not None and "warped_label" in files:
        mask, mask_affine = gland_mask(fixed_gland)
        if mask.shape != field.shape[:3] or not np.allclose(mask_affine, affine, atol=1e-3):
            raise InputError(f"{fixed_gland}: fixed gland mask is not on the fixed image's grid ({result['fixed_image']})")
        warped, _ = gland_mask(case_dir / files["warped_label"], "warped label")
        dice = soft_dice(warped, mask)
        checks["gland_dice"] = _check(dice, ">=", min_gland_dice)
    metrics["gland_dice"] = dice
    metrics["gland_source"] = gland_source if dice is not None else None

    # folding of the composed transform (voxel units of the fixed grid; det J does not depend on them)
    to_voxel = np.linalg.inv(lps_affine(affine)[:3, :3])
    pct = percent_nonpositive_jacobian(np.moveaxis(field @ to_voxel.T, -1, 0))
    checks["nonpositive_jacobian_pct"] = _check(pct, "<=", max_nonpositive_jacobian_pct)

    # displacement
    deform = float(np.linalg.norm(deformable_part(field, affine, rigid), axis=-1).max())
    checks["max_deformable_mm"] = _check(deform, "<=", max_deformable_mm)
    metrics["max_total_displacement_mm"] = float(np.linalg.norm(field, axis=-1).max())

    # the rigid step
    info = result["rigid"]
    rigid_out = {"method": info.get("method"), "mask_dice": info.get("mask_dice")}
    if info.get("method") == "masks":
        checks["rigid_mask_dice"] = _check(info["mask_dice"], ">=", min_rigid_mask_dice)
    elif info.get("method") == "mutual_information":
        if info.get("mask_dice") is not None:  # the mask-based rigid ran and was rejected
            checks["rigid_mask_dice"] = {**_check(info["mask_dice"], ">=", min_rigid_mask_dice), "ok": False}
        mi = rigid_metric(result["fixed_image"], result["moving_image"], rigid)
        rigid_out.update(mi)
        increase = mi["mutual_information"] - mi["mutual_information_identity"]
        checks["rigid_mi_increase"] = _check(increase, "<=", max_rigid_mi_increase)
    metrics["rigid"] = rigid_out

    reasons = [f"{name} = {c['value']:.4g}, needs {c['rule']} {c['threshold']}" for name, c in checks.items()
               if not c["ok"]]
    qc = {
        "verdict": "pass" if not reasons else "warn",
        "reasons": reasons,
        "checks": checks,
        "metrics": metrics,
        "deformable": result.get("deformable"),
        "direction": result.get("direction"),
    }
    write_json(qc, case_dir / QC_FILE, overwrite)
    return qc
