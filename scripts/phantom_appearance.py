"""Image formation of the phantom: a T2-like MR and a B-mode TRUS from tissue maps of the analytic anatomy.

Both renderers take the anatomy evaluated at the image's voxels (already pulled back into the MR
world), so the intensities follow the same deformed anatomy as the labels. Tissue-to-intensity
maps are drawn per case from the ranges below. Hand-written physics models (no library renders
MR or ultrasound from implicit anatomy); filters come from scipy.ndimage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from scripts.phantom_anatomy import TISSUES

__all__ = ["MRParams", "USParams", "render_mr", "render_us"]


@dataclass(frozen=True)
class MRParams:
    """T2-weighted MR appearance ranges (relative intensity, 1 = brightest fluid)."""

    intensity: dict = field(default_factory=lambda: dict(
        pelvic=(0.30, 0.50), muscle=(0.12, 0.25), fat=(0.65, 0.90), rectal_wall=(0.20, 0.35),
        rectal_lumen=(0.02, 0.15), bladder=(0.85, 1.00), peripheral_zone=(0.55, 0.80), central_zone=(0.25, 0.45),
        urethra=(0.50, 0.75), cyst=(0.85, 1.00), calcification=(0.02, 0.10)))
    texture: dict = field(default_factory=lambda: dict(pelvic=0.25, central_zone=0.30, peripheral_zone=0.12))
    texture_default: float = 0.05  # relative texture of the other tissues
    partial_volume_sigma_vox: float = 0.6  # Gaussian blur (voxels) standing in for the voxel's partial volume
    bias_amplitude: tuple[float, float] = (0.15, 0.35)  # log-amplitude of the smooth multiplicative bias field
    bias_wavelength_mm: tuple[float, float] = (120.0, 250.0)
    noise_sigma: tuple[float, float] = (0.02, 0.05)  # Rician noise std, relative to intensity 1
    scale: float = 1000.0  # stored intensity of relative intensity 1


@dataclass(frozen=True)
class USParams:
    """B-mode TRUS formation ranges (echogenicity is the scatterer amplitude, relative)."""

    echogenicity: dict = field(default_factory=lambda: dict(
        pelvic=(0.45, 0.75), muscle=(0.25, 0.45), fat=(0.70, 1.00), rectal_wall=(0.50, 0.80),
        rectal_lumen=(0.60, 0.90), bladder=(0.01, 0.04), peripheral_zone=(0.40, 0.70), central_zone=(0.25, 0.50),
        urethra=(0.10, 0.25), cyst=(0.01, 0.04), calcification=(1.50, 2.50)))
    texture: float = 0.25  # relative echogenicity texture
    capsule_gain: tuple[float, float] = (1.0, 2.5)  # added echogenicity on the gland surface (bright capsule)
    capsule_width_mm: float = 1.0
    psf_sigma_mm: tuple[float, float, float] = (0.35, 0.9, 1.4)  # axial (depth), lateral, elevational
    attenuation_db_per_mm: tuple[float, float] = (0.04, 0.10)  # round trip, after time-gain compensation
    dynamic_range_db: tuple[float, float] = (45.0, 60.0)  # log compression window
    noise_floor: float = 0.01  # electronic noise relative to the 99th-percentile envelope
    fan_half_angle_deg: tuple[float, float] = (50.0, 62.0)
    shadow_strength: tuple[float, float] = (0.80, 0.95)  # fraction of echo lost behind a calcification
    enhancement: tuple[float, float] = (1.3, 1.8)  # echo gain behind a cyst (low attenuation in fluid)
    scale: float = 255.0


def _draw(rng, ranges: dict) -> dict:
    return {k: float(rng.uniform(*v)) for k, v in ranges.items()}


def render_mr(tissue, texture, world, shape, rng, params: MRParams = MRParams()):
    """T2-like MR.

    Args:
        tissue: (N,) tissue class per voxel (N = prod(shape)); texture: (N,) anatomy texture in [-1, 1];
        world: (N, 3) scanner-frame positions (RAS mm) for the bias field; shape: (X, Y, Z).
    Returns:
        (X, Y, Z) float32 image and the drawn tissue-to-intensity map (dict).
    """
    table = _draw(rng, params.intensity)
    values = np.array([table[t] for t in TISSUES])
    tex = np.array([params.texture.get(t, params.texture_default) for t in TISSUES])
    img = values[tissue] * (1 + tex[tissue] * texture)
    img = ndimage.gaussian_filter(img.reshape(shape), params.partial_volume_sigma_vox, mode="nearest")
    k = rng.normal(size=(3, 3))
    k *= (2 * np.pi / rng.uniform(*params.bias_wavelength_mm, (3, 1))) / np.linalg.norm(k, axis=1, keepdims=True)
    log_bias = np.cos(world @ k.T + rng.uniform(0, 2 * np.pi, 3)).sum(1) / np.sqrt(3)
    img = img * np.exp(rng.uniform(*params.bias_amplitude) * log_bias).reshape(shape)
    sigma = rng.uniform(*params.noise_sigma)
    img = np.sqrt((img + rng.normal(0, sigma, shape)) ** 2 + rng.normal(0, sigma, shape) ** 2)  # Rician
    return (img * params.scale).astype(np.float32), {"tissue_intensity": table, "rician_sigma": sigma}


def _behind(plane, depth, kvec, centre, radius):
    """Weight in [0, 1] of voxels lying behind a sphere as seen from the probe axis (rays in the transverse plane).

    plane: (..., 2) in-plane offsets from the axis (mm); depth: (...) their length; kvec: (...) elevation (mm);
    centre: (3,) sphere centre in the same frame (2 in-plane, 1 elevation); radius: mm.
    """
    u = plane / np.maximum(depth, 1e-6)[..., None]
    t = u @ centre[:2]
    perp2 = np.sum((centre[:2] - t[..., None] * u) ** 2, axis=-1) + (kvec - centre[2]) ** 2
    across = np.clip(1 - perp2 / radius**2, 0, 1) ** 0.5
    along = 1 / (1 + np.exp(-(depth - t) / 0.7))
    return across * along * (t > 0)


def render_us(tissue, texture, gland_mm, shape, spacing, probe_vox, probe_radius, landmarks, rng,
              params: USParams = USParams()):
    """B-mode TRUS from scatterers, a PSF, envelope detection, attenuation and log compression.

    The probe axis runs along the third voxel axis through voxel (probe_vox[0], probe_vox[1]); depth
    grows along the first axis, the lateral direction is the second.

    Args:
        tissue, texture: (N,) per voxel as in :func:`render_mr`; gland_mm: (N,) signed distance to the gland (mm).
        shape: (X, Y, Z); spacing: mm; probe_radius: mm; landmarks: list of (kind, centre (3,) in voxel units, radius mm).
    Returns:
        (X, Y, Z) float32 image in [0, scale], the fan mask (bool) and the drawn parameters (dict).
    """
    table = _draw(rng, params.echogenicity)
    values = np.array([table[t] for t in TISSUES])
    echo = values[tissue] * np.clip(1 + params.texture * texture, 0.2, None)
    echo = echo + rng.uniform(*params.capsule_gain) * np.exp(-0.5 * (gland_mm / params.capsule_width_mm) ** 2)
    echo = echo.reshape(shape)

    i, j, k = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    plane = np.stack([(i - probe_vox[0]) * spacing, (j - probe_vox[1]) * spacing], -1)
    depth = np.linalg.norm(plane, axis=-1)
    kmm = k * spacing
    half = np.deg2rad(rng.uniform(*params.fan_half_angle_deg))
    fan = (np.abs(np.arctan2(plane[..., 1], plane[..., 0])) < half) & (depth > probe_radius)

    gain = 10 ** (-rng.uniform(*params.attenuation_db_per_mm) * np.clip(depth - probe_radius, 0, None) / 20)
    shadow_strength, enhancement = rng.uniform(*params.shadow_strength), rng.uniform(*params.enhancement)
    for kind, c, r in landmarks:
        centre = np.array([c[0] - probe_vox[0], c[1] - probe_vox[1], c[2]]) * spacing
        w = _behind(plane, depth, kmm, centre, r)
        gain = gain * (1 - shadow_strength * w if kind == "calcification" else 1 + (enhancement - 1) * w)

    scat = rng.normal(size=shape) + 1j * rng.normal(size=shape)
    rf = echo * gain * scat
    sig = np.asarray(params.psf_sigma_mm) / spacing
    env = np.abs(ndimage.gaussian_filter(rf.real, sig) + 1j * ndimage.gaussian_filter(rf.imag, sig))
    ref = np.percentile(env[fan], 99) if fan.any() else 1.0
    env = np.abs(env + params.noise_floor * ref * (rng.normal(size=shape) + 1j * rng.normal(size=shape)) / np.sqrt(2))
    dr = rng.uniform(*params.dynamic_range_db)
    img = np.clip(1 + 20 * np.log10(env / ref + 1e-12) / dr, 0, 1) * fan
    info = {"tissue_echogenicity": table, "dynamic_range_db": dr, "fan_half_angle_deg": float(np.rad2deg(half)),
            "shadow_strength": shadow_strength, "cyst_enhancement": enhancement}
    return (img * params.scale).astype(np.float32), fan, info
