"""μ-RegPro data → MONAI data dicts, with every file checked before training or inference starts.

A dataset is either a μ-RegPro-layout folder::

    <dataset_dir>/<split>/mr_images/caseNNNNNN.nii.gz    3-D MR image
    <dataset_dir>/<split>/us_images/caseNNNNNN.nii.gz    3-D TRUS image
    <dataset_dir>/<split>/mr_labels/caseNNNNNN.nii.gz    4-D (X, Y, Z, C) labels on the MR grid, channel 0 = gland
    <dataset_dir>/<split>/us_labels/caseNNNNNN.nii.gz    4-D (X, Y, Z, C) labels on the TRUS grid, same C

or a JSON datalist ``{"<split>": [{"case": ..., "mr_image": ..., "us_image": ..., "mr_label": ..., "us_label": ...}]}``
whose relative paths are resolved against the JSON file's folder. A single-channel label may also be
stored 3-D. Each returned dict names the moving and fixed files for the chosen direction:
``"mr2us"`` (moving MR, fixed TRUS: the paper) or ``"us2mr"`` (moving TRUS, fixed MR: the challenge).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from scripts.data.nifti import InputError, load_array, read_json, read_nifti, write_json

MODALITY_DIRS = {"mr_image": "mr_images", "us_image": "us_images", "mr_label": "mr_labels", "us_label": "us_labels"}
DIRECTIONS = {"mr2us": ("mr", "us"), "us2mr": ("us", "mr")}  # direction -> (moving, fixed) modality
NAMES = {"mr": "MR", "us": "TRUS"}

__all__ = [
    "load_split",
    "find_cases",
    "read_datalist",
    "check_case",
    "with_direction",
    "write_datalist",
    "DIRECTIONS",
    "check_direction",
    "case_cache_key",
    "settings_cache_key",
    "prime_cache",
]


def find_cases(dataset_dir: str | Path, split: str) -> list[dict]:
    """List the cases of one split of a μ-RegPro-layout folder as dicts of the four file paths.

    The four sub-folders must hold the same case names; otherwise :class:`InputError` names the
    files that have no partner.
    """
    root = Path(dataset_dir) / split
    if not root.is_dir():
        raise InputError(f"{root}: split folder does not exist")
    names = {}
    for key, sub in MODALITY_DIRS.items():
        folder = root / sub
        if not folder.is_dir():
            raise InputError(
                f"{folder}: folder is missing (a μ-RegPro split needs {', '.join(MODALITY_DIRS.values())})"
            )
        names[key] = {p.name for p in folder.iterdir() if p.name.endswith((".nii", ".nii.gz"))}
    every = set().union(*names.values())
    if not every:
        raise InputError(f"{root}: no NIfTI cases found")
    for key, have in names.items():
        for name in sorted(every - have):
            present = next(k for k in MODALITY_DIRS if name in names[k])
            raise InputError(
                f"{root / MODALITY_DIRS[key] / name}: missing, but {root / MODALITY_DIRS[present] / name} exists "
                "(every case needs an MR image, a TRUS image and both label files)"
            )
    return _unique_names(
        [
            {"case": case_name(name), **{key: str(root / MODALITY_DIRS[key] / name) for key in MODALITY_DIRS}}
            for name in sorted(every)
        ],
        root,
    )


def case_name(file_name: str) -> str:
    """A case's name: its file name without ``.nii.gz`` / ``.nii`` (dots inside the name are kept: ``pt.A``)."""
    for suffix in (".nii.gz", ".nii"):
        if file_name.endswith(suffix):
            return file_name[: -len(suffix)]
    return file_name


def _unique_names(cases: list[dict], source) -> list[dict]:
    """``cases`` unchanged, or an :class:`InputError` when two share a name (their output folders would)."""
    seen = {}
    for case in cases:
        if case["case"] in seen:
            raise InputError(
                f"{source}: two cases are named {case['case']!r} ({seen[case['case']]} and "
                f"{case['mr_image']}); each case needs its own name"
            )
        seen[case["case"]] = case["mr_image"]
    return cases


