"""A hand-made oblique MR/TRUS-like pair with an analytic rigid and deformation (shared by the geometry tests).

Everything is defined on LPS mm points, independently of the bundle's code: the fixed grid is oblique
and anisotropic, the moving grid is axis-permuted and flipped, the rigid R maps fixed -> moving points
and the deformation u has distinct x, y and z components.
"""

import numpy as np

RAS2LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def rotation(axis, degrees):
    """Rodrigues rotation matrix."""
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    a = np.deg2rad(degrees)
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def grid(direction_lps, spacing, shape, centre_lps):
    """nibabel (RAS) affine of a grid with the given LPS direction columns, spacing and centre."""
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(direction_lps, float) * spacing
    lps[:3, 3] = np.asarray(centre_lps, float) - lps[:3, :3] @ ((np.array(shape) - 1) / 2)
    return RAS2LPS @ lps


def points(affine_ras, shape):
    """LPS mm voxel centres (X, Y, Z, 3), computed directly from the affine."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
    lps = RAS2LPS @ affine_ras
    return idx @ lps[:3, :3].T + lps[:3, 3]


FIX_SHAPE = (30, 28, 26)
FIX = grid(rotation((1, 2, 3), 20), [1.0, 1.2, 1.1], FIX_SHAPE, [0, 0, 0])
MOV_SHAPE = (36, 34, 32)
MOV = grid([[0, 0, -1], [1, 0, 0], [0, -1, 0]], [1.0, 1.0, 1.0], MOV_SHAPE, [1, -1, 0.5])
RIGID = np.eye(4)
RIGID[:3, :3] = rotation((0, 0.3, 1), 8)
RIGID[:3, 3] = [2.0, -1.5, 1.0]


def u(p):
    """Deformable part (LPS mm) at LPS points (..., 3)."""
    return np.stack([2.0 * np.sin(p[..., 1] / 7), 1.5 * np.cos(p[..., 2] / 6), 1.0 * np.sin(p[..., 0] / 5 + 0.3)], -1)


def full_map(p):
    """The analytic fixed -> moving map R(p + u(p))."""
    q = p + u(p)
    return q @ RIGID[:3, :3].T + RIGID[:3, 3]


def image(q):
    """Moving intensities at moving LPS points."""
    return (
        100 * np.exp(-np.sum((q - [3, -2, 1]) ** 2, -1) / 40)
        + 40 * np.exp(-np.sum((q + [4, 3, -2]) ** 2, -1) / 20)
        + q[..., 0]
    )


def gland(q):
    """Gland (ellipsoid) indicator at moving LPS points."""
    return (np.sum(((q - [1, 0, 0]) / [8, 6, 7]) ** 2, -1) < 1).astype(np.float32)


def dice(a, b):
    a, b = a > 0.5, b > 0.5
    return 2 * np.sum(a & b) / (np.sum(a) + np.sum(b))
