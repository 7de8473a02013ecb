"""Map points (CSV, 3D Slicer markups) and label volumes between moving and fixed space through written transforms.

The transforms are the files :func:`scripts.pipeline.register_pair` writes into a case folder
(``docs/pipeline.md``), both displacement fields in LPS mm:

- ``transform_moving_to_fixed.nii.gz`` on the MOVING grid: a moving point q lands at ``q + w(q)`` in fixed space;
- ``transform_fixed_to_moving.nii.gz`` on the FIXED grid: a fixed point p lands at ``p + u(p)`` in moving space.

So a point goes to fixed space through the first file and back through the second (fields sampled
linearly at the point); a label volume goes the other way round: labels on the moving grid are *pulled*
onto the fixed grid through the second file (``out(p) = label(p + u(p))``), fixed labels onto the moving
grid through the first. File formats (``docs/biopsy.md``):

- point CSV: a header naming the columns ``label,x,y,z`` (any order, extra columns ignored), one point a
  row, in millimetres of the frame given by ``frame`` ("LPS" or "RAS");
- 3D Slicer markups JSON (``.mrk.json``, schema v1.0.3): every control point of every point-only markup
  (Fiducial, Line, Angle, Curve, ClosedCurve) is mapped; the output keeps the input's content and each
  markup's ``coordinateSystem``, with only the positions replaced.
"""

from __future__ import annotations

import copy
import csv
import io
from pathlib import Path

import numpy as np

from scripts.geometry import RAS2LPS, sample, world_to_voxel
from scripts.io import InputError, load_array, read_json, read_nifti, write_json, write_nifti, write_text
from scripts.transform_io import read_field_nifti, warp

__all__ = [
    "FRAMES",
    "MARKUPS_SCHEMA",
    "FIELD_FOR_POINTS",
    "FIELD_FOR_LABELS",
    "to_lps",
    "from_lps",
    "read_points_csv",
    "write_points_csv",
    "read_markups",
    "write_markups",
    "transform_points",
    "map_point_file",
    "map_label_file",
    "map_files",
]

FRAMES = ("LPS", "RAS")
MARKUPS_SCHEMA = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/"
    "markups-schema-v1.0.3.json#"
)
POINT_MARKUPS = ("Fiducial", "Line", "Angle", "Curve", "ClosedCurve")  # geometry = the control points only
# target space -> the case-folder file that maps points into it / that pulls label volumes into it
FIELD_FOR_POINTS = {"fixed": "transform_moving_to_fixed.nii.gz", "moving": "transform_fixed_to_moving.nii.gz"}
FIELD_FOR_LABELS = {"fixed": "transform_fixed_to_moving.nii.gz", "moving": "transform_moving_to_fixed.nii.gz"}
CSV_COLUMNS = ("label", "x", "y", "z")


def _frame(frame: str) -> str:
    frame = str(frame).upper()
    if frame not in FRAMES:
        raise InputError(f"frame must be one of {FRAMES}, got {frame!r}")
    return frame


def to_lps(points, frame: str) -> np.ndarray:
    """(N, 3) points in ``frame`` ("LPS"/"RAS") mm -> LPS mm (RAS flips the first two axes)."""
    points = np.asarray(points, np.float64).reshape(-1, 3)
    return points if _frame(frame) == "LPS" else points * RAS2LPS[:3, :3].diagonal()


def from_lps(points_lps, frame: str) -> np.ndarray:
    """(N, 3) LPS mm -> ``frame`` mm (the flip is its own inverse)."""
    return to_lps(points_lps, frame)


