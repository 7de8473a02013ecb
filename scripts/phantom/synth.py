"""Synthetic MR–TRUS prostate phantom with known ground truth, written in the μ-RegPro layout.

``python -m scripts synth --out DIR --cases N --seed S --size small|full --preset basic|realistic|shifted``
writes, per case, ``<split>/{mr_images,us_images,mr_labels,us_labels}/caseNNNNNN.nii.gz`` plus the ground
truth ``<split>/ddf_mr2us/``, ``<split>/ddf_us2mr/`` (dense displacement fields), ``<split>/truth/*.json``
(with the observer presets also the analytic labels ``<split>/truth/{mr,us}_labels/``) and
``<split>/preview/*.png``. docs/phantom.md documents every frame, unit, channel and preset.

Pipeline of one case (deterministic from (seed, case index)): draw the anatomy (scripts/phantom/anatomy.py)
and the transform phi (scripts/phantom/transform.py); render the MR labels and image at the MR voxels;
pull the TRUS voxels back through phi^-1 and render the TRUS labels and image there
(scripts/phantom/appearance.py); store phi^-1 - id on the TRUS grid and phi - id on the MR grid.
"""

from __future__ import annotations

import copy
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from scripts.data.nifti import InputError, atomic_write, write_json, write_nifti
from scripts.evaluation.metrics import jacobian_determinant
from scripts.phantom.anatomy import N_CHANNELS, Anatomy, AnatomyParams
from scripts.phantom.appearance import MRParams, USParams, render_mr, render_us
from scripts.phantom.transform import PhantomTransform, TransformParams, rotation_matrix
from scripts.spatial.geometry import RAS_LPS_FLIP

__all__ = ["synth", "generate_case", "SIZES", "PRESETS", "Preset", "ObserverParams", "Geometry", "ddf_to_nifti_array"]

SPLITS = ("train", "val", "holdout")


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
SIZES = {"full": Geometry((120, 128, 128), (81, 118, 88), 0.8), "small": Geometry((40, 43, 43), (27, 39, 29), 2.4)}


@dataclass(frozen=True)
class ObserverParams:
    """How the labels written in the μ-RegPro folders differ from the analytic truth (one observer per image).

    Off by default (labels = truth). Each image's labels are drawn from their own random stream, so
    the observer can change without changing any image.
    """

    enabled: bool = False
    boundary_bias_mm: float = 0.6  # std of a per-image gland dilation (+) / erosion (-)
    boundary_wobble_mm: float = 0.8  # amplitude of a smooth boundary wobble
    boundary_wavelength_mm: tuple[float, float] = (15.0, 30.0)
    urethra_bias_mm: float = 0.5  # std of a per-image urethra radius error
    landmark_jitter_mm: float = 0.7  # std, per axis, of each drawn landmark's centre error
    landmark_scale: tuple[float, float] = (0.8, 1.25)  # drawn / true landmark radius
    landmark_miss_probability: float = 0.08  # a landmark left undrawn in one image (its channel empty there)


@dataclass(frozen=True)
class Preset:
    """Every random range of a phantom case: anatomy, transform, MR and TRUS appearance, observer."""

    anatomy: AnatomyParams = field(default_factory=AnatomyParams)
    transform: TransformParams = field(default_factory=TransformParams)
    mr: MRParams = field(default_factory=MRParams)
    us: USParams = field(default_factory=USParams)
    observer: ObserverParams = field(default_factory=ObserverParams)


