"""The μ-RegPro organisers' evaluation code and this bundle's ``official`` mode, on the same labels.

The challenge was scored by the organisers' TensorFlow code (repository muregpro/Baseline-Networks: ``metrics.py``
and the metric part of ``evaluation.py``). This benchmark runs that code unmodified on seeded label sets built to
hold what a re-implementation can get wrong — soft warped borders, a landmark that vanishes, one far off, one
missing in the fixed labels, one missing everywhere, a warped channel with no zero voxel, and both grid orders of
the array resize (upsampling, and downsampling with anti-aliasing) — keeps its numbers as test fixtures, and
compares this bundle's ``official`` mode with them:

    # 1. a label set (numpy and scipy only); --grids fixed_larger (TRUS -> MR: the resize upsamples) or
    #    fixed_smaller (MR -> TRUS: it downsamples)
    python benchmarks/muregpro_official.py make --seed 0 --grids fixed_larger \\
        --out tests/data/muregpro_official/seed0_fixed_larger.npz
    # 2. the organisers' code on it, in an environment like their Dockerfile's (TensorFlow 2.13 with its Keras 2,
    #    scikit-image 0.20); REPO is a clone of muregpro/Baseline-Networks
    python3 -m venv /tmp/mureg
    /tmp/mureg/bin/pip install tensorflow-cpu==2.13.1 scikit-image==0.20.0 scipy==1.10.1 tqdm
    /tmp/mureg/bin/python benchmarks/muregpro_official.py organisers --repo REPO \\
        --labels tests/data/muregpro_official/seed0_fixed_larger.npz \\
        --out tests/data/muregpro_official/seed0_fixed_larger.json
    # 3. this bundle's official mode on the same labels, against their numbers
    python benchmarks/muregpro_official.py compare --labels tests/data/muregpro_official/seed0_fixed_larger.npz \\
        --reference tests/data/muregpro_official/seed0_fixed_larger.json

Label sets hold 7 cases of 6 channels (the organisers' evaluation loops over 6: gland + 5 landmarks) as uint8 in
``(N, X, Y, Z, C)`` (their files' channel-last order); the labels are those values / 255. Grids are μ-RegPro's
divided by 4 (MR 30 x 32 x 32, TRUS 20 x 29 x 22) to keep the fixtures small. ``make`` and ``organisers`` import
neither torch nor this bundle, so they run in the organisers' environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GRIDS = {"mr": (30, 32, 32), "trus": (20, 29, 22)}
METRICS = ("DSC", "RDSC", "TRE", "RTRE", "RTs", "HD95", "TRE_0", "RTRE_0", "RTs_0", "HD95_0", "score")
# names of the same numbers in the organisers' evaluation.py
THEIR_NAMES = {
    "DSC": "fin_DSC",
    "RDSC": "fin_RDSC",
    "TRE": "fin_TRE",
    "RTRE": "fin_RTRE",
    "RTs": "fin_RTs",
    "HD95": "fin_HD95",
    "TRE_0": "fin_lim_TRE",
    "RTRE_0": "fin_lim_RTRE",
    "RTs_0": "fin_lim_RTs",
    "HD95_0": "fin_lim_HD95",
    "score": "score",
}


def _ellipsoid(shape, centre, radii) -> np.ndarray:
    """Boolean ``shape`` mask of an ellipsoid given in fractions of each axis (voxel centres at (i + 0.5) / n)."""
    axes = [(np.arange(n) + 0.5) / n for n in shape]
    grid = np.meshgrid(*axes, indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def _soft(mask: np.ndarray, sigma: float) -> np.ndarray:
    """A soft warped label: the mask blurred by a Gaussian (voxels), as uint8 of 255ths."""
    from scipy import ndimage

    return np.round(255 * ndimage.gaussian_filter(mask.astype(np.float64), sigma)).astype(np.uint8)


def make_labels(seed: int, grids: str, n_cases: int = 7) -> dict:
    """Seeded fixed, moving and warped labels (uint8 255ths, ``(N, X, Y, Z, 6)``) with the special channels.

    Anatomy per case, in fractions of the field of view: a gland ellipsoid and 5 spherical landmarks inside it.
    Fixed labels: the anatomy on the fixed grid. Moving: shifted by up to 0.1, on the moving grid. Warped (the
    prediction): shifted by up to 0.06 from the fixed one, blurred (sigma 0.3-0.8 voxel), on the fixed grid.
    Special channels: case 1 landmark 1 vanished in the warped labels; case 2 landmark 2 shifted 0.3 (far off);
    case 3 landmark 3 empty in all three; case 4 landmark 4 empty in the fixed labels only; case 5 landmark 5
    warped with a floor of 1/255 (no zero voxel); case 6 landmark 5 empty in the moving labels.
    """
    if grids not in ("fixed_larger", "fixed_smaller"):
        raise ValueError(f"grids must be fixed_larger or fixed_smaller, got {grids!r}")
    fixed_shape, moving_shape = (
        (GRIDS["mr"], GRIDS["trus"]) if grids == "fixed_larger" else (GRIDS["trus"], GRIDS["mr"])
    )
    rng = np.random.default_rng(seed)
    out = {k: [] for k in ("fixed", "moving", "warped")}
    for case in range(n_cases):
        gland_c = 0.5 + rng.uniform(-0.05, 0.05, 3)
        gland_r = rng.uniform(0.22, 0.32, 3)
        shapes = [(gland_c, gland_r)]
        for _ in range(5):
            shapes.append((gland_c + rng.uniform(-0.6, 0.6, 3) * gland_r, np.full(3, rng.uniform(0.05, 0.09))))
        moving_shift, warped_shift = rng.uniform(-0.1, 0.1, 3), rng.uniform(-0.06, 0.06, 3)
        sigma = rng.uniform(0.3, 0.8)
        fixed, moving, warped = [], [], []
        for ch, (c, r) in enumerate(shapes):
            f = _ellipsoid(fixed_shape, c, r)
            m = _ellipsoid(moving_shape, c + moving_shift, r)
            w_centre = c + warped_shift + (0.3 if (case, ch) == (2, 2) else 0.0)
            w = _soft(_ellipsoid(fixed_shape, w_centre, r), sigma)
            if (case, ch) == (1, 1):
                w[:] = 0
            if (case, ch) == (3, 3):
                f[:], m[:], w[:] = False, False, 0
            if (case, ch) == (4, 4):
                f[:] = False
            if (case, ch) == (5, 5):
                w = np.maximum(w, 1)
            if (case, ch) == (6, 5):
                m[:] = False
            fixed.append(f.astype(np.uint8) * 255)
            moving.append(m.astype(np.uint8) * 255)
            warped.append(w)
        out["fixed"].append(np.stack(fixed, -1))
        out["moving"].append(np.stack(moving, -1))
        out["warped"].append(np.stack(warped, -1))
    return {k: np.stack(v) for k, v in out.items()}


def make(seed: int = 0, grids: str = "fixed_larger", out: str = "labels.npz") -> str:
    """Write a label set (see :func:`make_labels`) as a compressed ``.npz``; refuses to overwrite."""
    path = Path(out)
    if path.exists():
        raise SystemExit(f"{path} exists; remove it first")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, seed=seed, grids=grids, **make_labels(seed, grids))
    return str(path)


def read_labels(path) -> dict:
    """A label set as float64 arrays in [0, 1], ``(N, X, Y, Z, C)``."""
    with np.load(path) as data:
        return {k: data[k].astype(np.float64) / 255.0 for k in ("fixed", "moving", "warped")}


def organisers(repo: str, labels: str, out: str) -> dict:
    """Score a label set with the organisers' ``metrics.py`` and the metric part of their ``evaluation.py``.

    Their labels pass through their ``data_generator.resize_3d_image`` per channel, as their ``test_generator``
    does; the warped labels stand in for their model's moved labels. The lines of ``evaluation.py`` from
    ``all_dscs = []`` to the end (metrics, channel dropping, score) run as they are. Also recorded: their HD95 of
    each case and channel (their ``HD95`` on one case) and their per-case centroid errors (``centroid_maes``).
    """
    repo = Path(repo).resolve()
    sys.path.insert(0, str(repo))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import metrics as their
    import tensorflow as tf
    from data_generator import resize_3d_image

    def hd95(y_true, y_pred):
        # their HD95 hands TensorFlow tensors to scikit-image's resize, which 0.20 (their Dockerfile's pin) refuses
        # ("Cannot interpret 'tf.float64' as a data type"); the same values go in as numpy arrays
        return their.HD95(np.asarray(y_true), np.asarray(y_pred))

    data = read_labels(labels)
    n, n_channels = data["fixed"].shape[0], data["fixed"].shape[-1]
    if n_channels != 6:
        raise SystemExit(f"{labels}: the organisers' evaluation loops over 6 channels, this set has {n_channels}")

    def generator_form(arr):  # test_generator: each channel resized to its own grid (x, y, z, 1), normalised
        return [np.stack([resize_3d_image(arr[i, ..., c], arr.shape[1:4] + (1,)) for i in range(n)]) for c in range(6)]

    ns = {
        "np": np,
        "tf": tf,
        "all_labels_fixed_labels": generator_form(data["fixed"]),
        "all_labels_moving_labels": generator_form(data["moving"]),
        "all_labels_moved_labels": [data["warped"][..., c][..., None] for c in range(6)],
        **{k: getattr(their, k) for k in ("DSC", "RDSC", "centroid_maes", "TRE", "RTRE", "RTs")},
        "HD95": hd95,
    }
    source = (repo / "evaluation.py").read_text()
    exec(compile(source[source.index("all_dscs = []") :], str(repo / "evaluation.py"), "exec"), ns)

    def t(x):
        return tf.convert_to_tensor(x, dtype=tf.double)

    fixed, moved, moving = ns["all_labels_fixed_labels"], ns["all_labels_moved_labels"], ns["all_labels_moving_labels"]
    per_case = {
        "hd95": [[float(hd95(fixed[c][i : i + 1], moved[c][i : i + 1])) for c in range(6)] for i in range(n)],
        "hd95_0": [[float(hd95(fixed[c][i : i + 1], moving[c][i : i + 1])) for c in range(6)] for i in range(n)],
        "errors": np.stack([their.centroid_maes(t(fixed[c]), t(moved[c])).numpy() for c in range(6)], 1).tolist(),
        "errors0": np.stack([their.centroid_maes(t(fixed[c]), t(moving[c])).numpy() for c in range(6)], 1).tolist(),
    }
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    result = {
        "labels": Path(labels).name,
        "code": {"repository": "muregpro/Baseline-Networks", "commit": commit.strip()},
        "environment": _versions(),
        "metrics": {name: float(ns[THEIR_NAMES[name]]) for name in METRICS},
        "per_case": per_case,
    }
    path = Path(out)
    if path.exists():
        raise SystemExit(f"{path} exists; remove it first")
    path.write_text(json.dumps(result, indent=4) + "\n")
    return result["metrics"]


def _versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("tensorflow-cpu", "keras", "scikit-image", "scipy", "numpy")} | {
        "python": sys.version.split()[0]
    }


def ours(labels) -> dict:
    """This bundle's ``official`` mode on a label set: the metrics and per-case tables, in :func:`organisers`' form."""
    sys.path.insert(0, str(ROOT))
    from scripts.evaluation.metrics import aggregate, case_metrics

    data = {k: np.moveaxis(v, -1, 1) for k, v in read_labels(labels).items()}  # (N, C, X, Y, Z)
    cases = [case_metrics(f, w, m, "official") for f, w, m in zip(data["fixed"], data["warped"], data["moving"])]
    agg = aggregate(cases, "official")
    return {
        "metrics": {**agg["metrics"], **agg["references"]},
        "per_case": {k: [c[OUR_PER_CASE[k]] for c in cases] for k in THEIR_PER_CASE},
    }


THEIR_PER_CASE = ("hd95", "hd95_0", "errors", "errors0")
OUR_PER_CASE = {"hd95": "hd95_channels", "hd95_0": "hd95_0_channels", "errors": "errors", "errors0": "errors0"}


def compare(labels: str, reference: str) -> float:
    """Print this bundle's official metrics next to the organisers' on one label set; returns the largest difference."""
    theirs = json.loads(Path(reference).read_text())
    mine = ours(labels)
    print(f"{'metric':8} {'organisers':>12} {'this bundle':>12} {'difference':>11}")
    worst = 0.0
    for name in METRICS:
        a, b = theirs["metrics"][name], mine["metrics"][name]
        worst = max(worst, abs(a - b))
        print(f"{name:8} {a:12.7f} {b:12.7f} {abs(a - b):11.2e}")
    for key in THEIR_PER_CASE:
        diff = np.abs(np.asarray(theirs["per_case"][key], float) - np.asarray(mine["per_case"][key], float)).max()
        worst = max(worst, float(diff))
        print(f"per case and channel, {key}: largest difference {diff:.2e}")
    return worst


if __name__ == "__main__":
    import fire

    fire.Fire({"make": make, "organisers": organisers, "compare": compare})
