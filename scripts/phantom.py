"""Synthetic MR–TRUS prostate phantom with known ground truth, written in the μ-RegPro layout.

``python -m scripts synth --out DIR --cases N --seed S --size small|full`` writes, per case,
``<split>/{mr_images,us_images,mr_labels,us_labels}/caseNNNNNN.nii.gz`` plus the ground truth
``<split>/ddf_mr2us/``, ``<split>/ddf_us2mr/`` (dense displacement fields), ``<split>/truth/*.json``
and ``<split>/preview/*.png``. docs/phantom.md documents every frame, unit and channel.

Pipeline of one case (deterministic from (seed, case index)): draw the anatomy (scripts/phantom_anatomy.py)
and the transform phi (scripts/phantom_transform.py); render the MR labels and image at the MR voxels;
pull the TRUS voxels back through phi^-1 and render the TRUS labels and image there
(scripts/phantom_appearance.py); store phi^-1 - id on the TRUS grid and phi - id on the MR grid.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from scripts.io import InputError, atomic_write, write_json, write_nifti
from scripts.phantom_anatomy import Anatomy, AnatomyParams
from scripts.phantom_appearance import MRParams, USParams, render_mr, render_us
from scripts.phantom_transform import PhantomTransform, TransformParams, rotation_matrix

__all__ = ["synth", "generate_case", "SIZES", "Geometry", "RAS_TO_LPS", "ddf_to_nifti_array", "jacobian_determinant"]

SPLITS = ("train", "val", "holdout")
RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])  # x_LPS = diag(-1, -1, 1) x_RAS (same for displacement vectors)


@dataclass(frozen=True)
class Geometry:
    """Image grids of one size: shapes (voxels) and isotropic spacing (mm)."""

    mr_shape: tuple[int, int, int]
    us_shape: tuple[int, int, int]
    spacing: float
    probe_radius_mm: float = 10.0  # the probe axis lies this far behind the first TRUS depth plane
    oblique_every: int = 3  # cases with index % oblique_every == oblique_every - 1 get an oblique TRUS grid
    oblique_roll_deg: tuple[float, float] = (6.0, 12.0)  # TRUS grid rotation about the probe axis
    oblique_tilt_deg: tuple[float, float] = (2.0, 5.0)  # and tilt of the probe axis about the R-L axis


# full = μ-RegPro grids; small = the same fields of view at 3× the spacing (for tests and demos)
SIZES = {
    "full": Geometry((120, 128, 128), (81, 118, 88), 0.8),
    "small": Geometry((40, 43, 43), (27, 39, 29), 2.4),
}


def voxel_to_world(affine: np.ndarray, shape) -> np.ndarray:
    """(prod(shape), 3) RAS mm of every voxel centre, C order (x slowest)."""
    m = np.asarray(affine, float)[:3]
    i, j, k = (np.arange(n, dtype=float)[:, None] * m[:, a] for a, n in enumerate(shape))
    return (i[:, None, None] + j[None, :, None] + k[None, None] + m[:, 3]).reshape(-1, 3)


def ddf_to_nifti_array(ddf_ras: np.ndarray, shape) -> np.ndarray:
    """(N, 3) RAS mm displacements -> (X, Y, Z, 1, 3) float32 LPS mm (ITK displacement-field layout)."""
    return (ddf_ras * RAS_TO_LPS).reshape(*shape, 1, 3).astype(np.float32)


def jacobian_determinant(ddf_lps: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Jacobian determinant (X, Y, Z) of x -> x + u(x) for a stored (X, Y, Z, 1, 3) LPS-mm field on ``affine``'s grid."""
    u = ddf_lps[..., 0, :] * RAS_TO_LPS.astype(np.float32)  # back to RAS mm
    grad_vox = np.stack([np.stack(np.gradient(u[..., c]), -1) for c in range(3)], -2)  # (X, Y, Z, 3 comp, 3 axis)
    j = grad_vox @ np.linalg.inv(affine[:3, :3]).astype(np.float32) + np.eye(3, dtype=np.float32)
    return (j[..., 0, 0] * (j[..., 1, 1] * j[..., 2, 2] - j[..., 1, 2] * j[..., 2, 1])
            - j[..., 0, 1] * (j[..., 1, 0] * j[..., 2, 2] - j[..., 1, 2] * j[..., 2, 0])
            + j[..., 0, 2] * (j[..., 1, 0] * j[..., 2, 1] - j[..., 1, 1] * j[..., 2, 0]))


