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

from scripts.phantom.anatomy import TISSUES

__all__ = ["MRParams", "USParams", "render_mr", "render_us"]


@dataclass(frozen=True)
class MRParams:
    """T2-weighted MR appearance ranges (relative intensity, 1 = brightest fluid)."""

    intensity: dict = field(
        default_factory=lambda: dict(
            pelvic=(0.30, 0.50),
            muscle=(0.12, 0.25),
            fat=(0.65, 0.90),
            rectal_wall=(0.20, 0.35),
            rectal_lumen=(0.02, 0.15),
            bladder=(0.85, 1.00),
            peripheral_zone=(0.55, 0.80),
            central_zone=(0.25, 0.45),
            urethra=(0.50, 0.75),
            cyst=(0.85, 1.00),
            calcification=(0.02, 0.10),
        )
    )
    texture: dict = field(default_factory=lambda: dict(pelvic=0.25, central_zone=0.30, peripheral_zone=0.12))
    texture_default: float = 0.05  # relative texture of the other tissues
    partial_volume_sigma_vox: float = 0.6  # Gaussian blur (voxels) standing in for the voxel's partial volume
    bias_amplitude: tuple[float, float] = (0.15, 0.35)  # log-amplitude of the smooth multiplicative bias field
    bias_wavelength_mm: tuple[float, float] = (120.0, 250.0)
    noise_sigma: tuple[float, float] = (0.02, 0.05)  # Rician noise std, relative to intensity 1
    scale: float = 1000.0  # stored intensity of relative intensity 1
    # realistic-preset effects; the defaults switch them off (the basic preset draws no random numbers for them)
    slice_thickness_mm: tuple[float, float] = (0.0, 0.0)  # thick axial slices (S-I), interpolated back to the grid
    coil_gain: tuple[float, float] = (0.0, 0.0)  # receive-coil sensitivity 1 + g exp(-d / falloff), d from the rectum
    coil_falloff_mm: float = 30.0


@dataclass(frozen=True)
class USParams:
    """B-mode TRUS formation ranges (echogenicity is the scatterer amplitude, relative)."""

    echogenicity: dict = field(
        default_factory=lambda: dict(
            pelvic=(0.45, 0.75),
            muscle=(0.25, 0.45),
            fat=(0.70, 1.00),
            rectal_wall=(0.50, 0.80),
            rectal_lumen=(0.60, 0.90),
            bladder=(0.01, 0.04),
            peripheral_zone=(0.40, 0.70),
            central_zone=(0.25, 0.50),
            urethra=(0.10, 0.25),
            cyst=(0.01, 0.04),
            calcification=(1.50, 2.50),
        )
    )
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
    # realistic-preset effects; the defaults switch them off (the basic preset draws no random numbers for them)
    capsule_fade: tuple[float, float] = (0.0, 0.0)  # capsule echo lost at apex, base and anterior (0 none, 1 all)
    gain_db: tuple[float, float] = (0.0, 0.0)  # overall receive gain, before log compression
    tgc_db: float = 0.0  # std of a random time-gain-compensation error at 5 depth knots
    reverberation: tuple[float, float] = (0.0, 0.0)  # echo of the probe wall repeated into the near field
    reverberation_spacing_mm: tuple[float, float] = (3.0, 5.0)
    side_lobe: tuple[float, float] = (0.0, 0.0)  # relative amplitude of a 5× wider lateral PSF (clutter)
    contact_shadows: tuple[int, int] = (0, 0)  # sectors of lost probe contact (gas), inclusive count
    contact_shadow_width_deg: tuple[float, float] = (4.0, 12.0)


def _draw(rng, ranges: dict) -> dict:
    return {k: float(rng.uniform(*v)) for k, v in ranges.items()}


