"""The phantom's known spatial transform from the MR world to the TRUS world, and its inverse.

``phi = C ∘ R ∘ E`` maps a point of the MR world (RAS mm) to the TRUS world (RAS mm):

- ``E``: smooth random elastic field, ``x + Σ_k a_k exp(-|x - c_k|² / 2σ²)`` (MR world);
- ``R``: rigid misalignment, a rotation about the gland centre then a translation;
- ``C``: probe compression in the TRUS world, a radial push away from the probe axis,
  ``z + (a / s) z⊥ exp(-|z⊥|² / 2s²)`` with ``z⊥`` the component of ``z`` perpendicular to the axis.

Each of ``E`` and ``C`` is the identity plus a field whose Jacobian has spectral norm below 1, so
both are diffeomorphisms and their inverses are found by fixed-point iteration
``x ← y - d(x)`` (a contraction). Hand-written: no library provides this analytic model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["TransformParams", "PhantomTransform", "rotation_matrix"]


@dataclass(frozen=True)
class TransformParams:
    """Ranges of the random transform of one case (mm and degrees)."""

    rotation_deg: tuple[float, float] = (3.0, 7.0)  # rigid rotation angle about a random axis
    translation_mm: tuple[float, float] = (2.0, 5.0)  # rigid translation length in a random direction
    elastic_centres: int = 8  # Gaussian kernels of the elastic field
    elastic_spread_mm: float = 18.0  # std of the kernel centres around the gland centre
    elastic_sigma_mm: float = 16.0  # kernel width
    elastic_amplitude_mm: float = 3.5  # std of each kernel's displacement component
    elastic_max_gradient: float = 0.45  # spectral-norm cap of the elastic field's Jacobian (< 1: diffeomorphic)
    compression_mm: tuple[float, float] = (5.0, 8.0)  # probe push a (peak displacement 0.61 a at s mm from the axis)
    compression_width_mm: float = 13.0  # s; a / s < 1 keeps C diffeomorphic
    inverse_tolerance_mm: float = 1e-5  # fixed-point inversion stops when the update is below this
    inverse_max_iterations: int = 100


def rotation_matrix(axis, angle_rad: float) -> np.ndarray:
    """3×3 rotation by ``angle_rad`` about the unit vector ``axis`` (Rodrigues)."""
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle_rad) * k + (1 - np.cos(angle_rad)) * k @ k


def _unit(rng) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


class PhantomTransform:
    """``phi``: MR world -> TRUS world (RAS mm), with :meth:`forward`, :meth:`inverse` and their displacements.

    Args:
        rotation: (3, 3) rotation of ``R``; ``centre``: (3,) its fixed point; ``translation``: (3,) mm.
        elastic_centres: (K, 3) mm; ``elastic_amplitudes``: (K, 3) mm; ``elastic_sigma``: mm.
        probe_point: (3,) a point on the probe axis (TRUS world); ``probe_axis``: (3,) its direction.
        compression: peak push parameter ``a`` (mm); ``compression_width``: ``s`` (mm).
    """

    def __init__(self, rotation, centre, translation, elastic_centres, elastic_amplitudes, elastic_sigma,
                 probe_point, probe_axis, compression, compression_width, tolerance=1e-6, max_iterations=100):
        self.rotation = np.asarray(rotation, float)
        self.centre = np.asarray(centre, float)
        self.translation = np.asarray(translation, float)
        self.elastic_centres = np.asarray(elastic_centres, float).reshape(-1, 3)
        self.elastic_amplitudes = np.asarray(elastic_amplitudes, float).reshape(-1, 3)
        self.elastic_sigma = float(elastic_sigma)
        self.probe_point = np.asarray(probe_point, float)
        self.probe_axis = np.asarray(probe_axis, float) / np.linalg.norm(probe_axis)
        self.compression = float(compression)
        self.compression_width = float(compression_width)
        self.tolerance = tolerance
        self.max_iterations = max_iterations

    # --- the three stages -------------------------------------------------------------------
    def _kernels(self, x: np.ndarray) -> np.ndarray:
        """(N, K) Gaussian kernel values; squared distances expanded so the work is one matrix product."""
        c = self.elastic_centres
        d2 = np.sum(x * x, axis=1)[:, None] - 2 * x @ c.T + np.sum(c * c, axis=1)
        return np.exp(-d2 / (2 * self.elastic_sigma**2))

    def elastic_displacement(self, x: np.ndarray) -> np.ndarray:
        """(N, 3) mm -> (N, 3) mm displacement of ``E`` (MR world)."""
        return self._kernels(x) @ self.elastic_amplitudes

    def elastic_jacobian(self, x: np.ndarray) -> np.ndarray:
        """(N, 3) -> (N, 3, 3) gradient of the elastic displacement, ``[n, i, j] = ∂d_i/∂x_j``."""
        g = self._kernels(x) / self.elastic_sigma**2  # (N, K)
        a = self.elastic_amplitudes
        # ∂d_i/∂x_j = -Σ_k g_k a_ki (x_j - c_kj)
        return -(np.einsum("nk,ki->ni", g, a)[:, :, None] * x[:, None, :]
                 - np.einsum("nk,ki,kj->nij", g, a, self.elastic_centres))

    def compression_displacement(self, z: np.ndarray) -> np.ndarray:
        """(N, 3) mm -> (N, 3) mm displacement of ``C`` (TRUS world): radial push away from the probe axis."""
        rel = z - self.probe_point
        perp = rel - (rel @ self.probe_axis)[:, None] * self.probe_axis
        s = self.compression_width
        return (self.compression / s) * perp * np.exp(-np.sum(perp**2, axis=1) / (2 * s * s))[:, None]

    def rigid(self, y: np.ndarray) -> np.ndarray:
        return (y - self.centre) @ self.rotation.T + self.centre + self.translation

    def rigid_inverse(self, z: np.ndarray) -> np.ndarray:
        return (z - self.centre - self.translation) @ self.rotation + self.centre

    def _invert(self, target: np.ndarray, displacement) -> tuple[np.ndarray, float]:
        """Solve ``x + d(x) = target`` by fixed-point iteration; return ``x`` and the final residual (mm)."""
        x = target - displacement(target)
        for _ in range(self.max_iterations):
            new = target - displacement(x)
            step = np.max(np.abs(new - x)) if len(x) else 0.0
            x = new
            if step < self.tolerance:
                break
        residual = np.max(np.abs(x + displacement(x) - target)) if len(x) else 0.0
        return x, float(residual)

    # --- phi and its inverse ----------------------------------------------------------------
    def forward(self, x: np.ndarray) -> np.ndarray:
        """MR-world points (N, 3) RAS mm -> their TRUS-world positions (N, 3) RAS mm."""
        x = np.asarray(x, float).reshape(-1, 3)
        z = self.rigid(x + self.elastic_displacement(x))
        return z + self.compression_displacement(z)

    def inverse(self, q: np.ndarray, return_residual: bool = False):
        """TRUS-world points (N, 3) RAS mm -> the MR-world points that ``forward`` maps onto them."""
        q = np.asarray(q, float).reshape(-1, 3)
        z, r1 = self._invert(q, self.compression_displacement)
        x, r2 = self._invert(self.rigid_inverse(z), self.elastic_displacement)
        return (x, max(r1, r2)) if return_residual else x

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def random(cls, rng: np.random.Generator, gland_centre, probe_point, probe_axis, check_points,
               params: TransformParams = TransformParams()) -> "PhantomTransform":
        """Draw one case's transform; the elastic field is scaled so its Jacobian norm over ``check_points``
        (N, 3 MR-world mm, a grid covering both fields of view) stays below ``params.elastic_max_gradient``."""
        angle = np.deg2rad(rng.uniform(*params.rotation_deg))
        rotation = rotation_matrix(_unit(rng), angle)
        translation = _unit(rng) * rng.uniform(*params.translation_mm)
        k = params.elastic_centres
        centres = np.asarray(gland_centre) + rng.normal(0, params.elastic_spread_mm, (k, 3))
        amplitudes = rng.normal(0, params.elastic_amplitude_mm, (k, 3))
        compression = rng.uniform(*params.compression_mm)
        t = cls(rotation, gland_centre, translation, centres, amplitudes, params.elastic_sigma_mm, probe_point,
                probe_axis, compression, params.compression_width_mm, params.inverse_tolerance_mm,
                params.inverse_max_iterations)
        norm = np.linalg.norm(t.elastic_jacobian(np.asarray(check_points, float)), ord=2, axis=(1, 2)).max()
        if norm > params.elastic_max_gradient:
            t.elastic_amplitudes *= params.elastic_max_gradient / norm
        if compression / params.compression_width_mm >= 1:
            raise ValueError("compression_mm must stay below compression_width_mm to keep the transform invertible")
        return t

    def describe(self) -> dict:
        """JSON-ready parameters (mm, RAS, MR world for E and R's centre, TRUS world for the probe)."""
        angle = np.degrees(np.arccos(np.clip((np.trace(self.rotation) - 1) / 2, -1, 1)))
        return {
            "rigid": {
                "rotation_matrix": self.rotation.round(8).tolist(),
                "rotation_angle_deg": round(float(angle), 4),
                "centre_ras_mm": self.centre.round(4).tolist(),
                "translation_ras_mm": self.translation.round(4).tolist(),
                "definition": "y -> rotation @ (y - centre) + centre + translation",
            },
            "elastic": {
                "centres_ras_mm": self.elastic_centres.round(4).tolist(),
                "amplitudes_ras_mm": self.elastic_amplitudes.round(4).tolist(),
                "sigma_mm": self.elastic_sigma,
                "definition": "x -> x + sum_k a_k exp(-|x - c_k|^2 / (2 sigma^2)) (MR world)",
            },
            "probe_compression": {
                "axis_point_ras_mm": self.probe_point.round(4).tolist(),
                "axis_direction_ras": self.probe_axis.round(8).tolist(),
                "a_mm": round(self.compression, 4),
                "s_mm": self.compression_width,
                "definition": "z -> z + (a/s) z_perp exp(-|z_perp|^2 / (2 s^2)), z_perp = offset from the probe axis",
            },
            "composition": "phi = compression o rigid o elastic (MR world -> TRUS world)",
        }
