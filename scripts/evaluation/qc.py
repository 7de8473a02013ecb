"""Quality verdict of one registration: ``qc.json`` with the numbers and a pass/warn/fail verdict.

Reads what :meth:`scripts.inference.registrar.Registrar.register` wrote into a case folder (``result.json``, the composed
field, the warped labels, the gland masks it used) and checks (thresholds are arguments; ``docs/biopsy.md``
explains them). A failed check of the first two makes the verdict "fail" (the registration made things
worse, or moved the gland implausibly far); any other failed check makes it "warn":

- ``gland_dice_drop`` (fail): Dice of the moving gland and a fixed gland at identity (the moving gland
  resampled onto the fixed grid in physical space, no transform) minus their Dice after the registration
  (resampled through the composed transform); needs a moving and a fixed gland (arguments, or the masks
  recorded in ``result.json``: given, or predicted by the segmenter); skipped otherwise;
- ``gland_shift_mm`` (fail): how far the registration moves the moving gland's centroid (mm): the length of
  the mean of ``T^-1(q) - q`` over the moving gland's voxel centres q (the inverse composed field, moving ->
  fixed); without a moving gland, ``|T(p) - p|`` at the centre p of the fixed image's field of view (the
  composed field, fixed -> moving; a TRUS volume is centred on the gland). T's rigid alone acts beyond a
  field's grid;
- ``gland_dice``: Dice of the warped moving gland (label channel 0) and a gland mask on the fixed image
  (predicted by the segmentation network, or a given label); skipped (``null``) without a fixed gland;
- ``nonpositive_jacobian_pct``: % of fixed voxels where the composed transform folds (det J <= 0);
- ``max_deformable_mm``: largest length of the deformable part u (the composed field minus the rigid);
- ``rigid``: the rigid step's final metric: the aligned masks' Dice for the mask-based rigid (and a
  rejected mask result, which fell back to mutual information, fails), else ANTs' Mattes mutual information
  of the fixed image and the rigidly aligned moving image (negative: lower is better), which must not be
  worse than at identity.

Frames: NIfTI affines are nibabel RAS; points and fields are LPS mm (:mod:`scripts.spatial.geometry`).
"""

from __future__ import annotations

import json
from pathlib import Path

import ants
import numpy as np

from scripts.data.nifti import InputError, read_gland_mask, write_json
from scripts.evaluation.metrics import percent_nonpositive_jacobian, soft_dice
from scripts.spatial.composed import read_field_nifti, rigid_to_ants
from scripts.spatial.geometry import apply_affine, grid_points, lps_affine, sample, world_to_voxel

__all__ = [
    "QC_FILE",
    "VERDICTS",
    "gland_mask",
    "deformable_part",
    "rigid_metric",
    "gland_overlap",
    "gland_shift",
    "quality_check",
]

QC_FILE = "qc.json"
VERDICTS = ("pass", "warn", "fail")


def gland_mask(path, what: str = "fixed gland") -> tuple[np.ndarray, np.ndarray]:
    """A gland mask (X, Y, Z) bool from a 3-D mask or a 4-D channel-last label (channel 0), and its affine."""
    data, img = read_gland_mask(path, what)
    return data > 0.5, img.affine


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

    def value(m):
        warped = rigid_to_ants(m).apply_to_image(moving, reference=fixed, interpolation="linear").clone("float")
        return float(ants.image_mutual_information(fixed, warped))

    return {"mutual_information": value(rigid), "mutual_information_identity": value(np.eye(4))}


def gland_overlap(moving_gland, fixed_gland, field_mm, affine_ras) -> tuple[float, float]:
    """Dice of a moving and a fixed gland at identity and through a composed field; returns (unregistered, registered).

    ``moving_gland``, ``fixed_gland``: ``(mask (X, Y, Z) bool, nibabel affine)`` on any grids; ``field_mm``:
    composed displacement (X, Y, Z, 3, LPS mm) on the fixed grid ``affine_ras``. Both Dice are computed on the
    fixed grid: the fixed gland sampled there (nearest), the moving gland sampled (linear, >= 0.5, as the
    pipeline's warped labels) at the voxel centres p (identity, physical space) and at ``p + field(p)``.
    """
    points = grid_points(affine_ras, field_mm.shape[:3])
    fixed = sample(fixed_gland[0].astype(np.float32), fixed_gland[1], points, order=0) > 0.5
    moving = moving_gland[0].astype(np.float32)
    return tuple(
        soft_dice(sample(moving, moving_gland[1], p, single=True) >= 0.5, fixed) for p in (points, points + field_mm)
    )