def read_points_csv(path, frame: str = "LPS") -> tuple[list[str], np.ndarray]:
    """Read a point CSV (header with ``label,x,y,z``); returns ``(labels, points (N, 3) LPS mm)``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: point file does not exist")
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    header = {k.strip().lower(): k for k in (rows[0].keys() if rows else [])}
    missing = [c for c in CSV_COLUMNS if c not in header]
    if not rows or missing:
        raise InputError(f"{path}: a point CSV needs a header with columns {','.join(CSV_COLUMNS)} and at least "
                         f"one row (missing: {missing or 'rows'})")
    labels, points = [], []
    for n, row in enumerate(rows, start=2):
        try:
            points.append([float(row[header[c]]) for c in "xyz"])
        except (TypeError, ValueError):
            raise InputError(f"{path}: line {n}: x, y, z must be numbers, got {[row[header[c]] for c in 'xyz']}") from None
        labels.append(str(row[header["label"]]).strip())
    points = np.asarray(points)
    if not np.isfinite(points).all():
        raise InputError(f"{path}: coordinates must be finite numbers")
    return labels, to_lps(points, frame)


def write_points_csv(labels, points_lps, path, frame: str = "LPS", overwrite: bool = False) -> Path:
    """Write ``label,x,y,z`` rows (mm in ``frame``) for (N, 3) LPS points."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for label, p in zip(labels, from_lps(points_lps, frame)):
        writer.writerow([label, *(f"{v:.4f}" for v in p)])
    return write_text(buffer.getvalue(), path, overwrite)


def read_markups(path) -> tuple[dict, list[tuple[int, int]], np.ndarray]:
    """Read a 3D Slicer markups file.

    Returns ``(document, refs, points)``: the parsed JSON, ``(markup index, control point index)`` of every
    mapped control point (positions defined, point-only markup types), and their (N, 3) LPS mm positions.
    """
    path = Path(path)
    document = read_json(path, "markups file")
    if not isinstance(document, dict) or "markups" not in document or "@schema" not in document:
        raise InputError(f"{path}: not a 3D Slicer markups file (needs '@schema' and 'markups')")
    refs, points = [], []
    for m, markup in enumerate(document["markups"]):
        kind = markup.get("type")
        if kind not in POINT_MARKUPS:
            raise InputError(f"{path}: markup {m} has type {kind!r}; only {POINT_MARKUPS} can be mapped point by point")
        frame = markup.get("coordinateSystem", "LPS")
        if frame not in FRAMES:
            raise InputError(f"{path}: markup {m} has coordinateSystem {frame!r}, expected LPS or RAS")
        for c, point in enumerate(markup.get("controlPoints", [])):
            if "position" not in point or point.get("positionStatus", "defined") != "defined":
                continue  # an unplaced point has no position to map
            position = np.asarray(point["position"], np.float64)
            if position.shape != (3,) or not np.isfinite(position).all():
                raise InputError(f"{path}: markup {m} control point {c}: position must be 3 finite numbers")
            refs.append((m, c))
            points.append(to_lps(position, frame)[0])
    if not refs:
        raise InputError(f"{path}: no placed control points to map")
    return document, refs, np.asarray(points)


def write_markups(document: dict, refs, points_lps, path, overwrite: bool = False) -> Path:
    """Write a copy of a markups ``document`` with the control points ``refs`` moved to ``points_lps``.

    Each position is written in its markup's own ``coordinateSystem``; everything else is kept.
    """
    out = copy.deepcopy(document)
    for (m, c), p in zip(refs, np.asarray(points_lps)):
        markup = out["markups"][m]
        markup["controlPoints"][c]["position"] = [float(v) for v in from_lps(p, markup.get("coordinateSystem", "LPS"))[0]]
    return write_json(out, path, overwrite)


def transform_points(points_lps, field_path, names=None, source=None) -> np.ndarray:
    """Map (N, 3) LPS mm points through a displacement-field file: ``p + field(p)`` (linear sampling).

    The field is only known on its grid, so a point outside the grid's voxel edges raises
    :class:`InputError` (naming the point and ``source``; a wrong ``frame`` is the usual cause).
    """
    field, affine = read_field_nifti(field_path)
    points = np.asarray(points_lps, np.float64).reshape(-1, 3)
    index = world_to_voxel(points, affine)
    outside = ~np.all((index >= -0.5) & (index <= np.asarray(field.shape[:3]) - 0.5), axis=-1)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        name = names[i] if names is not None else i
        raise InputError(
            f"{source or 'points'}: point {name!r} at LPS {np.round(points[i], 2).tolist()} mm lies outside the grid "
            f"of {field_path} ({int(outside.sum())} of {len(points)} points); check the coordinate frame (LPS/RAS)"
        )
    return points + sample(field, affine, points)


