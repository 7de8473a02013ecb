"""How hard is the phantom? Classical ANTs registrations on synthetic MR–TRUS cases, both directions.

``python benchmarks/phantom_difficulty.py --cases 20 --size full --work /tmp/phantom_difficulty``
generates the cases (scripts/phantom.py), registers each pair with ANTs (antspyx) and writes
docs/phantom_difficulty.md. Methods: no registration (world alignment), ANTs Rigid (Mattes MI),
ANTs SyN on the images (Mattes MI), ANTs SyN on the true gland masks (mean squares: an oracle
that sees the answer for the gland), and the stored ground-truth field (a check of the field
convention: it should score near-perfectly). Metrics on the fixed grid: gland Dice and clinical
TRE, the Euclidean distance in mm between label centroids of channels 1-5 present in both the
fixed and the warped moving labels (mean over those channels per case). Every ANTs run starts
from the identity (the images share a roughly aligned world frame); antspy's default
centre-of-mass start is thrown far off by the differing fields of view.

Per-pair results go to ``<work>/results.jsonl`` as they finish, so an interrupted run resumes.
Set ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS to bound ANTs' threads.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the bundle root, for `scripts`

import ants  # noqa: E402
import nibabel as nib  # noqa: E402

from scripts.data import case_name  # noqa: E402
from scripts.io import write_text  # noqa: E402
from scripts.phantom import synth  # noqa: E402

METHODS = ("none", "ants_rigid_mi", "ants_syn_mi", "ants_syn_masks", "true_field")
LABELS = {
    "none": "no registration",
    "ants_rigid_mi": "ANTs Rigid, images (Mattes MI)",
    "ants_syn_mi": "ANTs SyN, images (Mattes MI)",
    "ants_syn_masks": "ANTs SyN, true gland masks (oracle)",
    "true_field": "stored ground-truth field (sanity check)",
}


def _label_channels(path: Path, like: ants.ANTsImage) -> list:
    data = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    return [like.new_image_like(np.ascontiguousarray(data[..., c])) for c in range(data.shape[-1])]


def _centroid_mm(img: ants.ANTsImage, affine: np.ndarray):
    idx = np.argwhere(img.numpy() > 0.5)
    return None if len(idx) == 0 else affine[:3, :3] @ idx.mean(0) + affine[:3, 3]


def _score(fixed_labels, warped, fixed_affine) -> dict:
    f, w = fixed_labels[0].numpy() > 0.5, warped[0].numpy() > 0.5
    dice = 2 * np.logical_and(f, w).sum() / max(f.sum() + w.sum(), 1)
    dists, lost = [], 0
    for c in range(1, len(fixed_labels)):
        a = _centroid_mm(fixed_labels[c], fixed_affine)
        if a is None:
            continue
        b = _centroid_mm(warped[c], fixed_affine)
        if b is None:
            lost += 1
            continue
        dists.append(float(np.linalg.norm(a - b)))
    return {
        "dice": float(dice),
        "tre_mm": float(np.mean(dists)) if dists else None,
        "landmarks": len(dists),
        "landmarks_lost": lost,
    }


def ants_transforms(method: str, fixed, moving, seed: int, fixed_mask=None, moving_mask=None) -> list:
    """ANTs forward transforms (fixed -> moving, for ``ants.apply_transforms``) of one classical method.

    "ants_rigid_mi" / "ants_syn_mi": Rigid / affine + SyN on the images, Mattes MI (the antspyx
    defaults otherwise); "ants_syn_masks": affine + SyN on two gland masks (ANTs images), mean squares.
    Every run starts from the identity (see the module docstring).
    """
    if method == "ants_syn_masks":
        reg = ants.registration(
            fixed_mask,
            moving_mask,
            type_of_transform="SyN",
            aff_metric="meansquares",
            syn_metric="meansquares",
            random_seed=seed,
            initial_transform="Identity",
        )
    else:
        reg = ants.registration(
            fixed,
            moving,
            type_of_transform="Rigid" if method == "ants_rigid_mi" else "SyN",
            aff_metric="mattes",
            syn_metric="mattes",
            random_seed=seed,
            initial_transform="Identity",
        )
    return reg["fwdtransforms"]


def ants_warp_labels(fixed, moving, transforms, label_path) -> np.ndarray:
    """The moving labels (NIfTI, 3-D or channel-last 4-D, on ``moving``'s grid) through ANTs ``transforms`` onto
    ``fixed``'s grid: each channel linear, thresholded at 0.5; uint8 (X, Y, Z, C)."""
    labels = np.asarray(nib.load(str(label_path)).dataobj, dtype=np.float32)
    labels = labels if labels.ndim == 4 else labels[..., None]
    warped = [
        ants.apply_transforms(
            fixed, moving.new_image_like(np.ascontiguousarray(labels[..., c])), transforms, interpolator="linear"
        ).numpy()
        for c in range(labels.shape[-1])
    ]
    return (np.stack(warped, -1) >= 0.5).astype(np.uint8)


def register_pair(root: Path, split: str, case: str, direction: str, seed: int) -> dict:
    """All methods for one case and direction ("mr2us": MR moving onto TRUS; "us2mr": TRUS onto MR)."""
    fix_mod, mov_mod = ("us", "mr") if direction == "mr2us" else ("mr", "us")
    d = root / split
    fixed = ants.image_read(str(d / f"{fix_mod}_images" / f"{case}.nii.gz"))
    moving = ants.image_read(str(d / f"{mov_mod}_images" / f"{case}.nii.gz"))
    fixed_labels = _label_channels(d / f"{fix_mod}_labels" / f"{case}.nii.gz", fixed)
    moving_labels = _label_channels(d / f"{mov_mod}_labels" / f"{case}.nii.gz", moving)
    fixed_affine = nib.load(str(d / f"{fix_mod}_images" / f"{case}.nii.gz")).affine
    out = {"case": case, "split": split, "direction": direction}

    def warp(transforms):
        return [ants.apply_transforms(fixed, m, transforms, interpolator="linear") for m in moving_labels]

    for method in METHODS:
        t0 = time.time()
        if method == "none":
            warped = [ants.resample_image_to_target(m, fixed, interp_type="linear") for m in moving_labels]
        elif method == "true_field":
            warped = warp([str(d / f"ddf_{direction}" / f"{case}.nii.gz")])
        else:
            warped = warp(ants_transforms(method, fixed, moving, seed, fixed_labels[0], moving_labels[0]))
        out[method] = {**_score(fixed_labels, warped, fixed_affine), "seconds": round(time.time() - t0, 1)}
    return out


def _summary(rows: list, directions) -> str:
    lines = []
    for direction in directions:
        sel = [r for r in rows if r["direction"] == direction]
        if not sel:
            continue
        lines += [
            f"\n### {direction} ({'MR moving, TRUS fixed' if direction == 'mr2us' else 'TRUS moving, MR fixed'}),"
            f" {len(sel)} cases\n",
            "| method | gland Dice mean ± sd | Dice median | TRE mm mean ± sd | TRE median | landmarks lost | s/pair |",
            "|---|---|---|---|---|---|---|",
        ]
        for m in METHODS:
            dice = np.array([r[m]["dice"] for r in sel])
            tre = np.array([r[m]["tre_mm"] for r in sel if r[m]["tre_mm"] is not None])
            lost = sum(r[m]["landmarks_lost"] for r in sel)
            secs = np.mean([r[m]["seconds"] for r in sel])
            lines.append(
                f"| {LABELS[m]} | {dice.mean():.3f} ± {dice.std():.3f} | {np.median(dice):.3f} | "
                f"{tre.mean():.2f} ± {tre.std():.2f} | {np.median(tre):.2f} | {lost} | {secs:.0f} |"
            )
    return "\n".join(lines) + "\n"


def run(
    cases: int = 20,
    seed: int = 0,
    size: str = "full",
    work: str = "/tmp/phantom_difficulty",
    out: str = "docs/phantom_difficulty.md",
    directions: str = "mr2us,us2mr",
    overwrite: bool = False,
    report_only: bool = False,
) -> str:
    """Generate ``cases`` phantom cases in ``work``/data (reused if present), register, and write ``out``.

    ``report_only`` writes the report from the pairs already in ``work``/results.jsonl without registering more.
    Returns the path of the written Markdown report.
    """
    directions = directions.split(",") if isinstance(directions, str) else list(directions)
    work = Path(work)
    root = work / "data"
    if not (root / "phantom.json").is_file():
        synth(str(root), cases=cases, seed=seed, size=size, preview=False)
    meta = json.loads((root / "phantom.json").read_text())
    results = work / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    done = {(r["case"], r["direction"]) for r in rows}
    pairs = sorted((case_name(p.name), p.parent.parent.name) for p in root.glob("*/mr_images/*.nii.gz"))
    for case, split in pairs:
        for direction in directions:
            if (case, direction) in done or report_only:
                continue
            row = register_pair(root, split, case, direction, seed)
            rows.append(row)
            with results.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    n_done = len({r["case"] for r in rows})
    text = (
        f"# Phantom difficulty: classical registration on {n_done} of {meta['cases']} `{meta['size']}` cases"
        f" (seed {meta['seed']})\n\n"
        f"Generated by `benchmarks/phantom_difficulty.py`; see docs/phantom.md for the phantom.\n"
        + _summary(rows, directions)
    )
    write_text(text, out, overwrite=overwrite)
    return out


if __name__ == "__main__":
    import fire

    fire.Fire(run)
