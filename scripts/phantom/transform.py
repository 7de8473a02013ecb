"""The phantom's known spatial transform from the MR world to the TRUS world, and its inverse.

``phi = I ∘ C ∘ R ∘ E ∘ S`` maps a point of the MR world (RAS mm) to the TRUS world (RAS mm):

- ``S``: sliding at the capsule (``realistic``; MR world, where the capsule is known exactly): the gland
  turns by a small angle about its centre while its surroundings do not, ``x + w(x) (Q - 1)(x - c)`` with
  ``w`` a logistic step of the gland's signed distance (width ``sliding_width_mm``): a thin shear layer at
  the capsule, not a cut, so ``phi`` stays one smooth diffeomorphism and its Jacobian and inverse are
  defined everywhere;
- ``E``: smooth elastic field, ``x + Σ_k a_k exp(-|x - c_k|² / 2σ_k²)``: random kernels around the gland,
  and in the ``realistic`` preset also a bladder-filling and a rectal-filling kernel;
- ``R``: rigid misalignment (patient position change), a rotation about the gland centre then a translation;
- ``C``: probe compression in the TRUS world, a radial push away from the probe axis,
  ``z + (a / s) z⊥ exp(-|z⊥|² / 2s²)`` with ``z⊥`` the component of ``z`` perpendicular to the axis;
- ``I``: probe indentation in the TRUS world (``realistic``): the flow of a divergence-free velocity
  (incompressible tissue, so the gland flattens in front of the balloon and bulges sideways), integrated
  in ``indentation_steps`` Euler steps. In the frame (l lateral, n towards the gland, a along the probe),
  ``v_n = P g (1 - l²/w_l²)``, ``v_l = P g l (n - n0)/w_n²``, ``v_a = 0`` with
  ``g = exp(-l²/2w_l² - (n - n0)²/2w_n² - (a - a0)²/2w_a²)``: ``div v = 0`` exactly, peak push ``P`` mm.

Each stage (each Euler step of ``I``) is the identity plus a field whose Jacobian has spectral norm
below 1, so all are diffeomorphisms and their inverses are found by fixed-point iteration
``x ← y - d(x)`` (a contraction), applied stage by stage in reverse order. Hand-written: no library
provides this analytic model.
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
    # realistic-preset stages; the defaults switch them off (the basic preset draws no random numbers for them)
    bladder_filling_mm: tuple[float, float] = (0.0, 0.0)  # push of the gland base, inferior-posterior
    rectal_filling_mm: tuple[float, float] = (0.0, 0.0)  # push of the posterior face, anterior (negative: emptier)
    filling_sigma_mm: float = 14.0  # width of the two filling kernels
    sliding_deg: tuple[float, float] = (0.0, 0.0)  # turn of the gland against its surroundings
    sliding_width_mm: float = 1.5  # width of the shear layer at the capsule
    indentation_mm: tuple[float, float] = (0.0, 0.0)  # P: peak push of the probe balloon
    indentation_width_mm: tuple[float, float, float] = (14.0, 11.0, 16.0)  # w_l, w_n, w_a
    indentation_depth_mm: tuple[float, float] = (2.0, 6.0)  # n0: kernel centre beyond the gland's posterior face
    indentation_steps: int = 6  # Euler steps of the flow (each step must stay a contraction)


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

    def __init__(
        self,
        rotation,
        centre,
        translation,
        elastic_centres,
        elastic_amplitudes,
        elastic_sigma,
        probe_point,
        probe_axis,
        compression,
        compression_width,
        tolerance=1e-6,
        max_iterations=100,
        sliding=None,
        indentation=None,
    ):
        """``elastic_sigma``: mm, one value or one per kernel. ``sliding``: None or dict(rotation (3, 3),
        width mm, level: callable (N, 3) MR-world mm -> (N,) signed distance to the capsule, mm, negative inside).
        ``indentation``: None or dict(push P mm, frame (3, 3) rows l, n, a, origin (3,) TRUS world mm of
        (l, n, a) = (0, n0, a0), widths (w_l, w_n, w_a) mm, steps)."""
        self.sliding, self.indentation = sliding, indentation
        self.rotation = np.asarray(rotation, float)
        self.centre = np.asarray(centre, float)
        self.translation = np.asarray(translation, float)
        self.elastic_centres = np.asarray(elastic_centres, float).reshape(-1, 3)
        self.elastic_amplitudes = np.asarray(elastic_amplitudes, float).reshape(-1, 3)
        self.elastic_sigma = np.asarray(elastic_sigma, float) if np.ndim(elastic_sigma) else float(elastic_sigma)
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
        # exp(-(|x|² - 2 x·c + |c|²) / 2σ²), in place: the same operations in the same order, fewer temporaries
        d2 = np.sum(x * x, axis=1)[:, None] - (2 * x) @ c.T
        d2 += np.sum(c * c, axis=1)
        np.negative(d2, out=d2)
        d2 /= 2 * self.elastic_sigma**2
        return np.exp(d2, out=d2)

    def elastic_displacement(self, x: np.ndarray) -> np.ndarray:
        """(N, 3) mm -> (N, 3) mm displacement of ``E`` (MR world)."""
        return self._kernels(x) @ self.elastic_amplitudes

    def elastic_jacobian(self, x: np.ndarray) -> np.ndarray:
        """(N, 3) -> (N, 3, 3) gradient of the elastic displacement, ``[n, i, j] = ∂d_i/∂x_j``."""
        g = self._kernels(x) / self.elastic_sigma**2  # (N, K)
        a = self.elastic_amplitudes
        # ∂d_i/∂x_j = -Σ_k g_k a_ki (x_j - c_kj)
        return -(
            np.einsum("nk,ki->ni", g, a)[:, :, None] * x[:, None, :]
            - np.einsum("nk,ki,kj->nij", g, a, self.elastic_centres)
        )

    def compression_displacement(self, z: np.ndarray) -> np.ndarray:
        """(N, 3) mm -> (N, 3) mm displacement of ``C`` (TRUS world): radial push away from the probe axis."""
        rel = z - self.probe_point
        perp = rel - (rel @ self.probe_axis)[:, None] * self.probe_axis
        s = self.compression_width
        return (self.compression / s) * perp * np.exp(-np.sum(perp**2, axis=1) / (2 * s * s))[:, None]

    def sliding_displacement(self, x: np.ndarray) -> np.ndarray:
        """(N, 3) MR-world mm -> (N, 3) mm displacement of ``S`` (zero without sliding)."""
        if self.sliding is None:
            return np.zeros_like(x)
        w = 1.0 / (1.0 + np.exp(np.clip(self.sliding["level"](x) / self.sliding["width"], -50, 50)))
        return w[:, None] * ((x - self.centre) @ (self.sliding["rotation"] - np.eye(3)).T)

    def indentation_velocity(self, z: np.ndarray) -> np.ndarray:
        """(N, 3) TRUS-world mm -> (N, 3) mm velocity of ``I`` (divergence-free; the whole flow moves ``P`` mm at the peak)."""
        ind = self.indentation
        l, n, a = ((z - ind["origin"]) @ ind["frame"].T).T
        wl, wn, wa = ind["widths"]
        l2 = l * l
        # g = P exp(-l²/2w_l² - n²/2w_n² - a²/2w_a²); v_l = g l n / w_n²; v_n = g (1 - l²/w_l²); in place
        e = l2 / -(2 * wl**2)
        e -= n * n / (2 * wn**2)
        e -= a * a / (2 * wa**2)
        g = np.exp(e, out=e)
        g *= ind["push"]
        v = np.zeros((len(l), 3))
        np.multiply(g, l, out=v[:, 0])
        v[:, 0] *= n
        v[:, 0] /= wn**2
        np.divide(l2, wl**2, out=v[:, 1])
        np.subtract(1, v[:, 1], out=v[:, 1])
        v[:, 1] *= g
        return v @ ind["frame"]

    def _indent(self, z: np.ndarray) -> np.ndarray:
        for _ in range(self.indentation["steps"]):
            z = z + self.indentation_velocity(z) / self.indentation["steps"]
        return z

    def _unindent(self, q: np.ndarray) -> tuple[np.ndarray, float]:
        worst, step = 0.0, lambda p: self.indentation_velocity(p) / self.indentation["steps"]
        for _ in range(self.indentation["steps"]):
            q, r = self._invert(q, step)
            worst = max(worst, r)
        return q, worst

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
        y = x + self.sliding_displacement(x) if self.sliding is not None else x
        z = self.rigid(y + self.elastic_displacement(y))
        z = z + self.compression_displacement(z)
        return self._indent(z) if self.indentation is not None else z

    def inverse(self, q: np.ndarray, return_residual: bool = False):
        """TRUS-world points (N, 3) RAS mm -> the MR-world points that ``forward`` maps onto them."""
        q = np.asarray(q, float).reshape(-1, 3)
        r0 = 0.0
        if self.indentation is not None:
            q, r0 = self._unindent(q)
        z, r1 = self._invert(q, self.compression_displacement)
        x, r2 = self._invert(self.rigid_inverse(z), self.elastic_displacement)
        r3 = 0.0
        if self.sliding is not None:
            x, r3 = self._invert(x, self.sliding_displacement)
        return (x, max(r0, r1, r2, r3)) if return_residual else x

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def random(
        cls,
        rng: np.random.Generator,
        gland_centre,
        probe_point,
        probe_axis,
        check_points,
        params: TransformParams = TransformParams(),  # noqa: B008 (a frozen dataclass: one shared default is safe)
        anatomy=None,
    ) -> "PhantomTransform":
        """Draw one case's transform; the elastic field is scaled so its Jacobian norm over ``check_points``
        (N, 3 MR-world mm, a grid covering both fields of view) stays below ``params.elastic_max_gradient``.
        ``anatomy`` (a :class:`scripts.phantom.anatomy.Anatomy`) places the realistic stages; with the
        default params none is drawn and no random number is spent on them."""
        angle = np.deg2rad(rng.uniform(*params.rotation_deg))
        rotation = rotation_matrix(_unit(rng), angle)
        translation = _unit(rng) * rng.uniform(*params.translation_mm)
        k = params.elastic_centres
        centres = np.asarray(gland_centre) + rng.normal(0, params.elastic_spread_mm, (k, 3))
        amplitudes = rng.normal(0, params.elastic_amplitude_mm, (k, 3))
        compression = rng.uniform(*params.compression_mm)
        t = cls(
            rotation,
            gland_centre,
            translation,
            centres,
            amplitudes,
            params.elastic_sigma_mm,
            probe_point,
            probe_axis,
            compression,
            params.compression_width_mm,
            params.inverse_tolerance_mm,
            params.inverse_max_iterations,
        )
        norm = np.linalg.norm(t.elastic_jacobian(np.asarray(check_points, float)), ord=2, axis=(1, 2)).max()
        if norm > params.elastic_max_gradient:
            t.elastic_amplitudes *= params.elastic_max_gradient / norm
        if compression / params.compression_width_mm >= 1:
            raise ValueError("compression_mm must stay below compression_width_mm to keep the transform invertible")
        if (
            max(
                params.bladder_filling_mm + params.rectal_filling_mm + params.sliding_deg + params.indentation_mm,
                key=abs,
            )
            != 0
        ):
            if anatomy is None:
                raise ValueError("the realistic transform stages need the anatomy")
            t._draw_realistic(rng, params, anatomy)
        return t

    def _draw_realistic(self, rng, p: TransformParams, anat) -> None:
        """Add the filling kernels to ``E``, and the sliding ``S`` and indentation ``I`` stages."""
        radii = anat.gland_radii
        # bladder filling pushes the base inferior-posterior; rectal filling pushes the posterior face anterior
        base = anat.gland_centre + np.array([0.0, 0.0, radii[2]])
        rectal = np.array([anat.rectum_xy[0], anat.rectum_xy[1] + anat.rectum_radius, anat.gland_centre[2]])
        push = np.array([[0.0, -0.35, -1.0] / np.linalg.norm([0.0, -0.35, -1.0]), [0.0, 1.0, 0.0]])
        amp = np.array([rng.uniform(*p.bladder_filling_mm), rng.uniform(*p.rectal_filling_mm)])[:, None] * push
        sigma = np.full(len(self.elastic_centres), float(self.elastic_sigma))
        self.elastic_centres = np.vstack([self.elastic_centres, base, rectal])
        self.elastic_amplitudes = np.vstack([self.elastic_amplitudes, amp])
        self.elastic_sigma = np.concatenate([sigma, [p.filling_sigma_mm] * 2])

        q = rotation_matrix(_unit(rng), np.deg2rad(rng.uniform(*p.sliding_deg)))
        scale = float(np.mean(radii))
        self.sliding = {
            "rotation": q,
            "width": p.sliding_width_mm,
            "angle_deg": float(np.degrees(np.arccos(np.clip((np.trace(q) - 1) / 2, -1, 1)))),
            "level": lambda x: anat.gland_level(x) * scale,
        }

        a_dir = self.probe_axis
        centre_us = self.rigid(anat.gland_centre[None])[0]
        rel = centre_us - self.probe_point
        n_dir = rel - (rel @ a_dir) * a_dir
        face = np.linalg.norm(n_dir) - radii[1] * (1 - anat.flattening)  # probe axis to the posterior face, mm
        n_dir /= np.linalg.norm(n_dir)
        frame = np.stack([np.cross(n_dir, a_dir), n_dir, a_dir])
        n0 = face + rng.uniform(*p.indentation_depth_mm)
        origin = self.probe_point + n0 * n_dir + (rel @ a_dir) * a_dir
        self.indentation = {
            "push": float(rng.uniform(*p.indentation_mm)),
            "frame": frame,
            "origin": origin,
            "widths": tuple(float(w) for w in p.indentation_width_mm),
            "steps": int(p.indentation_steps),
        }

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
                "sigma_mm": (
                    np.round(self.elastic_sigma, 4).tolist() if np.ndim(self.elastic_sigma) else self.elastic_sigma
                ),
                "definition": "x -> x + sum_k a_k exp(-|x - c_k|^2 / (2 sigma^2)) (MR world)",
            },
            "probe_compression": {
                "axis_point_ras_mm": self.probe_point.round(4).tolist(),
                "axis_direction_ras": self.probe_axis.round(8).tolist(),
                "a_mm": round(self.compression, 4),
                "s_mm": self.compression_width,
                "definition": "z -> z + (a/s) z_perp exp(-|z_perp|^2 / (2 s^2)), z_perp = offset from the probe axis",
            },
            **(
                {
                    "sliding": {
                        "rotation_matrix": self.sliding["rotation"].round(8).tolist(),
                        "angle_deg": round(self.sliding["angle_deg"], 4),
                        "shear_layer_width_mm": self.sliding["width"],
                        "definition": "x -> x + w(x) (Q - I)(x - centre), w = 1 / (1 + exp(d(x) / width)), d = gland signed "
                        "distance (mm, negative inside; MR world, applied first)",
                    }
                }
                if self.sliding
                else {}
            ),
            **(
                {
                    "probe_indentation": {
                        "peak_push_mm": round(self.indentation["push"], 4),
                        "frame_rows_l_n_a": self.indentation["frame"].round(8).tolist(),
                        "origin_ras_mm": self.indentation["origin"].round(4).tolist(),
                        "widths_mm": list(self.indentation["widths"]),
                        "euler_steps": self.indentation["steps"],
                        "definition": "flow of v_n = P g (1 - l^2/w_l^2), v_l = P g l n / w_n^2, v_a = 0, "
                        "g = exp(-l^2/2w_l^2 - n^2/2w_n^2 - a^2/2w_a^2) (TRUS world, applied last)",
                    }
                }
                if self.indentation
                else {}
            ),
            "composition": (
                "phi = indentation o compression o rigid o elastic o sliding (MR world -> TRUS world)"
                if self.indentation
                else "phi = compression o rigid o elastic (MR world -> TRUS world)"
            ),
        }