def gland_shift(field_mm, affine_ras, rigid, points_lps) -> float:
    """Length (mm) of the mean displacement ``M(x) - x`` of a map M over LPS mm points x (N, 3): M is the
    displacement field (X, Y, Z, 3, LPS mm, grid ``affine_ras``) sampled linearly inside its grid, and the 4x4
    LPS ``rigid`` alone beyond it (as the pipeline composes: outside the network box only the rigid acts).

    With the inverse composed field (moving grid, moving -> fixed) and the moving gland's voxel centres, this is
    how far the registration moves the gland's centroid; for a translation by t it is ``|t|``.
    """
    points = np.asarray(points_lps, np.float64).reshape(-1, 3)
    index = world_to_voxel(points, affine_ras)
    inside = np.all((index >= -0.5) & (index <= np.asarray(field_mm.shape[:3]) - 0.5), axis=-1)[:, None]
    rigid_part = apply_affine(np.asarray(rigid, np.float64), points) - points
    return float(np.linalg.norm(np.where(inside, sample(field_mm, affine_ras, points), rigid_part).mean(0)))


def _recorded_mask(case_dir: Path, result: dict, which: str):
    """The ``which`` ("moving"/"fixed") gland mask recorded in ``result.json`` (a predicted one lies in the case
    folder), or None when the registration had none."""
    masks = result.get("masks") or {}
    if masks.get(which) is None:
        return None
    predicted = (masks.get("source") or {}).get(f"{which}_mask") == "predicted"
    path = case_dir / Path(masks[which]).name if predicted else Path(masks[which])
    if not path.is_file():
        raise InputError(f"{path}: the {which} gland mask recorded in {case_dir / 'result.json'} is missing")
    return path


def _check(value, rule: str, threshold, severity: str = "warn") -> dict:
    """One check: ``value`` must be ``rule`` (">=" or "<=") ``threshold``; failing it makes the verdict ``severity``."""
    ok = value is not None and (value >= threshold if rule == ">=" else value <= threshold)
    return {"value": value, "rule": rule, "threshold": threshold, "ok": bool(ok), "severity": severity}