def render_mr(tissue, texture, world, shape, rng, params: MRParams | None = None, rectum_mm=None, spacing=1.0):
    """T2-like MR.

    Args:
        tissue: (N,) tissue class per voxel (N = prod(shape)); texture: (N,) anatomy texture in [-1, 1];
        world: (N, 3) scanner-frame positions (RAS mm) for the bias field; shape: (X, Y, Z), the third axis S-I.
        rectum_mm: (N,) distance to the rectum axis (mm), for the coil sensitivity; spacing: voxel size (mm).
    Returns:
        (X, Y, Z) float32 image and the drawn tissue-to-intensity map (dict).
    """
    params = params or MRParams()
    table = _draw(rng, params.intensity)
    values = np.array([table.get(t, 0.0) for t in TISSUES])
    tex = np.array([params.texture.get(t, params.texture_default) for t in TISSUES])
    img = values[tissue] * (1 + tex[tissue] * texture)
    img = ndimage.gaussian_filter(img.reshape(shape), params.partial_volume_sigma_vox, mode="nearest")
    extra = {}
    if params.slice_thickness_mm[1] > 0:  # acquired in thick S-I slices, then interpolated back (as T2 usually is)
        thick = rng.uniform(*params.slice_thickness_mm)
        img = ndimage.gaussian_filter1d(img, thick / 2.355 / spacing, axis=2, mode="nearest")
        slices = np.arange(rng.uniform(0, thick / spacing), shape[2] - 1, thick / spacing)
        coarse = np.take(img, np.round(slices).astype(int), axis=2)
        img = ndimage.map_coordinates(
            coarse,
            np.stack(
                np.meshgrid(
                    *[np.arange(n, dtype=float) for n in shape[:2]],
                    np.interp(np.arange(shape[2]), slices, np.arange(len(slices))),
                    indexing="ij",
                )
            ),
            order=1,
            mode="nearest",
        )
        extra["slice_thickness_mm"] = float(thick)
    if params.coil_gain[1] > 0:
        g = rng.uniform(*params.coil_gain)
        img = img * (1 + g * np.exp(-np.asarray(rectum_mm) / params.coil_falloff_mm)).reshape(shape) / (1 + g / 2)
        extra["coil_gain"] = float(g)
    k = rng.normal(size=(3, 3))
    k *= (2 * np.pi / rng.uniform(*params.bias_wavelength_mm, (3, 1))) / np.linalg.norm(k, axis=1, keepdims=True)
    log_bias = np.cos(world @ k.T + rng.uniform(0, 2 * np.pi, 3)).sum(1) / np.sqrt(3)
    img = img * np.exp(rng.uniform(*params.bias_amplitude) * log_bias).reshape(shape)
    sigma = rng.uniform(*params.noise_sigma)
    img = np.sqrt((img + rng.normal(0, sigma, shape)) ** 2 + rng.normal(0, sigma, shape) ** 2)  # Rician
    return (img * params.scale).astype(np.float32), {"tissue_intensity": table, "rician_sigma": sigma, **extra}


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