def _sample_field(ddf_lps: np.ndarray, affine: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Trilinear RAS-mm displacement at world points (N, 3); also whether each point lies inside the grid."""
    vox = (points - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    shape = np.array(ddf_lps.shape[:3])
    inside = np.all((vox >= 0) & (vox <= shape - 1), axis=1)
    u = np.stack([ndimage.map_coordinates(ddf_lps[..., 0, c], vox.T, order=1, mode="nearest") for c in range(3)], 1)
    return u * RAS_TO_LPS, inside


def inverse_consistency(field_a, affine_a, mask_a, field_b, affine_b) -> dict:
    """|p + a(p) + b(p + a(p)) - p| (mm) over the voxels of ``mask_a`` on grid a; max and mean, and how many left grid b."""
    pts = voxel_to_world(affine_a, mask_a.shape)[mask_a.reshape(-1)]
    mid = pts + field_a[..., 0, :].reshape(-1, 3)[mask_a.reshape(-1)] * RAS_TO_LPS
    back, inside = _sample_field(field_b, affine_b, mid)
    err = np.linalg.norm(mid + back - pts, axis=1)[inside]
    return {"max_mm": round(float(err.max()), 5), "mean_mm": round(float(err.mean()), 5),
            "voxels": int(inside.sum()), "voxels_leaving_grid": int((~inside).sum())}


def _grids(anat: Anatomy, geom: Geometry, index: int, rng):
    """MR affine (centred on the world origin) and TRUS affine (probe axis in the rectum, fan facing anterior)."""
    sp = geom.spacing
    mr_affine = np.diag([sp, sp, sp, 1.0])
    mr_affine[:3, 3] = -(np.array(geom.mr_shape) - 1) / 2 * sp
    probe_point = np.array([anat.rectum_xy[0], anat.rectum_xy[1], anat.gland_centre[2]])
    # TRUS voxel axes: i = depth (anterior), j = lateral (towards the left), k = superior; right-handed
    m = np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]]) * sp
    probe_vox = np.array([-geom.probe_radius_mm / sp, (geom.us_shape[1] - 1) / 2, (geom.us_shape[2] - 1) / 2])
    oblique = index % geom.oblique_every == geom.oblique_every - 1
    rot = np.eye(3)
    if oblique:
        roll = np.deg2rad(rng.uniform(*geom.oblique_roll_deg) * rng.choice([-1, 1]))
        tilt = np.deg2rad(rng.uniform(*geom.oblique_tilt_deg) * rng.choice([-1, 1]))
        rot = rotation_matrix([1, 0, 0], tilt) @ rotation_matrix([0, 0, 1], roll)
    us_affine = np.eye(4)
    us_affine[:3, :3] = rot @ m
    us_affine[:3, 3] = probe_point - us_affine[:3, :3] @ probe_vox
    return mr_affine, us_affine, probe_point, rot @ np.array([0.0, 0, 1]), probe_vox, bool(oblique)


def generate_case(seed: int, index: int, size: str = "small", anatomy: AnatomyParams = AnatomyParams(),
                  transform: TransformParams = TransformParams(), mr: MRParams = MRParams(),
                  us: USParams = USParams()) -> dict:
    """Build one case in memory (no files). Deterministic from (seed, index).

    Returns a dict with ``mr_image``/``us_image`` (X, Y, Z) float32, ``mr_label``/``us_label`` (X, Y, Z, 6) uint8,
    ``ddf_mr2us`` (TRUS grid) / ``ddf_us2mr`` (MR grid) as (X, Y, Z, 1, 3) float32 LPS mm, ``mr_affine``/``us_affine``
    (4, 4) RAS, ``truth`` (JSON-ready dict) and ``anatomy``/``transform`` objects.
    """
    if size not in SIZES:
        raise InputError(f"size={size!r}: expected one of {sorted(SIZES)}")
    geom = SIZES[size]
    rng = np.random.default_rng([int(seed), int(index)])
    anat = Anatomy.random(rng, anatomy)
    mr_affine, us_affine, probe_point, probe_axis, probe_vox, oblique = _grids(anat, geom, index, rng)
    sp = geom.spacing
    half = np.array(geom.mr_shape) * sp / 2 + 40.0  # elastic gradient checked on the MR field of view + margin
    check = np.stack(np.meshgrid(*(np.arange(-h, h + 1e-6, 5.0) for h in half), indexing="ij"), -1).reshape(-1, 3)
    phi = PhantomTransform.random(rng, anat.gland_centre, probe_point, probe_axis, check, transform)

    # MR: anatomy evaluated directly at the MR voxels (MR world = anatomy frame)
    x_mr = voxel_to_world(mr_affine, geom.mr_shape)
    s_mr = anat.sample(x_mr)
    mr_label = anat.labels(s_mr).reshape(*geom.mr_shape, -1)
    mr_image, mr_info = render_mr(anat.tissue(s_mr), s_mr["texture"], x_mr, geom.mr_shape, rng, mr)
    ddf_us2mr = ddf_to_nifti_array(phi.forward(x_mr) - x_mr, geom.mr_shape)

    # TRUS: voxels pulled back into the MR world through phi^-1, anatomy evaluated there
    q = voxel_to_world(us_affine, geom.us_shape)
    p, residual = phi.inverse(q, return_residual=True)
    s_us = anat.sample(p)
    us_label = anat.labels(s_us).reshape(*geom.us_shape, -1)
    inv_aff = np.linalg.inv(us_affine)
    lm_vox = [(lm["kind"], inv_aff[:3, :3] @ phi.forward(lm["centre"][None])[0] + inv_aff[:3, 3], lm["radius"])
              for lm in anat.landmarks]
    us_image, fan, us_info = render_us(anat.tissue(s_us), s_us["texture"], s_us["gland_mm"], geom.us_shape, sp,
                                       probe_vox, geom.probe_radius_mm, lm_vox, rng, us)
    ddf_mr2us = ddf_to_nifti_array(p - q, geom.us_shape)

    jac = {"mr2us": float(jacobian_determinant(ddf_mr2us, us_affine).min()),
           "us2mr": float(jacobian_determinant(ddf_us2mr, mr_affine).min())}
    landmarks = []
    for i, lm in enumerate(anat.landmarks):
        landmarks.append({
            "channel": 2 + i if i < 4 else None, "kind": lm["kind"], "radius_mm": round(lm["radius"], 4),
            "mr_centre_ras_mm": np.round(lm["centre"], 5).tolist(),
            "us_centre_ras_mm": np.round(phi.forward(lm["centre"][None])[0], 5).tolist()})
    truth = {
        "seed": int(seed), "index": int(index), "size": size,
        "frames": "RAS mm; MR world = the anatomy frame; TRUS world = phi(MR world); see docs/phantom.md",
        "channels": {"0": "gland", "1": "urethra (inside the gland)",
                     **{str(c): (f"landmark {c - 2}: {anat.landmarks[c - 2]['kind']}" if c - 2 < len(anat.landmarks)
                                 else "empty") for c in range(2, 6)}},
        "landmarks": landmarks,
        "gland_centre_mr_ras_mm": np.round(anat.gland_centre, 5).tolist(),
        "gland_centre_us_ras_mm": np.round(phi.forward(anat.gland_centre[None])[0], 5).tolist(),
        **phi.describe(),
        "trus_oblique": oblique,
        "trus_direction": (us_affine[:3, :3] / sp).round(8).tolist(),
        "probe_axis_voxel": probe_vox[:2].round(4).tolist(),
        "inverse_fixed_point_residual_mm": residual,
        "inverse_consistency": {
            "mr2us_then_us2mr_in_us_gland": inverse_consistency(ddf_mr2us, us_affine, us_label[..., 0] > 0,
                                                               ddf_us2mr, mr_affine),
            "us2mr_then_mr2us_in_mr_gland": inverse_consistency(ddf_us2mr, mr_affine, mr_label[..., 0] > 0,
                                                               ddf_mr2us, us_affine),
            "note": "stored float32 fields composed with trilinear interpolation, mm"},
        "jacobian_determinant_min": jac,
        "gland_in_trus_fan_fraction": round(float(fan[us_label[..., 0] > 0].mean()), 4),
        "appearance": {"mr": mr_info, "us": us_info},
    }
    return {"mr_image": mr_image, "us_image": us_image, "mr_label": mr_label, "us_label": us_label,
            "ddf_mr2us": ddf_mr2us, "ddf_us2mr": ddf_us2mr, "mr_affine": mr_affine, "us_affine": us_affine,
            "truth": truth, "anatomy": anat, "transform": phi}


def split_counts(cases: int, fractions) -> list[int]:
    """Cases per split (train, val, holdout): largest remainders, and at least one each when cases >= 3."""
    if isinstance(fractions, str):
        fractions = fractions.split(",")
    try:
        f = np.array([float(v) for v in fractions])
    except (TypeError, ValueError):
        raise InputError(f"splits={fractions!r}: expected three comma-separated fractions") from None
    if f.shape != (3,) or (f < 0).any() or f.sum() <= 0:
        raise InputError(f"splits={fractions!r}: expected three non-negative fractions with a positive sum")
    raw = cases * f / f.sum()
    n = np.floor(raw).astype(int)
    n[np.argsort(-(raw - n), kind="stable")[: cases - n.sum()]] += 1
    if cases >= 3:
        for s in np.where(n == 0)[0]:
            n[s] += 1
            n[np.argmax(n)] -= 1
    return n.tolist()


def write_case(case: dict, root: Path, split: str, name: str, overwrite: bool = False, preview: bool = True) -> None:
    """Write one generated case into ``root/split`` (images, labels, fields, truth JSON, preview PNG)."""
    d = Path(root) / split
    f = f"{name}.nii.gz"
    write_nifti(case["mr_image"], case["mr_affine"], d / "mr_images" / f, overwrite)
    write_nifti(case["us_image"], case["us_affine"], d / "us_images" / f, overwrite)
    write_nifti(case["mr_label"], case["mr_affine"], d / "mr_labels" / f, overwrite)
    write_nifti(case["us_label"], case["us_affine"], d / "us_labels" / f, overwrite)
    write_nifti(case["ddf_mr2us"], case["us_affine"], d / "ddf_mr2us" / f, overwrite, intent="vector")
    write_nifti(case["ddf_us2mr"], case["mr_affine"], d / "ddf_us2mr" / f, overwrite, intent="vector")
    write_json({"case": name, "split": split, **case["truth"]}, d / "truth" / f"{name}.json", overwrite)
    if preview:
        from scripts.phantom_preview import save_preview  # matplotlib only when previews are wanted

        t = case["truth"]
        centre = [np.linalg.solve(case[a][:3, :3], np.asarray(t[k]) - case[a][:3, 3])
                  for a, k in (("mr_affine", "gland_centre_mr_ras_mm"), ("us_affine", "gland_centre_us_ras_mm"))]
        atomic_write(d / "preview" / f"{name}.png",
                     lambda tmp: save_preview(tmp, case["mr_image"], case["mr_label"], centre[0], case["us_image"],
                                              case["us_label"], centre[1], f"{split}/{name} seed {t['seed']}"),
                     overwrite)


def synth(out: str, cases: int = 8, seed: int = 0, size: str = "small", splits="0.7,0.15,0.15",
          overwrite: bool = False, preview: bool = True) -> str:
    """Generate ``cases`` synthetic MR–TRUS pairs with ground truth into ``out`` (μ-RegPro layout).

    Args:
        out: output folder; must be empty or absent unless ``overwrite``.
        cases: number of cases, numbered case000000.. across train, then val, then holdout.
        seed: random seed; case i depends only on (seed, i).
        size: "full" (MR 120×128×128, TRUS 81×118×88, 0.8 mm) or "small" (MR 40×43×43, TRUS 27×39×29, 2.4 mm).
        splits: fractions for train, val, holdout ("0.7,0.15,0.15"); each split gets a case when cases >= 3.
        overwrite: allow writing into a non-empty folder, replacing files of the same name.
        preview: also write ``<split>/preview/caseNNNNNN.png``.
    Returns:
        the output folder.
    """
    cases = int(cases)
    if cases < 1:
        raise InputError(f"cases={cases}: expected at least 1")
    if size not in SIZES:
        raise InputError(f"size={size!r}: expected one of {sorted(SIZES)}")
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise InputError(f"{root}: output path exists and is not a folder")
    if root.is_dir() and any(root.iterdir()) and not overwrite:
        raise FileExistsError(f"{root}: output folder is not empty; pass overwrite=True (CLI: --overwrite) to write into it")
    counts = split_counts(cases, splits)
    names = [s for s, n in zip(SPLITS, counts) for _ in range(n)]
    for index, split in enumerate(names):
        write_case(generate_case(seed, index, size), root, split, f"case{index:06d}", overwrite, preview)
        print(f"{split}/case{index:06d} written", flush=True)
    write_json({"generator": "scripts/phantom.py", "seed": int(seed), "cases": cases, "size": size,
                "splits": dict(zip(SPLITS, counts)), "spacing_mm": SIZES[size].spacing,
                "mr_shape": list(SIZES[size].mr_shape), "us_shape": list(SIZES[size].us_shape)},
               root / "phantom.json", overwrite)
    return os.fspath(root)