def quality_check(
    case_dir,
    fixed_gland=None,
    gland_source: str | None = None,
    min_gland_dice: float = 0.7,
    max_nonpositive_jacobian_pct: float = 0.1,
    max_deformable_mm: float = 30.0,
    min_rigid_mask_dice: float = 0.5,
    max_rigid_mi_increase: float = 0.0,
    max_gland_dice_drop: float | None = 0.02,
    max_gland_shift_mm: float | None = 15.0,
    moving_gland=None,
    overwrite: bool = False,
) -> dict:
    """Compute the quality numbers of a registered case folder, decide pass/warn/fail, write ``qc.json``.

    Args:
        case_dir: a folder written by :meth:`scripts.inference.registrar.Registrar.register`.
        fixed_gland: gland mask on the fixed image's grid (3-D, or 4-D label -> channel 0); ``None``: no
            ``gland_dice``, and ``gland_dice_drop`` uses the fixed mask recorded in ``result.json`` if any.
        gland_source: where that mask came from (recorded: "predicted", "label", a path...).
        min_gland_dice: the warped moving gland must overlap the fixed gland at least this much.
        max_nonpositive_jacobian_pct: at most this % of fixed voxels may fold.
        max_deformable_mm: the deformable part may move no point further than this (mm).
        min_rigid_mask_dice: mask-based rigid: Dice of the aligned masks at least this.
        max_rigid_mi_increase: MI-based rigid: its final metric may exceed the identity's by at most this.
        max_gland_dice_drop: fail when the gland Dice after registration is lower than at identity by more
            than this (0.02: resampling noise of a correct, near-identity registration; ``None``: no check).
        max_gland_shift_mm: fail when the registration moves the gland centroid further than this (mm).
            15 mm: MR and TRUS of μ-RegPro-like data share a world frame up to a few mm; the true maps of
            the phantom move the gland centroid 1.8–7.8 mm (65 ``realistic`` cases,
            ``benchmarks/qc_gland_shift.py``), failed rigid alignments ~20 mm. Images in unrelated
            world frames need a larger value (``None``: no check).
        moving_gland: gland mask or label (channel 0) of the moving image, on its own grid; ``None``: the
            moving mask recorded in ``result.json`` (given to, or predicted by, the pipeline), if any.
    Returns:
        the ``qc.json`` content: ``verdict`` ("pass", "warn" or "fail"), ``reasons`` (one line per failed
        check, those of "fail" checks first), ``checks`` (value, rule, threshold, ok, severity) and ``metrics``.
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
            raise InputError(
                f"{fixed_gland}: fixed gland mask is not on the fixed image's grid ({result['fixed_image']})"
            )
        warped, _ = gland_mask(case_dir / files["warped_label"], "warped label")
        dice = soft_dice(warped, mask)
        checks["gland_dice"] = _check(dice, ">=", min_gland_dice)
    metrics["gland_dice"] = dice
    metrics["gland_source"] = gland_source if dice is not None else None

    # fail checks: the registration lowers the gland overlap, or moves the gland too far
    moving_path = moving_gland if moving_gland is not None else _recorded_mask(case_dir, result, "moving")
    fixed_path = fixed_gland if fixed_gland is not None else _recorded_mask(case_dir, result, "fixed")
    moving = gland_mask(moving_path, "moving gland") if moving_path is not None else None
    unregistered = registered = None
    if moving is not None and fixed_path is not None:
        unregistered, registered = gland_overlap(moving, gland_mask(fixed_path), field, affine)
        if max_gland_dice_drop is not None:
            checks["gland_dice_drop"] = _check(unregistered - registered, "<=", max_gland_dice_drop, "fail")
    used = None if unregistered is None else {"moving": str(moving_path), "fixed": str(fixed_path)}
    metrics.update(unregistered_gland_dice=unregistered, registered_gland_dice=registered, overlap_masks=used)
    if moving is not None and moving[0].any() and "inverse_field" in files:  # the moving gland's voxels, moved
        inverse, inverse_affine = read_field_nifti(case_dir / files["inverse_field"])
        points = apply_affine(lps_affine(moving[1]), np.argwhere(moving[0]))
        shift, shift_from = gland_shift(inverse, inverse_affine, np.linalg.inv(rigid), points), "moving gland"
    else:  # the fixed field of view's centre (a TRUS volume is centred on the gland)
        points = apply_affine(lps_affine(affine), (np.asarray(field.shape[:3]) - 1) / 2)
        shift, shift_from = gland_shift(field, affine, rigid, points), "fixed field-of-view centre"
    if max_gland_shift_mm is not None:
        checks["gland_shift_mm"] = _check(shift, "<=", max_gland_shift_mm, "fail")
    metrics.update(gland_shift_mm=shift, gland_shift_from=shift_from)

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

    # labelled structures that vanished in the warped labels (outside the fixed field of view, or too small)
    if "label_channels_lost" in result:
        lost = result["label_channels_lost"]
        checks["label_channels_lost"] = {**_check(len(lost), "<=", 0), "channels": lost}

    details = {
        "gland_dice_drop": (
            f" (gland Dice {unregistered:.3g} unregistered -> {registered:.3g} registered)"
            if unregistered is not None
            else ""
        ),
        "gland_shift_mm": f" ({shift_from})",
        "label_channels_lost": f" (label channels {result.get('label_channels_lost')} hold a structure in the moving "
        "labels but none after warping: outside the fixed field of view, or too small for the grid; map it as a point)",
    }
    failed = sorted((name for name, c in checks.items() if not c["ok"]), key=lambda n: checks[n]["severity"] != "fail")
    reasons = [
        f"{n} = {checks[n]['value']:.4g}{details.get(n, '')}, needs {checks[n]['rule']} {checks[n]['threshold']}"
        for n in failed
    ]
    severities = {checks[n]["severity"] for n in failed}
    qc = {
        "verdict": "fail" if "fail" in severities else "warn" if severities else "pass",
        "reasons": reasons,
        "checks": checks,
        "metrics": metrics,
        "deformable": result.get("deformable"),
        "direction": result.get("direction"),
    }
    write_json(qc, case_dir / QC_FILE, overwrite)
    return qc
