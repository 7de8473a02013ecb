"""How far the phantom's true maps move the gland: the calibration of QC's ``max_gland_shift_mm`` (docs/biopsy.md).

For every case of a phantom folder, QC's own ``gland_shift`` of the true MR -> TRUS point map
(``ddf_us2mr/<case>.nii.gz``: on the MR grid, each MR point's displacement to TRUS, LPS mm) over the MR gland's
voxels, i.e. the distance a perfect mr2us registration moves the gland's centroid:

    python benchmarks/qc_gland_shift.py --data data/realistic
"""

from __future__ import annotations

import sys
from pathlib import Path

import fire
import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.evaluation.qc import gland_shift  # noqa: E402
from scripts.spatial.composed import read_field_nifti  # noqa: E402
from scripts.spatial.geometry import RAS2LPS  # noqa: E402


def main(data: str = "data/realistic", splits: str = "train,val,holdout") -> None:
    """Print the minimum, median and maximum true gland shift (mm) over the cases of ``splits``."""
    shifts = []
    for split in splits.split(","):
        for field_path in sorted((Path(data) / split / "ddf_us2mr").glob("*.nii.gz")):
            labels = nib.load(Path(data) / split / "mr_labels" / field_path.name)
            gland = np.argwhere(np.asarray(labels.dataobj)[..., 0] > 0.5)
            points = np.c_[gland, np.ones(len(gland))] @ (RAS2LPS @ labels.affine)[:3].T
            field, affine = read_field_nifti(field_path)
            shifts.append(gland_shift(field, affine, np.eye(4), points))
    print(
        f"{len(shifts)} cases of {data}: true gland shift min {min(shifts):.1f}, median {np.median(shifts):.1f}, "
        f"max {max(shifts):.1f} mm"
    )


if __name__ == "__main__":
    fire.Fire(main)
