"""One PNG per phantom case: orthogonal MR and TRUS slices through the gland with the label contours."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["save_preview"]

COLOURS = ("yellow", "cyan", "red", "magenta", "lime", "orange")  # label channels 0..5


def _slices(volume, centre):
    c = np.clip(np.round(centre).astype(int), 0, np.array(volume.shape[:3]) - 1)
    return [volume[c[0]], volume[:, c[1]], volume[:, :, c[2]]]


def save_preview(
    path: str, mr, mr_label, mr_centre, us, us_label, us_centre, title: str = "", mr_truth=None, us_truth=None
) -> None:
    """Write a 2×3 panel PNG to ``path`` (a temporary file: the caller renames it).

    mr, us: (X, Y, Z) images; *_label: (X, Y, Z, 6) binary; *_centre: voxel index (3,) the slices pass through;
    *_truth: the analytic labels (X, Y, Z, 6) of presets with an observer, drawn dashed beside the observer's
    solid contours (None: no truth contours). Panels show voxel axes as stored (first row MR, second TRUS;
    columns: planes normal to axes 0, 1, 2).
    """
    fig, axes = plt.subplots(2, 3, figsize=(9, 6), dpi=70)
    rows = (("MR", mr, mr_label, mr_truth, mr_centre), ("TRUS", us, us_label, us_truth, us_centre))
    for row, (name, img, lab, truth, c) in enumerate(rows):
        drawn = [(lab, "solid")] + ([] if truth is None else [(truth, "dashed")])
        for col, sl in enumerate(_slices(img, c)):
            ax = axes[row, col]
            ax.imshow(sl.T, cmap="gray", origin="lower", interpolation="nearest")
            for volume, style in drawn:
                for ch in range(volume.shape[-1]):
                    cut = _slices(volume[..., ch], c)[col]
                    if cut.any() and cut.min() == 0:
                        ax.contour(cut.T, levels=[0.5], colors=COLOURS[ch], linewidths=0.8, linestyles=style)
            ax.set_title(f"{name} axis {col} = {int(np.round(c[col]))}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    key = "" if mr_truth is None and us_truth is None else "; solid observer, dashed truth"
    fig.suptitle(f"{title}  (yellow gland, cyan urethra, red/magenta/lime/orange landmarks 2-5{key})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
