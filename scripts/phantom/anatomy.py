"""Analytic pelvic anatomy of the phantom: implicit shapes in the MR world frame (RAS mm).

Every structure is a level function of a world point (negative inside), so labels and tissue maps
of any image are rendered by evaluating the functions at that image's voxel positions pulled back
into the MR world. Hand-written: no library provides this anatomy model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["AnatomyParams", "Anatomy", "TISSUES", "N_CHANNELS"]

N_CHANNELS = 6  # label channels: 0 gland, 1 urethra, 2..5 landmarks (μ-RegPro has 6)
# tissue classes, in painting order (a later class overrides an earlier one)
TISSUES = (
    "pelvic",
    "muscle",
    "fat",
    "rectal_wall",
    "rectal_lumen",
    "bladder",
    "peripheral_zone",
    "central_zone",
    "urethra",
    "cyst",
    "calcification",
    "seminal_vesicle",
    "bph_nodule",
    "lesion",
)
T = {name: i for i, name in enumerate(TISSUES)}


def _rotation_about(axis, angle: float) -> np.ndarray:
    from scripts.phantom.transform import rotation_matrix  # here: phantom_transform is independent of the anatomy

    return rotation_matrix(axis, angle)


@dataclass(frozen=True)
class AnatomyParams:
    """Ranges (mm) of the random anatomy of one case."""

    gland_centre_mm: tuple[float, float, float] = (0.0, 6.0, -4.0)  # mean gland centre, MR world RAS
    gland_centre_jitter_mm: float = 2.0
    gland_radii_mm: tuple[tuple[float, float], ...] = ((19.0, 25.0), (13.0, 17.0), (16.0, 21.0))  # R-L, A-P, S-I
    gland_waves: int = 6  # random trigonometric terms making the surface irregular
    gland_wave_amplitude: float = 0.06  # relative radius change per term
    gland_posterior_flattening: float = 0.15  # relative flattening of the posterior (rectal) face
    central_zone_scale: float = 0.62  # central zone radii relative to the gland
    urethra_radius_mm: tuple[float, float] = (2.5, 3.2)
    urethra_curvature: tuple[float, float] = (0.25, 0.45)  # anterior bend at the apex/base relative to A-P radius
    rectum_gap_mm: tuple[float, float] = (13.0, 16.0)  # gland posterior surface to rectum axis
    rectum_radius_mm: tuple[float, float] = (6.0, 8.0)
    rectal_wall_mm: float = 3.0
    fat_shell_mm: float = 3.0  # periprostatic fat around the gland
    bladder_radii_mm: tuple[float, float, float] = (32.0, 26.0, 22.0)
    bladder_gap_mm: tuple[float, float] = (-4.0, 4.0)  # bladder lower surface above the gland base
    landmarks: tuple[int, int] = (2, 5)  # number of cysts/calcifications, inclusive
    cyst_radius_mm: tuple[float, float] = (2.8, 4.5)
    calcification_radius_mm: tuple[float, float] = (2.3, 3.2)
    landmark_max_relative_radius: float = 0.72  # landmark centres stay this deep inside the gland
    landmark_min_gap_mm: float = 3.0
    texture_waves: int = 16
    texture_wavelength_mm: tuple[float, float] = (5.0, 16.0)
    # realistic-preset structures; the defaults switch them off (the basic preset draws no random numbers for them)
    gland_volume_cc: tuple[float, float] = (0.0, 0.0)  # log-uniform target volume; grows R-L most, S-I least
    median_lobe_probability: float = 0.0  # a BPH median lobe bulging from the base into the bladder
    median_lobe_size: tuple[float, float] = (0.15, 0.35)  # relative radius added at the lobe's centre
    seminal_vesicles: bool = False  # two tubes above and behind the base (appearance only, not labelled)
    bph_nodules: tuple[int, int] = (0, 0)  # nodules in the central/transition zone, inclusive (appearance only)
    bph_nodule_radius_mm: tuple[float, float] = (3.0, 7.0)
    lesions: tuple[int, int] = (0, 0)  # focal peripheral-zone lesions, inclusive (appearance only)
    lesion_radius_mm: tuple[float, float] = (3.0, 6.0)
    landmark_elongation: tuple[float, float] = (1.0, 1.0)  # landmark axis ratios (ellipsoids when > 1)


@dataclass
class Anatomy:
    """One case's anatomy; all positions RAS mm in the MR world."""

    gland_centre: np.ndarray
    gland_radii: np.ndarray
    wave_freq: np.ndarray  # (W, 3) on unit directions
    wave_amp: np.ndarray
    wave_phase: np.ndarray
    flattening: float
    cz_centre: np.ndarray
    cz_radii: np.ndarray
    urethra_radius: float
    urethra_curvature: float
    urethra_sway: np.ndarray  # (2,) lateral sway amplitude and phase
    rectum_xy: np.ndarray  # rectum axis (along S-I) position in x, y
    rectum_radius: float
    rectal_wall: float
    fat_shell: float
    bladder_centre: np.ndarray
    bladder_radii: np.ndarray
    muscle_centres: np.ndarray  # (2, 2) x, y of two lateral muscle bands along S-I
    muscle_radii: np.ndarray  # (2,) x and y radii
    landmarks: list = field(default_factory=list)  # dicts: kind, centre (3,), radius
    tex_freq: np.ndarray = None  # (M, 3) rad/mm
    tex_phase: np.ndarray = None
    median_lobe: float = 0.0  # relative bulge of the median lobe (0: none)
    ellipsoids: dict = field(default_factory=dict)  # tissue name -> list of (centre (3,), radii (3,), rotation (3, 3))

    @classmethod
    def random(cls, rng: np.random.Generator, params: AnatomyParams | None = None) -> "Anatomy":
        p = params or AnatomyParams()
        c = np.asarray(p.gland_centre_mm) + rng.normal(0, p.gland_centre_jitter_mm, 3)
        radii = np.array([rng.uniform(*r) for r in p.gland_radii_mm])
        if p.gland_volume_cc[1] > 0:  # realistic: rescale to a drawn volume (BPH grows the gland mostly sideways)
            volume = np.exp(rng.uniform(*np.log(p.gland_volume_cc)))
            s = (volume / (4 / 3 * np.pi * np.prod(radii) / 1000)) ** (1 / 3)
            radii = radii * s ** np.array([1.2, 1.0, 0.8])
        w = p.gland_waves
        freq = rng.normal(0, 1.6, (w, 3))
        cz_radii = radii * p.central_zone_scale
        cz_centre = c + np.array([0.0, 0.25 * radii[1], 0.2 * radii[2]])
        rect_r = rng.uniform(*p.rectum_radius_mm)
        rectum = np.array(
            [
                c[0] + rng.normal(0, 1.5),
                c[1] - radii[1] * (1 - p.gland_posterior_flattening) - rng.uniform(*p.rectum_gap_mm),
            ]
        )
        bl_r = np.asarray(p.bladder_radii_mm) * rng.uniform(0.85, 1.15, 3)
        bladder = c + np.array([rng.normal(0, 2), 0.35 * radii[1], radii[2] + rng.uniform(*p.bladder_gap_mm) + bl_r[2]])
        muscles = np.array([[c[0] - radii[0] - 14, rectum[1] + 4], [c[0] + radii[0] + 14, rectum[1] + 4]])
        muscles += rng.normal(0, 2, (2, 2))
        tex_dir = rng.normal(size=(p.texture_waves, 3))
        tex_dir /= np.linalg.norm(tex_dir, axis=1, keepdims=True)
        tex_freq = tex_dir * (2 * np.pi / rng.uniform(*p.texture_wavelength_mm, (p.texture_waves, 1)))
        anat = cls(
            c,
            radii,
            freq,
            rng.normal(0, p.gland_wave_amplitude, w),
            rng.uniform(0, 2 * np.pi, w),
            p.gland_posterior_flattening,
            cz_centre,
            cz_radii,
            rng.uniform(*p.urethra_radius_mm),
            rng.uniform(*p.urethra_curvature),
            np.array([rng.uniform(0.5, 2.0), rng.uniform(0, 2 * np.pi)]),
            rectum,
            rect_r,
            p.rectal_wall_mm,
            p.fat_shell_mm,
            bladder,
            bl_r,
            muscles,
            np.array([9.0, 14.0]) * rng.uniform(0.8, 1.2, 2),
            [],
            tex_freq,
            rng.uniform(0, 2 * np.pi, p.texture_waves),
        )
        anat.landmarks = anat._draw_landmarks(rng, p)
        anat._draw_realistic(rng, p)
        return anat

    def _draw_realistic(self, rng, p: AnatomyParams) -> None:
        """Median lobe, seminal vesicles, BPH nodules and lesions (each only when its parameter enables it)."""
        if p.median_lobe_probability > 0 and rng.random() < p.median_lobe_probability:
            self.median_lobe = float(rng.uniform(*p.median_lobe_size))
        c, r = self.gland_centre, self.gland_radii
        if p.seminal_vesicles:
            self.ellipsoids["seminal_vesicle"] = [
                (
                    c + np.array([side * 0.5 * r[0], -0.55 * r[1], 0.95 * r[2]]) + rng.normal(0, 1.5, 3),
                    np.array([rng.uniform(11, 17), rng.uniform(4, 6), rng.uniform(5, 8)]),
                    _rotation_about([0.0, 1.0, 0.0], side * np.deg2rad(rng.uniform(15, 35))),
                )
                for side in (-1, 1)
            ]
        for name, count, radius, zone in (
            ("bph_nodule", p.bph_nodules, p.bph_nodule_radius_mm, "central_zone"),
            ("lesion", p.lesions, p.lesion_radius_mm, "peripheral_zone"),
        ):
            if count[1] <= 0:
                continue
            out = []
            for _ in range(int(rng.integers(count[0], count[1] + 1))):
                for _ in range(200):  # a centre in the zone (central: inside it; peripheral: gland minus central)
                    u = rng.normal(size=3)
                    u *= rng.uniform(0.1, 0.85) / np.linalg.norm(u)
                    x = (self.cz_centre + u * self.cz_radii if zone == "central_zone" else c + u * r)[None]
                    in_cz = self.central_zone_level(x)[0] < 0
                    if in_cz if zone == "central_zone" else (not in_cz and self.gland_level(x)[0] < -0.1):
                        break
                axis = rng.normal(size=3)
                out.append(
                    (
                        x[0],
                        rng.uniform(*radius) * rng.uniform(0.7, 1.3, 3),
                        _rotation_about(axis, rng.uniform(0, np.pi)),
                    )
                )
            self.ellipsoids[name] = out

    def ellipsoid_inside(self, x: np.ndarray, name: str) -> np.ndarray:
        """(N, 3) mm -> (N,) bool: inside any ellipsoid of tissue ``name``."""
        inside = np.zeros(len(x), bool)
        for centre, radii, rot in self.ellipsoids.get(name, []):
            inside |= np.linalg.norm(((x - centre) @ rot) / radii, axis=1) < 1
        return inside

    def _draw_landmarks(self, rng, p: AnatomyParams) -> list:
        """Place 2-5 non-overlapping cysts/calcifications well inside the gland and away from the urethra."""
        n = int(rng.integers(p.landmarks[0], p.landmarks[1] + 1))
        out = []
        for _ in range(2000):
            if len(out) == n:
                break
            kind = "cyst" if rng.random() < 0.5 else "calcification"
            radius = rng.uniform(*(p.cyst_radius_mm if kind == "cyst" else p.calcification_radius_mm))
            u = rng.normal(size=3)
            u *= rng.uniform(0.15, p.landmark_max_relative_radius) / np.linalg.norm(u)
            centre = self.gland_centre + u * self.gland_radii
            pt = centre[None]
            inside = self.gland_level(pt)[0] * self.gland_radii.min() < -(radius + 2.0)
            clear = self.urethra_distance(pt)[0] > radius + p.landmark_min_gap_mm
            apart = all(
                np.linalg.norm(centre - q["centre"]) > radius + q["radius"] + p.landmark_min_gap_mm for q in out
            )
            if inside and clear and apart:
                out.append({"kind": kind, "centre": centre, "radius": float(radius)})
                if p.landmark_elongation[1] > 1:  # realistic: an axis-aligned ellipsoid, mean radius kept
                    e = rng.uniform(*p.landmark_elongation)
                    radii = radius * np.array([e, 1.0, 1.0 / e]) ** (2 / 3)
                    out[-1]["radii"] = radii[rng.permutation(3)]
        if len(out) < p.landmarks[0]:
            raise RuntimeError("could not place the landmarks; the gland is too small for AnatomyParams")
        return out

    # --- level functions: (N, 3) RAS mm -> (N,), negative inside -----------------------------
    def gland_level(self, x: np.ndarray) -> np.ndarray:
        """Relative level of the irregular gland (≈ signed distance / radius)."""
        y = (x - self.gland_centre) / self.gland_radii
        rho = np.linalg.norm(y, axis=1)
        n = y / np.maximum(rho, 1e-9)[:, None]
        eps = np.cos(n @ self.wave_freq.T + self.wave_phase) @ self.wave_amp
        eps -= self.flattening * np.clip(-n[:, 1], 0, None) ** 2  # flatter against the rectum
        if self.median_lobe:  # a bulge of the base, slightly anterior, into the bladder
            lobe = np.array([0.0, 0.25, 1.0]) / np.hypot(0.25, 1.0)
            eps += self.median_lobe * np.exp(-np.sum((n - lobe) ** 2, axis=1) / (2 * 0.3**2))
        return rho - (1 + eps)

    def central_zone_level(self, x: np.ndarray) -> np.ndarray:
        return np.linalg.norm((x - self.cz_centre) / self.cz_radii, axis=1) - 1

    def urethra_distance(self, x: np.ndarray) -> np.ndarray:
        """Distance (mm) in the axial plane to the curved urethra centre line (runs S-I through the gland)."""
        t = (x[:, 2] - self.gland_centre[2]) / self.gland_radii[2]
        cx = self.gland_centre[0] + self.urethra_sway[0] * np.sin(1.5 * t + self.urethra_sway[1])
        cy = self.gland_centre[1] + 0.15 * self.gland_radii[1] + self.urethra_curvature * self.gland_radii[1] * t**2
        return np.hypot(x[:, 0] - cx, x[:, 1] - cy)

    def landmark_level(self, x: np.ndarray, i: int) -> np.ndarray:
        lm = self.landmarks[i]
        if "radii" in lm:
            return np.linalg.norm((x - lm["centre"]) / lm["radii"], axis=1) - 1
        return np.linalg.norm(x - lm["centre"], axis=1) / lm["radius"] - 1

    def rectum_distance(self, x: np.ndarray) -> np.ndarray:
        return np.hypot(x[:, 0] - self.rectum_xy[0], x[:, 1] - self.rectum_xy[1])

    def texture(self, x: np.ndarray) -> np.ndarray:
        """Smooth tissue texture in about [-1, 1], attached to the anatomy (deforms with it)."""
        return np.cos(x @ self.tex_freq.T + self.tex_phase).sum(axis=1) * np.sqrt(2.0 / len(self.tex_phase))

    # --- rendering ----------------------------------------------------------------------------
    def sample(self, x: np.ndarray) -> dict:
        """Evaluate every level function once at MR-world points (N, 3) RAS mm; feed to :meth:`labels`/:meth:`tissue`."""
        x = np.asarray(x, float)
        s = {
            "gland": self.gland_level(x),
            "urethra": self.urethra_distance(x) - self.urethra_radius,
            "central_zone": self.central_zone_level(x),
            "rectum": self.rectum_distance(x),
            "bladder": np.linalg.norm((x - self.bladder_centre) / self.bladder_radii, axis=1) - 1,
            "landmarks": [self.landmark_level(x, i) for i in range(len(self.landmarks))],
            "texture": self.texture(x),
        }
        s["gland_mm"] = s["gland"] * float(np.mean(self.gland_radii))
        s["muscle"] = np.zeros(len(x), bool)
        for c in self.muscle_centres:
            s["muscle"] |= (
                np.hypot((x[:, 0] - c[0]) / self.muscle_radii[0], (x[:, 1] - c[1]) / self.muscle_radii[1]) < 1
            )
        s["ellipsoids"] = {name: self.ellipsoid_inside(x, name) for name in self.ellipsoids}
        return s

    def labels(self, s: dict) -> np.ndarray:
        """Sample (see :meth:`sample`) -> (N, 6) uint8: 0 gland, 1 urethra inside the gland, 2..5 the first
        four landmarks (channels without a landmark stay empty)."""
        gland = s["gland"] < 0
        out = np.zeros((len(gland), N_CHANNELS), np.uint8)
        out[:, 0] = gland
        out[:, 1] = gland & (s["urethra"] < 0)
        for i, level in enumerate(s["landmarks"][: N_CHANNELS - 2]):
            out[:, 2 + i] = level < 0
        return out

    def tissue(self, s: dict) -> np.ndarray:
        """Sample (see :meth:`sample`) -> (N,) int tissue class index into :data:`TISSUES`."""
        out = np.full(len(s["gland"]), T["pelvic"], np.int8)
        out[s["muscle"]] = T["muscle"]
        out[s["gland_mm"] < self.fat_shell] = T["fat"]
        out[s["rectum"] < self.rectum_radius + self.rectal_wall] = T["rectal_wall"]
        out[s["rectum"] < self.rectum_radius] = T["rectal_lumen"]
        out[s["bladder"] < 0] = T["bladder"]
        ell = s.get("ellipsoids", {})
        if "seminal_vesicle" in ell:
            out[ell["seminal_vesicle"] & (s["gland"] >= 0)] = T["seminal_vesicle"]
        gland = s["gland"] < 0
        out[gland] = T["peripheral_zone"]
        out[gland & (s["central_zone"] < 0)] = T["central_zone"]
        for name in ("bph_nodule", "lesion"):
            if name in ell:
                out[gland & ell[name]] = T[name]
        out[gland & (s["urethra"] < 0)] = T["urethra"]
        for lm, level in zip(self.landmarks, s["landmarks"]):
            out[level < 0] = T[lm["kind"]]
        return out