def _realistic(shifted: bool = False) -> Preset:
    """The ``realistic`` preset (calibrated in docs/phantom.md) or its ``shifted`` variant (a held-out distribution)."""
    sh = shifted
    anatomy = AnatomyParams(
        gland_volume_cc=(50.0, 110.0) if sh else (20.0, 100.0),
        median_lobe_probability=0.6 if sh else 0.35,
        seminal_vesicles=True,
        bph_nodules=(1, 6) if sh else (0, 4),
        lesions=(0, 2),
        cyst_radius_mm=(1.8, 4.5),
        calcification_radius_mm=(1.2, 3.0),
        landmark_elongation=(1.0, 1.6),
    )
    transform = TransformParams(
        rotation_deg=(5.0, 10.0) if sh else (3.0, 8.0),
        translation_mm=(3.0, 7.0) if sh else (2.0, 6.0),
        elastic_centres=10,
        elastic_spread_mm=14.0,
        elastic_sigma_mm=12.0,
        elastic_amplitude_mm=3.0,
        compression_mm=(0.0, 0.0),
        bladder_filling_mm=(0.0, 4.0),
        rectal_filling_mm=(-2.0, 3.0),
        sliding_deg=(1.0, 4.0),
        indentation_mm=(10.0, 18.0) if sh else (5.0, 15.0),
    )
    mr = MRParams(
        intensity=dict(
            MRParams().intensity,
            cyst=(0.60, 1.00),
            seminal_vesicle=(0.70, 0.95),
            bph_nodule=(0.25, 0.60),
            lesion=(0.18, 0.35),
        ),
        texture=dict(MRParams().texture, bph_nodule=0.40),
        noise_sigma=(0.04, 0.08) if sh else (0.02, 0.06),
        slice_thickness_mm=(3.5, 4.5) if sh else (2.5, 4.0),
        coil_gain=(0.3, 1.0),
    )
    us = USParams(
        echogenicity=dict(
            USParams().echogenicity,
            cyst=(0.01, 0.15),
            calcification=(0.9, 2.5),
            seminal_vesicle=(0.15, 0.35),
            bph_nodule=(0.20, 0.60),
            lesion=(0.25, 0.45),
        ),
        capsule_gain=(0.2, 1.2) if sh else (0.3, 2.0),
        capsule_fade=(0.7, 1.0) if sh else (0.5, 1.0),
        gain_db=(-6.0, 6.0) if sh else (-4.0, 4.0),
        tgc_db=3.0,
        reverberation=(0.1, 0.4),
        side_lobe=(0.05, 0.2),
        contact_shadows=(1, 3) if sh else (0, 2),
        noise_floor=0.03 if sh else 0.02,
        dynamic_range_db=(40.0, 55.0) if sh else (45.0, 60.0),
    )
    return Preset(anatomy, transform, mr, us, ObserverParams(enabled=True))


# basic = the original phantom, frozen byte for byte (fast tests); realistic = the benchmark default
PRESETS = {"basic": Preset(), "realistic": _realistic(), "shifted": _realistic(shifted=True)}


def voxel_to_world(affine: np.ndarray, shape) -> np.ndarray:
    """(prod(shape), 3) RAS mm of every voxel centre, C order (x slowest)."""
    m = np.asarray(affine, float)[:3]
    i, j, k = (np.arange(n, dtype=float)[:, None] * m[:, a] for a, n in enumerate(shape))
    return (i[:, None, None] + j[None, :, None] + k[None, None] + m[:, 3]).reshape(-1, 3)


def ddf_to_nifti_array(ddf_ras: np.ndarray, shape) -> np.ndarray:
    """(N, 3) RAS mm displacements -> (X, Y, Z, 1, 3) float32 LPS mm (ITK displacement-field layout)."""
    return (ddf_ras * RAS_LPS_FLIP).reshape(*shape, 1, 3).astype(np.float32)


