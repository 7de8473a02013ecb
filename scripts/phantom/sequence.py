"""A live TRUS sequence of one phantom case: the MR static, the gland moving with breathing and the probe.

``python -m scripts synth --sequence T ...`` writes, besides the static μ-RegPro files of frame 0, per case
(docs/phantom.md, "Sequences"):

- ``<split>/us_sequences/caseNNNNNN.nii.gz``: (X, Y, Z, T) TRUS frames, pixdim[4] = the frame interval (s);
- ``<split>/us_sequence_labels/``: (X, Y, Z, T, 6) analytic labels per frame (channel order of ``us_labels``);
- ``<split>/ddf_mr2us_sequences/``: (X, Y, Z, T, 3) true field per frame on the TRUS grid (LPS mm, as ``ddf_mr2us``);
- ``<split>/ddf_us2mr_sequences/``: (X, Y, Z, T, 3) its inverse per frame on the MR grid;
- ``truth/caseNNNNNN.json`` gains ``sequence``: the motion drawn and, per frame, landmark and gland centres
  (TRUS world, RAS mm), the motion size and the inverse's residual.

Frame ``t`` uses ``phi_t``: the case's ``phi`` (frame 0 is the static case, byte for byte) with, in the rigid
stage, a breathing translation ``A (1 - cos(2π t Δ / period + φ)) / 2`` minus its frame-0 value along a mostly
superior (and anterior) direction, plus a slow probe drift (smoothstep over the sequence), and, in the probe
stages, the push eased off by ``1 - s sin²(π t Δ / period_p)`` (never above the static push, so every stage
stays invertible). Each frame's TRUS is rendered from the same random state as frame 0: the same appearance and
noise field, the anatomy moved. The time dependence is our choice, not measured data (docs/phantom.md).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scripts.data.nifti import write_nifti
from scripts.phantom.anatomy import Anatomy
from scripts.phantom.synth import (
    PRESETS,
    SIZES,
    Geometry,
    ddf_to_nifti_array,
    generate_case,
    render_trus,
    voxel_to_world,
)
from scripts.phantom.transform import PhantomTransform

# sequence folder -> the frame view's folder (write_frames): what registering MR -> TRUS frames needs
FRAME_VIEW = {"us_sequences": "us_images", "us_sequence_labels": "us_labels", "ddf_mr2us_sequences": "ddf_mr2us"}

__all__ = ["MotionParams", "Motion", "generate_sequence", "write_sequence", "frame_motion_mm", "write_frames"]


@dataclass(frozen=True)
class MotionParams:
    """Ranges of one sequence's motion (mm, s); one value per case drawn uniformly from each range."""

    frame_interval_s: float = 0.5
    breathing_period_s: tuple[float, float] = (3.0, 5.0)
    breathing_amplitude_mm: tuple[float, float] = (1.5, 6.0)  # peak-to-peak gland excursion with breathing
    breathing_tilt_deg: float = 25.0  # the breathing direction leaves the superior axis by up to this
    probe_drift_mm: tuple[float, float] = (0.5, 2.5)  # probe position drift over the whole sequence
    pressure_period_s: tuple[float, float] = (4.0, 8.0)
    pressure_release: tuple[float, float] = (0.2, 0.6)  # s: largest fraction of the push eased off


