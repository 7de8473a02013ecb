"""How hard is the phantom? Ideal pre-stages and classical ANTs registrations on synthetic MR–TRUS cases.

``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 python benchmarks/phantom_difficulty.py --data data/difficulty_realistic
--work /work/difficulty_realistic --jobs 2 --out docs/phantom_difficulty_realistic.md`` registers every case of
a folder made by ``python -m scripts synth`` (every split), both directions, and writes the table
(docs/phantom_difficulty.md lists the commands that made the committed tables).

Methods: no registration (world alignment); the ideal rigid and ideal affine maps (least-squares fits of the
true transform over the gland, stored in each case's truth JSON by scripts/phantom/fit.py); ANTs Rigid and
ANTs affine + SyN on the images (Mattes MI); ANTs affine + SyN on the gland masks (mean squares), once on the
observer's masks (the label folders: what a user has) and once on the analytic masks (an oracle); the stored
ground-truth field (a check of the field convention). Every ANTs run starts from the identity (the images share
a roughly aligned world frame; antspy's default centre-of-mass start is thrown off by the differing fields of
view). Scores, on the fixed grid, against the analytic labels (``truth/``; the label folders for ``basic``):
gland Dice; TRE, the distance in mm between label centroids of channels 1-5 present in both the fixed and the
warped moving labels (mean over those channels per case); field error, |u - u_true| in mm over the fixed
image's true gland voxels (mean and 95th percentile per case), u the method's displacement field composed by
ANTs on the fixed grid.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the bundle root, for `scripts`

import ants  # noqa: E402
import nibabel as nib  # noqa: E402

from scripts.data.datalist import case_name  # noqa: E402
from scripts.data.nifti import write_nifti, write_text  # noqa: E402
from scripts.phantom.fit import apply_map  # noqa: E402
from scripts.phantom.synth import ddf_to_nifti_array, voxel_to_world  # noqa: E402

METHODS = (
    "none",
    "ideal_rigid",
    "ideal_affine",
    "ants_rigid_mi",
    "ants_syn_mi",
    "ants_syn_observer_masks",
    "ants_syn_true_masks",
    "true_field",
)
LABELS = {
    "none": "no registration",
    "ideal_rigid": "ideal rigid (fit to the truth)",
    "ideal_affine": "ideal affine (fit to the truth)",
    "ants_rigid_mi": "ANTs Rigid, images (Mattes MI)",
    "ants_syn_mi": "ANTs affine + SyN, images (Mattes MI)",
    "ants_syn_observer_masks": "ANTs affine + SyN, observer gland masks",
    "ants_syn_true_masks": "ANTs affine + SyN, true gland masks (oracle)",
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


def _ideal_field(fixed_affine: np.ndarray, shape, moving_to_fixed: np.ndarray) -> np.ndarray:
    """The ITK displacement field (X, Y, Z, 1, 3) float32, LPS mm, on the fixed grid of a 4×4 RAS map taking
    moving-world points to fixed-world points: fixed point p -> moving point M⁻¹ p."""
    p = voxel_to_world(fixed_affine, shape)
    return ddf_to_nifti_array(apply_map(np.linalg.inv(moving_to_fixed), p) - p, shape)


def _field_error(field_path, true_field: np.ndarray, gland: np.ndarray) -> dict:
    """Mean and 95th percentile (mm) of |u - u_true| over the fixed grid's true gland voxels; ``field_path`` an
    ITK displacement field on the fixed grid (None: the identity, i.e. no registration)."""
    u = 0.0 if field_path is None else np.asarray(nib.load(str(field_path)).dataobj, dtype=np.float32)
    err = np.linalg.norm((u - true_field).reshape(*gland.shape, 3)[gland], axis=-1)
    return {"field_error_mm": float(err.mean()), "field_error_p95_mm": float(np.percentile(err, 95))}


def register_pair(root: Path, split: str, case: str, direction: str, seed: int, scratch: Path) -> dict:
    """All methods for one case and direction ("mr2us": MR moving onto TRUS; "us2mr": TRUS onto MR).

    Scores use the analytic labels (``truth/<mod>_labels``) where the preset has an observer, else the label
    folders; "ants_syn_observer_masks" registers the observer's gland masks (the label folders).
    """
    fix_mod, mov_mod = ("us", "mr") if direction == "mr2us" else ("mr", "us")
    d = root / split
    truth = d / "truth" if (d / "truth" / f"{fix_mod}_labels" / f"{case}.nii.gz").is_file() else d
    fixed = ants.image_read(str(d / f"{fix_mod}_images" / f"{case}.nii.gz"))
    moving = ants.image_read(str(d / f"{mov_mod}_images" / f"{case}.nii.gz"))
    fixed_labels = _label_channels(truth / f"{fix_mod}_labels" / f"{case}.nii.gz", fixed)
    moving_labels = _label_channels(truth / f"{mov_mod}_labels" / f"{case}.nii.gz", moving)
    observer = [
        _label_channels(d / f"{mod}_labels" / f"{case}.nii.gz", img)[0]
        for mod, img in ((fix_mod, fixed), (mov_mod, moving))
    ]
    fixed_affine = nib.load(str(d / f"{fix_mod}_images" / f"{case}.nii.gz")).affine
    true_path = d / f"ddf_{direction}" / f"{case}.nii.gz"
    true_field = np.asarray(nib.load(str(true_path)).dataobj, dtype=np.float32)
    gland = fixed_labels[0].numpy() > 0.5
    fits = json.loads((d / "truth" / f"{case}.json").read_text())["ideal_fits"][direction]
    out = {"case": case, "split": split, "direction": direction}
    scratch.mkdir(parents=True, exist_ok=True)

    for method in METHODS:
        if method == "ants_syn_observer_masks" and truth == d:
            continue  # no observer: the same masks as the true-mask row
        t0 = time.time()
        if method == "none":
            field = None
            warped = [ants.resample_image_to_target(m, fixed, interp_type="linear") for m in moving_labels]
        else:
            if method == "true_field":
                transforms = [str(true_path)]
            elif method.startswith("ideal_"):
                field = scratch / f"{method}.nii.gz"
                key = "rigid" if method == "ideal_rigid" else "affine"
                matrix = np.asarray(fits[f"{key}_moving_to_fixed_ras"])
                write_nifti(_ideal_field(fixed_affine, fixed.shape, matrix), fixed_affine, field, True, "vector")
                transforms = [str(field)]
            else:
                masks = {
                    "ants_syn_observer_masks": observer,
                    "ants_syn_true_masks": (fixed_labels[0], moving_labels[0]),
                }
                if method in masks:
                    transforms = ants_transforms("ants_syn_masks", fixed, moving, seed, *masks[method])
                else:
                    transforms = ants_transforms(method, fixed, moving, seed)
            warped = [ants.apply_transforms(fixed, m, transforms, interpolator="linear") for m in moving_labels]
            field = ants.apply_transforms(fixed, moving, transforms, compose=str(scratch / f"{method}_"))
        seconds = time.time() - t0  # registration and label warping; the field error below is not timed
        out[method] = {
            **_score(fixed_labels, warped, fixed_affine),
            **_field_error(field, true_field, gland),
            "seconds": round(seconds, 1),
        }
    return out


def _pair_job(args) -> dict:
    root, split, case, direction, seed, scratch = args
    row = register_pair(Path(root), split, case, direction, seed, Path(scratch))
    shutil.rmtree(scratch)  # the composed fields (tens of MB per pair) are not kept
    return row


def _stats(values) -> str:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    return f"{v.mean():.2f} ± {v.std():.2f}" if len(v) else "—"


def _summary(rows: list, directions) -> str:
    lines = []
    for direction in directions:
        sel = [r for r in rows if r["direction"] == direction]
        if not sel:
            continue
        lines += [
            f"\n### {direction} ({'MR moving, TRUS fixed' if direction == 'mr2us' else 'TRUS moving, MR fixed'}),"
            f" {len(sel)} cases\n",
            "| method | gland Dice mean ± sd | Dice median | TRE mm mean ± sd | TRE median | landmarks lost "
            "| field error in gland mm | field p95 mm | s/pair |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for m in METHODS:
            have = [r[m] for r in sel if m in r]
            if not have:
                continue
            dice = np.array([x["dice"] for x in have])
            tre = [x["tre_mm"] for x in have]
            lines.append(
                f"| {LABELS[m]} | {dice.mean():.3f} ± {dice.std():.3f} | {np.median(dice):.3f} | {_stats(tre)} | "
                f"{np.median([t for t in tre if t is not None]):.2f} | {sum(x['landmarks_lost'] for x in have)} | "
                f"{_stats([x['field_error_mm'] for x in have])} | {_stats([x['field_error_p95_mm'] for x in have])} | "
                f"{np.mean([x['seconds'] for x in have]):.0f} |"
            )
    return "\n".join(lines) + "\n"


def run(
    data: str = "data/realistic",
    seed: int = 0,
    work: str = "/tmp/phantom_difficulty",
    out: str = "docs/phantom_difficulty.md",
    directions: str = "mr2us,us2mr",
    jobs: int = 1,
    overwrite: bool = False,
    report_only: bool = False,
) -> str:
    """Register every case of the phantom folder ``data`` (every split; made by ``python -m scripts synth``) with
    every method, both ``directions``, and write the Markdown table ``out``.

    Per-pair results are appended to ``work``/results.jsonl as they finish, so a rerun resumes; ``jobs`` pairs run
    in parallel processes (set ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 with jobs 2 on 2 cores). ``report_only``
    writes the report from the pairs already done. Returns the path of the written report.
    """
    directions = directions.split(",") if isinstance(directions, str) else list(directions)
    root, work = Path(data), Path(work)
    if not (root / "phantom.json").is_file():
        raise FileNotFoundError(f"{root}: no phantom.json; make the cases with `python -m scripts synth --out {root}`")
    meta = json.loads((root / "phantom.json").read_text())
    work.mkdir(parents=True, exist_ok=True)
    results = work / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    if rows and rows[0].get("data") not in (None, str(root.resolve())):
        raise ValueError(f"{results}: holds results of {rows[0]['data']}, not {root.resolve()}; use another --work")
    done = {(r["case"], r["direction"]) for r in rows}
    pairs = sorted((case_name(p.name), p.parent.parent.name) for p in root.glob("*/mr_images/*.nii.gz"))
    todo = [
        (str(root), split, case, direction, seed, str(work / "scratch" / f"{case}_{direction}"))
        for case, split in pairs
        for direction in directions
        if (case, direction) not in done and not report_only
    ]
    with multiprocessing.get_context("spawn").Pool(int(jobs)) if int(jobs) > 1 else nullcontext() as pool:
        for row in pool.imap_unordered(_pair_job, todo) if pool else map(_pair_job, todo):
            row["data"] = str(root.resolve())
            rows.append(row)
            with results.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    rows = [r for r in rows if r["direction"] in directions]
    text = (
        f"# Phantom difficulty: classical registration on {len({r['case'] for r in rows})} of {meta['cases']}"
        f" `{meta['size']}` cases, preset `{meta.get('preset', 'basic')}` (seed {meta['seed']}), synthetic\n\n"
        f"Generated by `benchmarks/phantom_difficulty.py`; see docs/phantom.md for the phantom.\n"
        + _summary(rows, directions)
    )
    write_text(text, out, overwrite=overwrite)
    return out


if __name__ == "__main__":
    import fire

    fire.Fire(run)