def _field_jacobian(ddf_lps: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Jacobian determinant (X, Y, Z) of x -> x + u(x) for a stored (X, Y, Z, 1, 3) LPS-mm field on ``affine``'s grid."""
    u = ddf_lps[..., 0, :] * RAS_LPS_FLIP.astype(np.float32)  # back to RAS mm
    return jacobian_determinant(np.moveaxis(u, -1, 0), np.linalg.inv(affine[:3, :3]), np.float32)


def _sample_field(ddf_lps: np.ndarray, affine: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Trilinear RAS-mm displacement at world points (N, 3); also whether each point lies inside the grid."""
    vox = (points - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    shape = np.array(ddf_lps.shape[:3])
    inside = np.all((vox >= 0) & (vox <= shape - 1), axis=1)
    u = np.stack([ndimage.map_coordinates(ddf_lps[..., 0, c], vox.T, order=1, mode="nearest") for c in range(3)], 1)
    return u * RAS_LPS_FLIP, inside


def inverse_consistency(field_a, affine_a, mask_a, field_b, affine_b) -> dict:
    """|p + a(p) + b(p + a(p)) - p| (mm) over the voxels of ``mask_a`` on grid a; max and mean, and how many left grid b."""
    pts = voxel_to_world(affine_a, mask_a.shape)[mask_a.reshape(-1)]
    mid = pts + field_a[..., 0, :].reshape(-1, 3)[mask_a.reshape(-1)] * RAS_LPS_FLIP
    back, inside = _sample_field(field_b, affine_b, mid)
    err = np.linalg.norm(mid + back - pts, axis=1)[inside]
    return {
        "max_mm": round(float(err.max()), 5),
        "mean_mm": round(float(err.mean()), 5),
        "voxels": int(inside.sum()),
        "voxels_leaving_grid": int((~inside).sum()),
    }


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


def _observer_labels(anat: Anatomy, s: dict, anatomy_points, world, shape, rng, p: ObserverParams) -> np.ndarray:
    """One observer's (X, Y, Z, 6) uint8 labels of one image: the truth with a biased, wobbling gland boundary,
    a biased urethra, landmarks drawn off-centre, resized, or missed. ``world``: the image's own voxel
    positions (the wobble is attached to the image); ``anatomy_points``: the same voxels in the anatomy frame."""
    k = rng.normal(size=(6, 3))
    k *= (2 * np.pi / rng.uniform(*p.boundary_wavelength_mm, (6, 1))) / np.linalg.norm(k, axis=1, keepdims=True)
    wobble = np.cos(world @ k.T + rng.uniform(0, 2 * np.pi, 6)).sum(1) / np.sqrt(3)
    gland = s["gland_mm"] - rng.normal(0, p.boundary_bias_mm) - p.boundary_wobble_mm * wobble < 0
    out = np.zeros((len(gland), N_CHANNELS), np.uint8)
    out[:, 0] = gland
    out[:, 1] = gland & (s["urethra"] - rng.normal(0, p.urethra_bias_mm) < 0)
    for i, lm in enumerate(anat.landmarks[: N_CHANNELS - 2]):
        centre = lm["centre"] + rng.normal(0, p.landmark_jitter_mm, 3)
        radii = np.asarray(lm.get("radii", lm["radius"])) * rng.uniform(*p.landmark_scale)
        if rng.random() >= p.landmark_miss_probability:
            out[:, 2 + i] = np.linalg.norm((anatomy_points - centre) / radii, axis=1) < 1
    return out.reshape(*shape, -1)


def _capsule_site(anat: Anatomy, points) -> np.ndarray:
    """(N,) in [0, 1]: 1 towards the apex, the base and the anterior face, where a real TRUS capsule fades."""
    y = (points - anat.gland_centre) / anat.gland_radii
    rho = np.maximum(np.linalg.norm(y, axis=1), 1e-9)
    ramp = lambda v: np.clip(v, 0, 1) ** 2 * (3 - 2 * np.clip(v, 0, 1))  # noqa: E731  smoothstep
    return np.maximum(ramp((np.abs(y[:, 2]) / rho - 0.55) / 0.35), ramp((y[:, 1] / rho - 0.3) / 0.5))


def draw_geometry(seed: int, index: int, size: str, anatomy: AnatomyParams, transform: TransformParams):
    """The geometric part of a case, no images: (rng, anatomy, phi, grids); ``rng`` continues into the rendering.
    ``grids`` = (MR affine, TRUS affine, probe point, probe axis, probe voxel, oblique flag)."""
    geom = SIZES[size]
    rng = np.random.default_rng([int(seed), int(index)])
    anat = Anatomy.random(rng, anatomy)
    grids = _grids(anat, geom, index, rng)
    half = np.array(geom.mr_shape) * geom.spacing / 2 + 40.0  # elastic gradient checked on the MR FOV + margin
    check = np.stack(np.meshgrid(*(np.arange(-h, h + 1e-6, 5.0) for h in half), indexing="ij"), -1).reshape(-1, 3)
    phi = PhantomTransform.random(rng, anat.gland_centre, grids[2], grids[3], check, transform, anat)
    return rng, anat, phi, grids


def render_trus(anat: Anatomy, phi: PhantomTransform, geom: Geometry, us_affine, probe_vox, rng, us: USParams):
    """The TRUS image and analytic labels of ``anat`` seen through ``phi`` (MR world -> TRUS world).

    Returns ``q`` (N, 3) TRUS voxel centres (RAS mm), ``p = phi^-1(q)`` (N, 3 MR world mm), the inverse's
    fixed-point residual (mm), the anatomy samples at ``p``, labels (X, Y, Z, 6) uint8, image (X, Y, Z) float32,
    the fan mask and the appearance record. Draws from ``rng`` (appearance and noise) only in ``render_us``.
    """
    q = voxel_to_world(us_affine, geom.us_shape)
    p, residual = phi.inverse(q, return_residual=True)
    s_us = anat.sample(p)
    us_label = anat.labels(s_us).reshape(*geom.us_shape, -1)
    inv_aff = np.linalg.inv(us_affine)
    lm_vox = [
        (
            lm["kind"],
            inv_aff[:3, :3] @ phi.forward(lm["centre"][None])[0] + inv_aff[:3, 3],
            float(np.mean(lm.get("radii", lm["radius"]))),
        )
        for lm in anat.landmarks
    ]
    us_image, fan, us_info = render_us(
        anat.tissue(s_us),
        s_us["texture"],
        s_us["gland_mm"],
        geom.us_shape,
        geom.spacing,
        probe_vox,
        geom.probe_radius_mm,
        lm_vox,
        rng,
        us,
        capsule_site=_capsule_site(anat, p) if us.capsule_fade[1] > 0 else None,
    )
    return q, p, residual, s_us, us_label, us_image, fan, us_info


def generate_case(
    seed: int,
    index: int,
    size: str = "small",
    anatomy: AnatomyParams | None = None,
    transform: TransformParams | None = None,
    mr: MRParams | None = None,
    us: USParams | None = None,
    preset: str = "basic",
) -> dict:
    """Build one case in memory (no files). Deterministic from (seed, index, preset).

    ``preset`` picks every range (:data:`PRESETS`); ``anatomy``/``transform``/``mr``/``us`` replace its parts.
    With an observer preset, ``mr_label``/``us_label`` are the observer's and ``mr_true_label``/``us_true_label``
    the analytic truth.

    Returns a dict with ``mr_image``/``us_image`` (X, Y, Z) float32, ``mr_label``/``us_label`` (X, Y, Z, 6) uint8,
    ``ddf_mr2us`` (TRUS grid) / ``ddf_us2mr`` (MR grid) as (X, Y, Z, 1, 3) float32 LPS mm, ``mr_affine``/``us_affine``
    (4, 4) RAS, ``truth`` (JSON-ready dict) and ``anatomy``/``transform`` objects.
    """
    if size not in SIZES:
        raise InputError(f"size={size!r}: expected one of {sorted(SIZES)}")
    if preset not in PRESETS:
        raise InputError(f"preset={preset!r}: expected one of {sorted(PRESETS)}")
    pre = PRESETS[preset]
    anatomy, transform, mr, us = (
        given if given is not None else default
        for given, default in ((anatomy, pre.anatomy), (transform, pre.transform), (mr, pre.mr), (us, pre.us))
    )
    geom = SIZES[size]
    rng, anat, phi, (mr_affine, us_affine, probe_point, probe_axis, probe_vox, oblique) = draw_geometry(
        seed, index, size, anatomy, transform
    )
    sp = geom.spacing

    # MR: anatomy evaluated directly at the MR voxels (MR world = anatomy frame)
    x_mr = voxel_to_world(mr_affine, geom.mr_shape)
    s_mr = anat.sample(x_mr)
    mr_label = anat.labels(s_mr).reshape(*geom.mr_shape, -1)
    mr_image, mr_info = render_mr(
        anat.tissue(s_mr), s_mr["texture"], x_mr, geom.mr_shape, rng, mr, rectum_mm=s_mr["rectum"], spacing=sp
    )
    ddf_us2mr = ddf_to_nifti_array(phi.forward(x_mr) - x_mr, geom.mr_shape)

    # TRUS: voxels pulled back into the MR world through phi^-1, anatomy evaluated there
    trus_rng_state = copy.deepcopy(rng.bit_generator.state)  # a sequence renders its later frames from here
    q, p, residual, s_us, us_label, us_image, fan, us_info = render_trus(anat, phi, geom, us_affine, probe_vox, rng, us)
    ddf_mr2us = ddf_to_nifti_array(p - q, geom.us_shape)

    jac = {
        "mr2us": float(_field_jacobian(ddf_mr2us, us_affine).min()),
        "us2mr": float(_field_jacobian(ddf_us2mr, mr_affine).min()),
    }
    landmarks = []
    for i, lm in enumerate(anat.landmarks):
        landmarks.append(
            {
                "channel": 2 + i if i < 4 else None,
                "kind": lm["kind"],
                "radius_mm": round(lm["radius"], 4),
                "mr_centre_ras_mm": np.round(lm["centre"], 5).tolist(),
                "us_centre_ras_mm": np.round(phi.forward(lm["centre"][None])[0], 5).tolist(),
            }
        )
    truth = {
        "seed": int(seed),
        "index": int(index),
        "size": size,
        "frames": "RAS mm; MR world = the anatomy frame; TRUS world = phi(MR world); see docs/phantom.md",
        "channels": {
            "0": "gland",
            "1": "urethra (inside the gland)",
            **{
                str(c): (
                    f"landmark {c - 2}: {anat.landmarks[c - 2]['kind']}" if c - 2 < len(anat.landmarks) else "empty"
                )
                for c in range(2, 6)
            },
        },
        "landmarks": landmarks,
        "gland_centre_mr_ras_mm": np.round(anat.gland_centre, 5).tolist(),
        "gland_centre_us_ras_mm": np.round(phi.forward(anat.gland_centre[None])[0], 5).tolist(),
        **phi.describe(),
        "trus_oblique": oblique,
        "trus_direction": (us_affine[:3, :3] / sp).round(8).tolist(),
        "probe_axis_voxel": probe_vox[:2].round(4).tolist(),
        "inverse_fixed_point_residual_mm": residual,
        "inverse_consistency": {
            "mr2us_then_us2mr_in_us_gland": inverse_consistency(
                ddf_mr2us, us_affine, us_label[..., 0] > 0, ddf_us2mr, mr_affine
            ),
            "us2mr_then_mr2us_in_mr_gland": inverse_consistency(
                ddf_us2mr, mr_affine, mr_label[..., 0] > 0, ddf_mr2us, us_affine
            ),
            "note": "stored float32 fields composed with trilinear interpolation, mm",
        },
        "jacobian_determinant_min": jac,
        "gland_in_trus_fan_fraction": round(float(fan[us_label[..., 0] > 0].mean()), 4),
        "appearance": {"mr": mr_info, "us": us_info},
    }
    case = {
        "mr_image": mr_image,
        "us_image": us_image,
        "mr_label": mr_label,
        "us_label": us_label,
        "ddf_mr2us": ddf_mr2us,
        "ddf_us2mr": ddf_us2mr,
        "mr_affine": mr_affine,
        "us_affine": us_affine,
        "truth": truth,
        "anatomy": anat,
        "transform": phi,
        "trus_rng_state": trus_rng_state,
        "probe_voxel": probe_vox,
    }
    if preset != "basic":  # extras only here: the basic output stays byte-identical to the original phantom
        _add_realistic_truth(case, preset, pre.observer, anat, s_mr, x_mr, s_us, p, q, geom, seed, index)
    return case


def _add_realistic_truth(case, preset, observer, anat, s_mr, x_mr, s_us, p, q, geom, seed, index) -> None:
    """Observer labels (the analytic ones kept as ``*_true_label``), ideal-fit residuals and anatomy facts."""
    from scripts.phantom.fit import ideal_fits

    truth = case["truth"]
    if observer.enabled:
        for mod, s, anatomy_points, world, shape, stream in (
            ("mr", s_mr, x_mr, x_mr, geom.mr_shape, 1),
            ("us", s_us, p, q, geom.us_shape, 2),
        ):
            case[f"{mod}_true_label"] = case[f"{mod}_label"]
            orng = np.random.default_rng([int(seed), int(index), stream])
            case[f"{mod}_label"] = _observer_labels(anat, s, anatomy_points, world, shape, orng, observer)
        agree = {
            mod: [
                float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))
                for a, b in (
                    (case[f"{mod}_label"][..., c] > 0, case[f"{mod}_true_label"][..., c] > 0) for c in range(N_CHANNELS)
                )
            ]
            for mod in ("mr", "us")
        }
        truth["observer"] = {
            "labels": "the label folders hold one simulated observer's labels per image; the "
            "analytic labels are in truth/mr_labels and truth/us_labels",
            "dice_vs_truth_per_channel": {m: np.round(v, 4).tolist() for m, v in agree.items()},
            "params": vars(observer),
        }
    fits = {d: ideal_fits(case, d) for d in ("mr2us", "us2mr")}
    truth["ideal_fits"] = {
        d: {
            "landmark_error_mm": {k: np.round(v, 4).tolist() for k, v in f["landmark_error_mm"].items()},
            "rigid_moving_to_fixed_ras": f["rigid"].round(8).tolist(),
            "affine_moving_to_fixed_ras": f["affine"].round(8).tolist(),
        }
        for d, f in fits.items()
    }
    truth["preset"] = preset
    truth["gland_volume_cc"] = round(
        float(case.get("mr_true_label", case["mr_label"])[..., 0].sum() * geom.spacing**3 / 1000), 3
    )
    truth["median_lobe"] = round(anat.median_lobe, 4)
    truth["appearance_only"] = {name: len(v) for name, v in anat.ellipsoids.items()}
    jac = _field_jacobian(case["ddf_us2mr"], case["mr_affine"])[case.get("mr_true_label", case["mr_label"])[..., 0] > 0]
    truth["jacobian_determinant_in_mr_gland"] = {
        "mean": round(float(jac.mean()), 4),
        "p5": round(float(np.percentile(jac, 5)), 4),
        "p95": round(float(np.percentile(jac, 95)), 4),
    }


def split_counts(cases: int, fractions) -> list[int]:
    """Cases per split (train, val, holdout): largest remainders, and at least one in each split of a
    non-zero fraction when cases >= 3 (``"0,0,1"``: every case in holdout)."""
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
        for s in np.where((n == 0) & (f > 0))[0]:
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
    for mod in ("mr", "us"):
        if f"{mod}_true_label" in case:
            write_nifti(case[f"{mod}_true_label"], case[f"{mod}_affine"], d / "truth" / f"{mod}_labels" / f, overwrite)
    write_json({"case": name, "split": split, **case["truth"]}, d / "truth" / f"{name}.json", overwrite)
    if preview:
        from scripts.phantom.preview import save_preview  # matplotlib only when previews are wanted

        t = case["truth"]
        centre = [
            np.linalg.solve(case[a][:3, :3], np.asarray(t[k]) - case[a][:3, 3])
            for a, k in (("mr_affine", "gland_centre_mr_ras_mm"), ("us_affine", "gland_centre_us_ras_mm"))
        ]
        atomic_write(
            d / "preview" / f"{name}.png",
            lambda tmp: save_preview(
                tmp,
                case["mr_image"],
                case["mr_label"],
                centre[0],
                case["us_image"],
                case["us_label"],
                centre[1],
                f"{split}/{name} seed {t['seed']}, preset {t.get('preset', 'basic')}",
                case.get("mr_true_label"),
                case.get("us_true_label"),
            ),
            overwrite,
        )


def _share_cores(jobs: int) -> None:
    """Worker start: BLAS threads limited to this worker's share of the cores. OpenBLAS helper threads spin
    after each product; with one worker per core they would take cycles from the other workers. The results do
    not depend on it (the products split their output, not their sums; tests/test_phantom_realistic.py compares
    ``jobs`` 1 and 2 byte for byte)."""
    from threadpoolctl import threadpool_limits

    global _BLAS_LIMIT
    _BLAS_LIMIT = threadpool_limits(max(1, (os.cpu_count() or 1) // jobs), user_api="blas")


def _write_one(args) -> str:
    seed, index, size, preset, root, split, overwrite, preview, sequence = args
    name = f"case{index:06d}"
    if sequence:
        from scripts.phantom.sequence import generate_sequence, write_sequence

        case = generate_sequence(seed, index, sequence, size, preset)
        write_sequence(case, root, split, name, overwrite)
    else:
        case = generate_case(seed, index, size, preset=preset)
    write_case(case, root, split, name, overwrite, preview)
    return f"{split}/{name} written" + (f" ({sequence} frames)" if sequence else "")


def synth(
    out: str,
    cases: int = 8,
    seed: int = 0,
    size: str = "small",
    splits="0.7,0.15,0.15",
    overwrite: bool = False,
    preview: bool = True,
    preset: str = "basic",
    jobs: int = 1,
    sequence: int = 0,
) -> str:
    """Generate ``cases`` synthetic MR–TRUS pairs with ground truth into ``out`` (μ-RegPro layout).

    Args:
        out: output folder; must be empty or absent unless ``overwrite``.
        cases: number of cases, numbered case000000.. across train, then val, then holdout.
        seed: random seed; case i depends only on (seed, i).
        size: "full" (MR 120×128×128, TRUS 81×118×88, 0.8 mm) or "small" (MR 40×43×43, TRUS 27×39×29, 2.4 mm).
        splits: fractions for train, val, holdout ("0.7,0.15,0.15"); each split of a non-zero fraction gets a
            case when cases >= 3 ("0,0,1": all in holdout).
        overwrite: allow writing into a non-empty folder, replacing files of the same name.
        preview: also write ``<split>/preview/caseNNNNNN.png``.
        preset: "basic" (the original phantom, fast tests), "realistic" (the benchmark default: probe indentation,
            sliding, faint capsule, thick-slice MR, observer labels) or "shifted" (a harder held-out distribution).
        jobs: cases generated in parallel processes (the output does not depend on it).
        sequence: when >= 2, also write each case's TRUS as a sequence of this many frames under breathing and
            probe motion (scripts/phantom/sequence.py; frame 0 is the static case). 0: static pairs only.
    Returns:
        the output folder.
    """
    cases = int(cases)
    if cases < 1:
        raise InputError(f"cases={cases}: expected at least 1")
    if size not in SIZES:
        raise InputError(f"size={size!r}: expected one of {sorted(SIZES)}")
    if preset not in PRESETS:
        raise InputError(f"preset={preset!r}: expected one of {sorted(PRESETS)}")
    sequence = int(sequence)
    if sequence == 1 or sequence < 0:
        raise InputError(f"sequence={sequence}: a sequence needs at least 2 frames (0: no sequences)")
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise InputError(f"{root}: output path exists and is not a folder")
    if root.is_dir() and any(root.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{root}: output folder is not empty; pass overwrite=True (CLI: --overwrite) to write into it"
        )
    counts = split_counts(cases, splits)
    names = [s for s, n in zip(SPLITS, counts) for _ in range(n)]
    work = [(seed, i, size, preset, root, split, overwrite, preview, sequence) for i, split in enumerate(names)]
    if int(jobs) > 1:
        with ProcessPoolExecutor(int(jobs), initializer=_share_cores, initargs=(int(jobs),)) as pool:
            for line in pool.map(_write_one, work):
                print(line, flush=True)
    else:
        for item in work:
            print(_write_one(item), flush=True)
    write_json(
        {
            "generator": "scripts/phantom/synth.py",
            "seed": int(seed),
            "cases": cases,
            "size": size,
            **({"preset": preset} if preset != "basic" else {}),
            **({"sequence_frames": sequence} if sequence else {}),
            "splits": dict(zip(SPLITS, counts)),
            "spacing_mm": SIZES[size].spacing,
            "mr_shape": list(SIZES[size].mr_shape),
            "us_shape": list(SIZES[size].us_shape),
        },
        root / "phantom.json",
        overwrite,
    )
    return os.fspath(root)