@dataclass(frozen=True)
class Motion:
    """One drawn motion: ``transform(phi, t)`` gives frame ``t``'s ``phi_t``."""

    frame_interval_s: float
    breathing_direction: np.ndarray  # (3,) RAS unit
    breathing_amplitude_mm: float
    breathing_period_s: float
    breathing_phase: float
    drift_mm: np.ndarray  # (3,) RAS, the drift reached at the last frame
    pressure_period_s: float
    pressure_release: float
    frames: int

    @classmethod
    def random(cls, rng: np.random.Generator, frames: int, p: MotionParams = MotionParams()) -> "Motion":  # noqa: B008
        tilt = np.deg2rad(rng.uniform(0, p.breathing_tilt_deg))
        azimuth = rng.uniform(-np.pi / 2, np.pi / 2)  # towards anterior rather than posterior
        direction = np.array([np.sin(tilt) * np.sin(azimuth), np.sin(tilt) * np.cos(azimuth), np.cos(tilt)])
        drift = rng.normal(size=3)
        drift *= rng.uniform(*p.probe_drift_mm) / np.linalg.norm(drift)
        return cls(
            frame_interval_s=float(p.frame_interval_s),
            breathing_direction=direction,
            breathing_amplitude_mm=float(rng.uniform(*p.breathing_amplitude_mm)),
            breathing_period_s=float(rng.uniform(*p.breathing_period_s)),
            breathing_phase=float(rng.uniform(0, 2 * np.pi)),
            drift_mm=drift,
            pressure_period_s=float(rng.uniform(*p.pressure_period_s)),
            pressure_release=float(rng.uniform(*p.pressure_release)),
            frames=int(frames),
        )

    def offset_mm(self, t: int) -> np.ndarray:
        """(3,) RAS mm added to the rigid translation at frame ``t`` (zero at frame 0)."""
        wave = lambda s: (1 - np.cos(2 * np.pi * s / self.breathing_period_s + self.breathing_phase)) / 2  # noqa: E731
        seconds = t * self.frame_interval_s
        breath = self.breathing_amplitude_mm * (wave(seconds) - wave(0.0)) * self.breathing_direction
        u = t / max(self.frames - 1, 1)
        return breath + (3 * u**2 - 2 * u**3) * self.drift_mm

    def push_scale(self, t: int) -> float:
        """Factor on the probe push (indentation and compression) at frame ``t``: 1 at frame 0, never above."""
        return float(
            1 - self.pressure_release * np.sin(np.pi * t * self.frame_interval_s / self.pressure_period_s) ** 2
        )

    def transform(self, phi: PhantomTransform, t: int) -> PhantomTransform:
        """``phi_t``: ``phi`` with this motion at frame ``t`` (``phi`` itself is not changed)."""
        moved = copy.copy(phi)
        moved.translation = phi.translation + self.offset_mm(t)
        moved.compression = phi.compression * self.push_scale(t)
        if phi.indentation is not None:
            moved.indentation = dict(phi.indentation, push=phi.indentation["push"] * self.push_scale(t))
        return moved

    def describe(self) -> dict:
        return {
            "frames": self.frames,
            "frame_interval_s": self.frame_interval_s,
            "breathing": {
                "direction_ras": np.round(self.breathing_direction, 6).tolist(),
                "amplitude_mm": round(self.breathing_amplitude_mm, 4),
                "period_s": round(self.breathing_period_s, 4),
                "phase_rad": round(self.breathing_phase, 4),
            },
            "probe_drift_ras_mm": np.round(self.drift_mm, 4).tolist(),
            "pressure": {"period_s": round(self.pressure_period_s, 4), "release": round(self.pressure_release, 4)},
        }


def frame_motion_mm(ddf_t: np.ndarray, ddf_0: np.ndarray, mask: np.ndarray) -> float:
    """Motion of a frame against frame 0: the 95th percentile over ``mask`` (X, Y, Z) of ``|u_t - u_0|`` (mm),
    ``u`` the true MR->TRUS fields (X, Y, Z, 1 or T, 3) on the fixed TRUS grid."""
    change = np.linalg.norm(ddf_t.reshape(*mask.shape, 3) - ddf_0.reshape(*mask.shape, 3), axis=-1)
    return float(np.percentile(change[mask], 95)) if mask.any() else 0.0


def generate_sequence(
    seed: int, index: int, frames: int, size: str = "small", preset: str = "realistic", motion=None
) -> dict:
    """One case as a sequence of ``frames`` TRUS frames (frame 0 = :func:`generate_case`'s case).

    Returns the static case dict with ``us_sequence`` (X, Y, Z, T) float32, ``us_sequence_label``
    (X, Y, Z, T, 6) uint8 (analytic), ``ddf_mr2us_sequence`` (X, Y, Z, T, 3) on the TRUS grid and
    ``ddf_us2mr_sequence`` (X, Y, Z, T, 3) on the MR grid (LPS mm), ``truth["sequence"]``.
    ``motion``: :class:`MotionParams` (default ranges) for the draw.
    """
    if int(frames) < 2:
        raise ValueError(f"sequence={frames}: a sequence needs at least 2 frames")
    case = generate_case(seed, index, size, preset=preset)
    pre, geom = PRESETS[preset], SIZES[size]
    anat: Anatomy = case["anatomy"]
    phi: PhantomTransform = case["transform"]
    mo = Motion.random(np.random.default_rng([int(seed), int(index), 3]), frames, motion or MotionParams())
    x_mr = voxel_to_world(case["mr_affine"], geom.mr_shape)
    label0 = case.get("us_true_label", case["us_label"])
    images, labels, fields, inverses, records = [case["us_image"]], [label0], [case["ddf_mr2us"]], [], []
    for t in range(frames):
        phi_t = mo.transform(phi, t)
        if t:
            rng = np.random.default_rng()
            rng.bit_generator.state = copy.deepcopy(case["trus_rng_state"])
            q, p, residual, _, label, image, _, _ = render_trus(
                anat, phi_t, geom, case["us_affine"], case["probe_voxel"], rng, pre.us
            )
            images.append(image)
            labels.append(label)
            fields.append(ddf_to_nifti_array(p - q, geom.us_shape))
        else:
            residual = case["truth"]["inverse_fixed_point_residual_mm"]
        inverses.append(ddf_to_nifti_array(phi_t.forward(x_mr) - x_mr, geom.mr_shape))
        records.append(_frame_record(anat, phi_t, geom, fields[t], fields[0], labels[t], residual))
    case["us_sequence"] = np.stack(images, axis=3)
    case["us_sequence_label"] = np.stack(labels, axis=3)
    case["ddf_mr2us_sequence"] = np.concatenate(fields, axis=3)
    case["ddf_us2mr_sequence"] = np.concatenate(inverses, axis=3)
    case["truth"]["sequence"] = {
        **mo.describe(),
        "labels": "us_sequence_labels hold the analytic labels of every frame (no observer)",
        "frames_truth": records,
    }
    return case