def render_us(
    tissue,
    texture,
    gland_mm,
    shape,
    spacing,
    probe_vox,
    probe_radius,
    landmarks,
    rng,
    params: USParams = USParams(),  # noqa: B008 (a frozen dataclass: one shared default is safe)
    capsule_site=None,
):
    """B-mode TRUS from scatterers, a PSF, envelope detection, attenuation and log compression.

    The probe axis runs along the third voxel axis through voxel (probe_vox[0], probe_vox[1]); depth
    grows along the first axis, the lateral direction is the second.

    Args:
        tissue, texture: (N,) per voxel as in :func:`render_mr`; gland_mm: (N,) signed distance to the gland (mm).
        shape: (X, Y, Z); spacing: mm; probe_radius: mm; landmarks: list of (kind, centre (3,) in voxel units, radius mm).
        capsule_site: (N,) in [0, 1], how far each voxel lies towards the apex, base or anterior face (1 there), where
            ``capsule_fade`` weakens the capsule echo.
    Returns:
        (X, Y, Z) float32 image in [0, scale], the fan mask (bool) and the drawn parameters (dict).
    """
    table = _draw(rng, params.echogenicity)
    values = np.array([table.get(t, 0.0) for t in TISSUES])
    echo = values[tissue] * np.clip(1 + params.texture * texture, 0.2, None)
    capsule = rng.uniform(*params.capsule_gain) * np.exp(-0.5 * (gland_mm / params.capsule_width_mm) ** 2)
    extra = {}
    if params.capsule_fade[1] > 0:
        fade = rng.uniform(*params.capsule_fade)
        capsule = capsule * (1 - fade * np.asarray(capsule_site))
        extra["capsule_fade"] = float(fade)
    echo = (echo + capsule).reshape(shape)

    i, j, k = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    plane = np.stack([(i - probe_vox[0]) * spacing, (j - probe_vox[1]) * spacing], -1)
    depth = np.linalg.norm(plane, axis=-1)
    kmm = k * spacing
    half = np.deg2rad(rng.uniform(*params.fan_half_angle_deg))
    fan = (np.abs(np.arctan2(plane[..., 1], plane[..., 0])) < half) & (depth > probe_radius)

    gain = 10 ** (-rng.uniform(*params.attenuation_db_per_mm) * np.clip(depth - probe_radius, 0, None) / 20)
    if params.gain_db[1] - params.gain_db[0] > 0 or params.tgc_db > 0:  # gain and TGC errors, in dB over depth
        knots = np.linspace(probe_radius, depth.max() + 1e-6, 5)
        error_db = rng.uniform(*params.gain_db) + rng.normal(0, params.tgc_db, 5)
        gain = gain * 10 ** (np.interp(depth, knots, error_db) / 20)
        extra["gain_tgc_db_at_knots"] = error_db.round(3).tolist()
    if params.contact_shadows[1] > 0:  # sectors where gas between probe and wall blocks the beam
        angle, extra["contact_shadows"] = np.arctan2(plane[..., 1], plane[..., 0]), []
        for _ in range(int(rng.integers(params.contact_shadows[0], params.contact_shadows[1] + 1))):
            centre, width = rng.uniform(-half, half), np.deg2rad(rng.uniform(*params.contact_shadow_width_deg))
            loss = rng.uniform(0.6, 0.95)
            gain = gain * (1 - loss / (1 + np.exp((np.abs(angle - centre) - width / 2) / 0.02)))
            extra["contact_shadows"].append({"centre_deg": float(np.rad2deg(centre)), "loss": float(loss)})
    if params.reverberation[1] > 0:  # multiple echoes of the probe wall, decaying into the near field
        amp, gap = rng.uniform(*params.reverberation), rng.uniform(*params.reverberation_spacing_mm)
        echo = echo + amp * sum(
            0.55**m * np.exp(-0.5 * ((depth - probe_radius - m * gap) / 0.5) ** 2) for m in range(1, 6)
        )
        extra["reverberation"] = {"amplitude": float(amp), "spacing_mm": float(gap)}
    shadow_strength, enhancement = rng.uniform(*params.shadow_strength), rng.uniform(*params.enhancement)
    for kind, c, r in landmarks:
        centre = np.array([c[0] - probe_vox[0], c[1] - probe_vox[1], c[2]]) * spacing
        w = _behind(plane, depth, kmm, centre, r)
        gain = gain * (1 - shadow_strength * w if kind == "calcification" else 1 + (enhancement - 1) * w)

    scat = rng.normal(size=shape) + 1j * rng.normal(size=shape)
    rf = echo * gain * scat
    sig = np.asarray(params.psf_sigma_mm) / spacing
    env = ndimage.gaussian_filter(rf.real, sig) + 1j * ndimage.gaussian_filter(rf.imag, sig)
    if params.side_lobe[1] > 0:  # off-axis clutter: a weak, 5x wider lateral beam
        lobe, wide = rng.uniform(*params.side_lobe), sig * np.array([1.0, 5.0, 2.0])
        env = env + lobe * (ndimage.gaussian_filter(rf.real, wide) + 1j * ndimage.gaussian_filter(rf.imag, wide))
        extra["side_lobe"] = float(lobe)
    env = np.abs(env)
    ref = np.percentile(env[fan], 99) if fan.any() else 1.0
    env = np.abs(env + params.noise_floor * ref * (rng.normal(size=shape) + 1j * rng.normal(size=shape)) / np.sqrt(2))
    dr = rng.uniform(*params.dynamic_range_db)
    img = np.clip(1 + 20 * np.log10(env / ref + 1e-12) / dr, 0, 1) * fan
    info = {
        "tissue_echogenicity": table,
        "dynamic_range_db": dr,
        "fan_half_angle_deg": float(np.rad2deg(half)),
        "shadow_strength": shadow_strength,
        "cyst_enhancement": enhancement,
        **extra,
    }
    return (img * params.scale).astype(np.float32), fan, info