def read_datalist(datalist: str | Path, split: str) -> list[dict]:
    """Read one split of a JSON datalist (see module docstring); relative paths are taken from the JSON's folder."""
    path = Path(datalist)
    content = read_json(path, "datalist file")
    if split not in content:
        raise InputError(f"{path}: has no split {split!r} (found {sorted(content)})")
    cases = []
    for i, entry in enumerate(content[split]):
        missing = [k for k in MODALITY_DIRS if k not in entry]
        if missing:
            raise InputError(f"{path}: entry {i} of {split!r} lacks {missing}")
        case = {k: str((path.parent / entry[k]).resolve()) for k in MODALITY_DIRS}
        cases.append({"case": str(entry.get("case", case_name(Path(entry["mr_image"]).name))), **case})
    return _unique_names(cases, path)


def check_case(case: dict) -> dict:
    """Check the four files of one case; return the number of label channels as ``{"channels": C}``.

    Checks: readable NIfTI; images 3-D and finite; labels 3-D (C = 1) or 4-D channel-last, finite,
    on their image's grid (shape and affine), with a non-empty gland (channel 0); MR and TRUS labels
    with the same C. Raises :class:`InputError` naming the offending file.
    """
    channels = {}
    for mod in ("mr", "us"):
        img_path, lab_path = case[f"{mod}_image"], case[f"{mod}_label"]
        img = read_nifti(img_path, ndim=3, what=f"{NAMES[mod]} image")
        load_array(img, img_path, f"{NAMES[mod]} image")
        lab = read_nifti(lab_path, ndim=(3, 4), what=f"{NAMES[mod]} label")
        if tuple(lab.shape[:3]) != tuple(img.shape):
            raise InputError(
                f"{lab_path}: label grid {tuple(lab.shape[:3])} differs from its image's {tuple(img.shape)} ({img_path})"
            )
        if not np.allclose(lab.affine, img.affine, atol=1e-3):
            raise InputError(f"{lab_path}: label affine differs from its image's affine ({img_path})")
        data = load_array(lab, lab_path, f"{NAMES[mod]} label")
        gland = data if data.ndim == 3 else data[..., 0]
        if not (gland > 0).any():
            raise InputError(f"{lab_path}: gland label (channel 0) is empty")
        channels[mod] = 1 if data.ndim == 3 else data.shape[3]
    if channels["mr"] != channels["us"]:
        raise InputError(
            f"{case['us_label']}: has {channels['us']} label channels but {case['mr_label']} has {channels['mr']}"
        )
    return {"channels": channels["mr"]}


def check_direction(direction) -> str:
    """``direction`` if it is "mr2us" or "us2mr", else an :class:`InputError`."""
    if direction not in DIRECTIONS:
        raise InputError(f"direction must be one of {sorted(DIRECTIONS)}, got {direction!r}")
    return direction


def with_direction(case: dict, direction: str) -> dict:
    """Add ``moving_*``/``fixed_*`` keys (and ``direction``) to a case dict of MR/TRUS paths."""
    check_direction(direction)
    moving, fixed = DIRECTIONS[direction]
    return {
        **case,
        "direction": direction,
        "moving_image": case[f"{moving}_image"],
        "fixed_image": case[f"{fixed}_image"],
        "moving_label": case[f"{moving}_label"],
        "fixed_label": case[f"{fixed}_label"],
    }