def _frame_record(anat, phi_t, geom: Geometry, ddf_t, ddf_0, label_t, residual) -> dict:
    return {
        "landmarks_us_ras_mm": [np.round(phi_t.forward(lm["centre"][None])[0], 5).tolist() for lm in anat.landmarks],
        "gland_centre_us_ras_mm": np.round(phi_t.forward(anat.gland_centre[None])[0], 5).tolist(),
        "motion_p95_mm": round(frame_motion_mm(ddf_t, ddf_0, label_t[..., 0] > 0), 4),
        "inverse_fixed_point_residual_mm": residual,
        "gland_voxels": int((label_t[..., 0] > 0).sum()),
    }


def write_sequence(case: dict, root, split: str, name: str, overwrite: bool = False) -> None:
    """Write the sequence files of one case (module docstring); the static files are ``write_case``'s."""
    d, f = Path(root) / split, f"{name}.nii.gz"
    dt = case["truth"]["sequence"]["frame_interval_s"]
    us, mr = case["us_affine"], case["mr_affine"]
    write_nifti(case["us_sequence"], us, d / "us_sequences" / f, overwrite, frame_interval=dt)
    write_nifti(case["us_sequence_label"], us, d / "us_sequence_labels" / f, overwrite, frame_interval=dt)
    write_nifti(case["ddf_mr2us_sequence"], us, d / "ddf_mr2us_sequences" / f, overwrite, "vector", dt)
    write_nifti(case["ddf_us2mr_sequence"], mr, d / "ddf_us2mr_sequences" / f, overwrite, "vector", dt)


def write_frames(dataset_dir, out, splits: str = "train,val,holdout", overwrite: bool = False) -> str:
    """Write a μ-RegPro-layout "frame view" of a sequence folder: frame ``t`` of ``caseNNNNNN`` becomes the pair
    ``caseNNNNNN_fTTT`` (the case's MR image and labels, the TRUS frame, its analytic labels and true MR -> TRUS
    field), so the static tools (training pre-stage, ``register-folder``, ``evaluate``) run on frames as they are.
    MR files are symbolic links to the originals. Splits without ``us_sequences`` are skipped."""
    import nibabel as nib

    from scripts.data.nifti import InputError, refuse_existing

    root, out = Path(dataset_dir), Path(out)
    refuse_existing([out] if out.exists() and any(out.iterdir()) else [], overwrite, advice="pass overwrite=True")
    done = 0
    for split in splits.split(",") if isinstance(splits, str) else splits:
        seq_dir = root / split / "us_sequences"
        for path in sorted(seq_dir.glob("*.nii.gz")) if seq_dir.is_dir() else []:
            case = path.name[: -len(".nii.gz")]
            src = {k: root / split / k / path.name for k in (*FRAME_VIEW, "mr_images", "mr_labels")}
            missing = [p for p in src.values() if not p.is_file()]
            if missing:
                raise InputError(f"{missing[0]}: missing; every sequence case needs {', '.join(FRAME_VIEW)}")
            images = {k: nib.load(src[k]) for k in FRAME_VIEW}
            arrays = {k: np.asanyarray(img.dataobj) for k, img in images.items()}  # once: gzip reads are sequential
            for t in range(arrays["us_sequences"].shape[3]):
                name = f"{case}_f{t:03d}.nii.gz"
                for key, folder in FRAME_VIEW.items():
                    frame = arrays[key][:, :, :, t]
                    frame = frame[:, :, :, None, :] if folder.startswith("ddf") else frame
                    vector = "vector" if folder.startswith("ddf") else None
                    write_nifti(frame, images[key].affine, out / split / folder / name, overwrite, vector)
                for folder in ("mr_images", "mr_labels"):
                    link = out / split / folder / name
                    link.parent.mkdir(parents=True, exist_ok=True)
                    if overwrite and link.is_symlink():
                        link.unlink()
                    link.symlink_to(os.path.relpath(src[folder].resolve(), link.parent))
                done += 1
    if not done:
        raise InputError(f"{root}: no sequences found (<split>/us_sequences/*.nii.gz in {splits})")
    return str(out)