def _output_name(path, to: str) -> str:
    name = Path(path).name
    for suffix in (".mrk.json", ".json", ".csv", ".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return f"{name[: -len(suffix)]}_to_{to}{suffix}"
    raise InputError(f"{path}: unknown file type (expected .csv, .mrk.json, .json, .nii or .nii.gz)")


def map_point_file(path, field_path, out_path, frame: str = "LPS", overwrite: bool = False) -> Path:
    """Map one point file (CSV in ``frame``, or markups JSON) through a field file; write the same format."""
    if str(path).lower().endswith(".json"):
        document, refs, points = read_markups(path)
        names = [document["markups"][m]["controlPoints"][c].get("label", f"{m}:{c}") for m, c in refs]
        return write_markups(document, refs, transform_points(points, field_path, names, path), out_path, overwrite)
    labels, points = read_points_csv(path, frame)
    return write_points_csv(labels, transform_points(points, field_path, labels, path), out_path, frame, overwrite)


def map_label_file(path, field_path, out_path, threshold: float = 0.5, overwrite: bool = False) -> Path:
    """Pull a 3-D or 4-D (channel-last) label volume onto a field's grid: ``out(p) = label(p + field(p))``.

    Linear interpolation then ``>= threshold``, as the pipeline does for its warped labels; uint8 output
    on the field's grid (affine).
    """
    img = read_nifti(path, ndim=(3, 4), what="label")
    labels = load_array(img, path, "label")
    field, affine = read_field_nifti(field_path)
    hard = warp(labels, img.affine, field, affine) >= threshold
    return write_nifti(hard.astype(np.uint8), affine, out_path, overwrite)


def map_files(transforms, output_dir, points=None, labels=None, to: str = "fixed", frame: str = "LPS",
              label_threshold: float = 0.5, overwrite: bool = False) -> list[str]:
    """Map point files and label volumes of one registered case into ``to`` space ("fixed" or "moving").

    Args:
        transforms: the case folder written by the registration (holds both ``transform_*.nii.gz``).
        output_dir: where the mapped files go, named ``<input name>_to_<to>.<same suffix>``.
        points: a point file or a list of them (CSV in ``frame``, or ``.mrk.json``), in the other space.
        labels: a label volume or a list of them (NIfTI on the other space's image grid).
        label_threshold: binarisation of the linearly interpolated labels.
    Returns:
        the written paths.
    """
    if to not in FIELD_FOR_POINTS:
        raise InputError(f"to must be 'fixed' or 'moving', got {to!r}")
    _frame(frame)
    as_list = lambda x: [] if x is None else [x] if isinstance(x, (str, Path)) else list(x)  # noqa: E731
    points, labels = as_list(points), as_list(labels)
    if not points and not labels:
        raise InputError("nothing to map: give points (CSV or .mrk.json) and/or labels (NIfTI)")
    folder, out = Path(transforms), Path(output_dir)
    jobs = [(p, folder / FIELD_FOR_POINTS[to], out / _output_name(p, to)) for p in points]
    jobs += [(v, folder / FIELD_FOR_LABELS[to], out / _output_name(v, to)) for v in labels]
    for _, field, target in jobs:
        if not field.is_file():
            raise InputError(f"{field}: transform file does not exist (is {folder} a registration output folder?)")
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target}: already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    written = [map_point_file(p, f, t, frame, overwrite) for p, f, t in jobs[: len(points)]]
    written += [map_label_file(v, f, t, label_threshold, overwrite) for v, f, t in jobs[len(points):]]
    return [str(w) for w in written]