def load_split(
    dataset_dir: str | Path | None = None,
    split: str = "train",
    direction: str = "mr2us",
    datalist: str | Path | None = None,
    check: bool = True,
) -> list[dict]:
    """Data dicts of one split for a direction, from a μ-RegPro folder or a JSON datalist.

    Returns a list of dicts with ``case``, ``direction``, ``moving_image``, ``fixed_image``,
    ``moving_label``, ``fixed_label`` (paths) and the four MR/TRUS paths. With ``check`` every file
    is opened and validated (:func:`check_case`), and all cases must have the same label channel count.
    """
    if (dataset_dir is None) == (datalist is None):
        raise InputError("give exactly one of dataset_dir (a μ-RegPro folder) or datalist (a JSON file)")
    cases = find_cases(dataset_dir, split) if datalist is None else read_datalist(datalist, split)
    if check:
        first = None
        for case in cases:
            c = check_case(case)["channels"]
            first = first or (c, case["mr_label"])
            if c != first[0]:
                raise InputError(f"{case['mr_label']}: has {c} label channels but {first[1]} has {first[0]}")
    return [with_direction(case, direction) for case in cases]


def write_datalist(dataset_dir: str, out: str, splits: str = "train,val,holdout", overwrite: bool = False) -> str:
    """Write a JSON datalist of a μ-RegPro folder's splits (paths relative to ``out``'s folder); return its path."""
    out_path = Path(out).resolve()
    splits = splits.split(",") if isinstance(splits, str) else list(splits)
    content = {}
    for split in splits:
        if (Path(dataset_dir) / split).is_dir():
            content[split] = [
                {
                    "case": c["case"],
                    **{k: os.path.relpath(Path(c[k]).resolve(), out_path.parent) for k in MODALITY_DIRS},
                }
                for c in find_cases(dataset_dir, split)
            ]
    if not content:
        raise InputError(f"{dataset_dir}: none of the splits {splits} exist")
    write_json(content, out_path, overwrite=overwrite)
    return str(out_path)


def case_cache_key(item: dict) -> bytes:
    """``PersistentDataset`` key of a case dict: its entries plus each named file's size and modification time.

    A regenerated or edited input file therefore gets a new cache entry instead of a stale one.
    """
    files = {
        k: (os.stat(v).st_size, os.stat(v).st_mtime_ns)
        for k, v in item.items()
        if isinstance(v, (str, Path)) and os.path.isfile(v)
    }
    dump = json.dumps({"item": item, "files": files}, sort_keys=True, default=str)
    return hashlib.sha256(dump.encode()).hexdigest().encode()


# the pre-stage code's own version, part of the cache key: 2 = the rigid step in closest-RAS storage order
PRESTAGE_VERSION = 2


def settings_cache_key(transforms) -> bytes:
    """``PersistentDataset(hash_transform=...)`` key of the cached transforms: each one's class and settings.

    MONAI's own ``json_hashing`` cannot serialise transform objects and falls back to their class names,
    so a change of grid, depth crop or rigid settings would reuse a cache computed with the old ones.
    Here every transform's class and attributes enter the key, nested objects alike (other values, e.g. dtypes,
    by repr), and :data:`PRESTAGE_VERSION`, bumped when the pre-stage's code changes what it computes.
    """
    dump = json.dumps({"version": PRESTAGE_VERSION, "transforms": list(transforms)}, sort_keys=True, default=_settings)
    return hashlib.sha256(dump.encode()).hexdigest().encode()


def prime_cache(dataset, name: str = "cases") -> int:
    """Run a ``PersistentDataset``'s cached transforms for every case now; return the number of cases.

    Called first in ``run`` (``configs/train.json``), before the run folder is touched: each case's pre-stage is computed (or
    found in the cache) and so every file is read and checked, and a bad case stops the training with
    its :class:`InputError` before anything is written into the run folder. Cached cases cost a file read.
    """
    import logging

    log = logging.getLogger(__name__)
    for i, item in enumerate(dataset.data):
        dataset._cachecheck(item)  # MONAI's own compute-or-load of one cache entry (no public per-item call)
        log.info(f"pre-stage {name}: {i + 1}/{len(dataset.data)}")
    return len(dataset.data)


def _settings(obj):
    """JSON stand-in of an object for :func:`settings_cache_key`: its class and attributes, else its repr."""
    if hasattr(obj, "__dict__"):
        return {"class": type(obj).__module__ + "." + type(obj).__qualname__, **vars(obj)}
    return repr(obj)
