"""Storage-order invariance of the rigid pre-alignment on phantom pairs (mr2us: fixed TRUS, moving MR).

Each pair is written again with flipped and/or permuted axes (same voxels at the same positions) and
``scripts.spatial.rigid.rigid_prealign`` is run on every copy, with the gland masks and by mutual information. Printed:
how far each copy's matrix moves the fixed gland voxels from the original's (mean and max, mm). The numbers of
``docs/pipeline.md`` ("Storage order"):

    ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 python benchmarks/storage_order.py --data data/realistic \
        --cases "[45,46,47,48,49,50]" --work /tmp/storage_order

(the "before" numbers: the same command with ``scripts/spatial/rigid.py`` of commit 3727d2c).
"""

from __future__ import annotations

import sys
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.data.nifti import write_nifti  # noqa: E402
from scripts.spatial.geometry import RAS2LPS, apply_affine  # noqa: E402
from scripts.spatial.rigid import rigid_prealign  # noqa: E402

# copy name -> (fixed, moving) nibabel orientation (new axis index, flip), "ras" (closest RAS+) or None (as stored)
VARIANTS = {
    "fixed flipped (axis 1)": ([[0, 1], [1, -1], [2, 1]], None),
    "fixed permuted (1, 2, 0)": ([[1, 1], [2, 1], [0, 1]], None),
    "moving flipped (axes 0, 2)": (None, [[0, -1], [1, 1], [2, -1]]),
    "both flipped and permuted": ([[2, -1], [0, 1], [1, 1]], [[1, 1], [0, -1], [2, 1]]),
    "both in closest RAS+ order": ("ras", "ras"),
}


def _write(folder: Path, tag: str, images: dict, orientations: dict) -> dict:
    """Write every image and gland mask in the storage order ``orientations[role]``; return their paths."""
    paths = {}
    for role, (data, mask, affine) in images.items():
        ornt = orientations.get(role)
        ornt = io_orientation(affine) if isinstance(ornt, str) else ornt
        if ornt is not None:
            ornt = np.asarray(ornt, float)
            data, mask, affine = (
                apply_orientation(data, ornt),
                apply_orientation(mask, ornt),
                affine @ inv_ornt_aff(ornt, data.shape[:3]),
            )
        paths[role] = write_nifti(data, affine, folder / f"{tag}_{role}.nii.gz", overwrite=True)
        paths[f"{role}_mask"] = write_nifti(mask, affine, folder / f"{tag}_{role}_mask.nii.gz", overwrite=True)
    return paths


def main(data: str = "data/realistic", split: str = "holdout", cases=(45,), work: str = "/tmp/storage_order") -> None:
    """Print, per case, method and copy, the mean and max distance (mm) between the copy's and the original's
    rigid maps of the fixed gland voxels."""
    for number in cases:
        name = f"case{int(number):06d}"
        folder = Path(work) / name
        folder.mkdir(parents=True, exist_ok=True)
        images = {}
        for role, modality in (("fixed", "us"), ("moving", "mr")):
            image = nib.load(Path(data) / split / f"{modality}_images" / f"{name}.nii.gz")
            labels = nib.load(Path(data) / split / f"{modality}_labels" / f"{name}.nii.gz")
            gland = np.asarray(labels.dataobj)[..., 0].astype(np.uint8)
            images[role] = (np.asarray(image.dataobj, np.float32), gland, image.affine)
        original = _write(folder, "original", images, {})
        fixed_gland = images["fixed"][1]
        voxels = np.c_[np.argwhere(fixed_gland > 0), np.ones(int((fixed_gland > 0).sum()))]
        points = voxels @ (RAS2LPS @ images["fixed"][2])[:3].T  # LPS mm
        for method in ("masks", "mutual information"):

            def run(p):
                masks = (p["fixed_mask"], p["moving_mask"]) if method == "masks" else ()
                return rigid_prealign(p["fixed"], p["moving"], *masks)[0]

            reference = apply_affine(run(original), points)
            for tag, (fixed, moving) in VARIANTS.items():
                copy = _write(folder, tag.split(" (")[0].replace(" ", "_"), images, {"fixed": fixed, "moving": moving})
                distance = np.linalg.norm(apply_affine(run(copy), points) - reference, axis=1)
                print(
                    f"{name} {method:18s} {tag:28s} mean {distance.mean():.2e} mm  max {distance.max():.2e} mm",
                    flush=True,
                )


if __name__ == "__main__":
    fire.Fire(main)
