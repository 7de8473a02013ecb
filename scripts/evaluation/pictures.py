"""Pictures of one registered case (PNG) and the HTML index of a folder run.

Per case folder (written by :meth:`scripts.inference.registrar.Registrar.register`):

- ``qa_contours.png``: the fixed image on three planes (normal to its voxel axes, through the gland
  centre) with the moving gland contour before (rigid only) and after registration, and the fixed gland;
- ``qa_checkerboard.png``: fixed and warped moving image in alternating squares, same planes;
- ``qa_grid.png``: a regular grid of the fixed plane deformed by the deformable part u, over det J.

Slices are drawn in voxel index space with the voxel aspect ratio (an oblique grid is shown as stored).
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from scipy import ndimage  # noqa: E402

from scripts.data.nifti import atomic_write, load_array, read_nifti, write_text  # noqa: E402
from scripts.evaluation.metrics import jacobian_determinant  # noqa: E402
from scripts.evaluation.qc import deformable_part, gland_mask  # noqa: E402
from scripts.spatial.composed import compose_field, read_field_nifti, warp  # noqa: E402
from scripts.spatial.geometry import lps_affine  # noqa: E402

__all__ = ["PICTURES", "case_pictures", "write_index"]

PICTURES = {"contours": "qa_contours.png", "checkerboard": "qa_checkerboard.png", "grid": "qa_grid.png"}
COLOURS = {"fixed": "yellow", "before": "red", "after": "lime"}


def _normalise(image, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Percentile ``low``..``high`` -> [0, 1], clipped (for display)."""
    lo, hi = np.percentile(image, [low, high])
    return np.clip((image - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def _plane(volume, axis: int, index: int) -> np.ndarray:
    """The 2-D slice normal to voxel ``axis``, transposed for ``imshow(origin="lower")``."""
    return np.take(volume, index, axis=axis).T


def _aspect(spacing, axis: int) -> float:
    rest = [s for a, s in enumerate(spacing) if a != axis]
    return rest[1] / rest[0]


def _centre(masks, shape) -> list[int]:
    """Voxel index of the first non-empty mask's centre of mass, else of the grid centre."""
    for mask in masks:
        if mask is not None and mask.any():
            return [int(round(c)) for c in ndimage.center_of_mass(mask)]
    return [n // 2 for n in shape]


def _save(fig, path, overwrite):
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"), overwrite)
    plt.close(fig)


def _contours(fixed, spacing, centre, masks: dict, title, path, overwrite):
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for axis, ax in enumerate(axes):
        ax.imshow(_plane(fixed, axis, centre[axis]), cmap="gray", origin="lower", aspect=_aspect(spacing, axis))
        for name, mask in masks.items():
            plane = _plane(mask, axis, centre[axis]) if mask is not None else None
            if plane is not None and plane.any() and not plane.all():
                ax.contour(
                    plane,
                    levels=[0.5],
                    colors=COLOURS[name],
                    linewidths=1.2,
                    linestyles="dashed" if name == "fixed" else "solid",
                )
        ax.set_title(f"voxel axis {axis} = {centre[axis]}", fontsize=9)
        ax.axis("off")
    handles = [
        Line2D(
            [],
            [],
            color=COLOURS[k],
            ls="--" if k == "fixed" else "-",
            label={"fixed": "fixed gland", "before": "moving gland, rigid only", "after": "moving gland, registered"}[
                k
            ],
        )
        for k, m in masks.items()
        if m is not None
    ]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9)
    fig.suptitle(title, fontsize=10)
    _save(fig, path, overwrite)


def _checkerboard(fixed, warped, spacing, centre, square_mm, title, path, overwrite):
    a, b = _normalise(fixed), _normalise(warped)
    index = np.indices(fixed.shape)
    tiles = sum((index[k] * spacing[k] // square_mm).astype(int) for k in range(3)) % 2 == 0
    board = np.where(tiles, a, b)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2))
    for axis, ax in enumerate(axes):
        ax.imshow(_plane(board, axis, centre[axis]), cmap="gray", origin="lower", aspect=_aspect(spacing, axis))
        ax.set_title(f"voxel axis {axis} = {centre[axis]}", fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{title}: fixed / warped moving, {square_mm:g} mm squares", fontsize=10)
    _save(fig, path, overwrite)


def _grid(deform_mm, affine, centre, spacing, step: int, title, path, overwrite):
    """Deformed grid on the plane normal to voxel axis 2, over det J of u (voxel units of the fixed grid)."""
    u_vox = deform_mm @ np.linalg.inv(lps_affine(affine)[:3, :3]).T  # (X, Y, Z, 3) fixed voxels
    det = jacobian_determinant(np.moveaxis(u_vox, -1, 0))[:, :, centre[2]]
    i, j = np.meshgrid(np.arange(u_vox.shape[0]), np.arange(u_vox.shape[1]), indexing="ij")
    x, y = i + u_vox[:, :, centre[2], 0], j + u_vox[:, :, centre[2], 1]
    fig, ax = plt.subplots(figsize=(6, 5.5))
    shown = ax.imshow(det.T, origin="lower", cmap="coolwarm", vmin=0.0, vmax=2.0, aspect=spacing[1] / spacing[0])
    fig.colorbar(shown, ax=ax, shrink=0.8, label="det J of the deformable part")
    for r in range(0, x.shape[0], step):
        ax.plot(x[r, :], y[r, :], color="black", lw=0.7)
    for c in range(0, x.shape[1], step):
        ax.plot(x[:, c], y[:, c], color="black", lw=0.7)
    ax.set_title(
        f"{title}: deformation grid, voxel axis 2 = {centre[2]}\n"
        f"max |u| on this plane {np.linalg.norm(deform_mm[:, :, centre[2]], axis=-1).max():.1f} mm",
        fontsize=9,
    )
    ax.axis("off")
    _save(fig, path, overwrite)


def case_pictures(
    case_dir,
    moving_labels=None,
    fixed_gland=None,
    title: str | None = None,
    square_mm: float = 10.0,
    grid_step: int = 3,
    overwrite: bool = False,
) -> list[str]:
    """Write the three PNGs of a registered case folder; returns their paths.

    Args:
        moving_labels: the moving labels given to the registration (gland = channel 0), for the "before"
            contour; the "after" contour is the folder's warped label. Without it only the fixed gland is drawn.
        fixed_gland: gland mask on the fixed grid (3-D, or 4-D label -> channel 0), or ``None``.
        square_mm: checkerboard square size (mm). grid_step: grid line every this many fixed voxels.
    """
    case_dir = Path(case_dir)
    result = json.loads((case_dir / "result.json").read_text())
    title = title or case_dir.name
    fixed_img = read_nifti(result["fixed_image"], ndim=3, what="fixed image")
    fixed, affine = load_array(fixed_img, result["fixed_image"], "fixed image"), fixed_img.affine
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    rigid = np.asarray(result["rigid"]["matrix_lps_fixed_to_moving"], np.float64)
    masks = {"fixed": gland_mask(fixed_gland)[0] if fixed_gland is not None else None, "before": None, "after": None}
    if moving_labels is not None:
        moving, moving_affine = gland_mask(moving_labels, "moving label")
        rigid_only = compose_field(None, None, rigid, affine, fixed.shape)
        masks["before"] = warp(moving.astype(np.float32), moving_affine, rigid_only, affine) >= 0.5
    if "warped_label" in result["files"]:
        masks["after"] = gland_mask(case_dir / result["files"]["warped_label"], "warped label")[0]
    centre = _centre([masks["fixed"], masks["after"], masks["before"]], fixed.shape)
    paths = {k: case_dir / v for k, v in PICTURES.items()}
    _contours(fixed, spacing, centre, masks, title, paths["contours"], overwrite)
    warped = load_array(
        read_nifti(case_dir / result["files"]["warped_image"], 3, "warped image"),
        case_dir / result["files"]["warped_image"],
    )
    _checkerboard(fixed, warped, spacing, centre, square_mm, title, paths["checkerboard"], overwrite)
    field, _ = read_field_nifti(case_dir / result["files"]["forward_field"])
    _grid(deformable_part(field, affine, rigid), affine, centre, spacing, grid_step, title, paths["grid"], overwrite)
    return [str(p) for p in paths.values()]


# After the page loads, record on <body> how many images decoded (naturalWidth > 0), so a headless browser's
# DOM dump shows whether every picture loaded.
_CHECK_SCRIPT = """<script>
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var ok = images.filter(function (im) { return im.complete && im.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images-loaded", ok + "/" + images.length);
});
</script>"""


def _check_item(name: str, check: dict) -> str:
    value = "-" if check["value"] is None else f"{check['value']:.4g}"
    status = "ok" if check["ok"] else "<b>fails</b>" + (" (verdict fail)" if check.get("severity") == "fail" else "")
    return f"<li>{html.escape(name)}: {value} (needs {html.escape(check['rule'])} {check['threshold']}) {status}</li>"


def write_index(out_dir, cases: list[dict], overwrite: bool = False) -> str:
    """Write ``out_dir/index.html``: one row per case with its verdict, reasons, main numbers and pictures.

    ``cases``: dicts with ``case`` (its sub-folder of ``out_dir``), ``qc`` (the ``qc.json`` content) and
    ``pictures`` (paths); links are relative, so the folder can be moved or served as is.
    """
    out_dir = Path(out_dir)
    rows = []
    for item in cases:
        qc, name = item["qc"], html.escape(str(item["case"]))
        checks = "".join(_check_item(k, c) for k, c in qc["checks"].items())
        images = "".join(
            f'<a href="{html.escape(os.path.relpath(p, out_dir))}"><img src="{html.escape(os.path.relpath(p, out_dir))}"'
            f' alt="{html.escape(Path(p).stem)} of {name}" height="180"></a>'
            for p in item["pictures"]
        )
        rows.append(
            f'<tr class="{qc["verdict"]}"><td>{name}</td><td class="verdict">{qc["verdict"]}</td>'
            f"<td><ul>{checks}</ul></td><td>{images}</td></tr>"
        )
    counts = ", ".join(f"{sum(item['qc']['verdict'] == v for item in cases)} {v}" for v in ("pass", "warn", "fail"))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Registration QC</title>
<style>body{{font-family:sans-serif}} td{{vertical-align:top;padding:4px;border-bottom:1px solid #ccc}}
tr.warn .verdict{{background:#f4b400;font-weight:bold}} tr.pass .verdict{{background:#8bc34a}}
tr.fail .verdict{{background:#d32f2f;color:#fff;font-weight:bold}}</style></head>
<body><h1>Registration QC: {len(cases)} cases ({counts})</h1>
<table><tr><th>case</th><th>verdict</th><th>checks</th><th>pictures</th></tr>
{chr(10).join(rows)}
</table>
{_CHECK_SCRIPT}
</body></html>
"""
    return str(write_text(page, out_dir / "index.html", overwrite))
