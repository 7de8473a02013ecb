"""Map points (CSV, 3D Slicer markups) and label volumes between moving and fixed space through written transforms.

The transforms are the files :meth:`scripts.inference.registrar.Registrar.register` writes into a case folder
(``docs/pipeline.md``), both displacement fields in LPS mm:

- ``transform_moving_to_fixed.nii.gz`` on the MOVING grid: a moving point q lands at ``q + w(q)`` in fixed space;
- ``transform_fixed_to_moving.nii.gz`` on the FIXED grid: a fixed point p lands at ``p + u(p)`` in moving space.

So a point goes to fixed space through the first file and back through the second (fields sampled
linearly at the point); a label volume goes the other way round: labels on the moving grid are *pulled*
onto the fixed grid through the second file (``out(p) = label(p + u(p))``), fixed labels onto the moving
grid through the first. File formats (``docs/biopsy.md``):

- point CSV: a header naming the columns ``label,x,y,z`` and optionally ``frame`` (any order, any case; any
  other or repeated column is refused), one point a row, millimetres. The frame (LPS or RAS) is never
  assumed: it comes from the ``frame`` column (one value for the whole file), a ``# frame: LPS`` line
  before the header, or the caller's ``frame``; if the file and the caller disagree, or nobody states
  it, :class:`InputError`. A mapped CSV is written in the input's frame, with a ``frame`` column.
- 3D Slicer markups JSON (``.mrk.json``, schema v1.0.3): every control point of every point-only markup
  (Fiducial, Line, Angle, Curve, ClosedCurve) is mapped; each markup must state its ``coordinateSystem``
  (LPS or RAS, the caller's ``frame`` does not apply); the output keeps the input's content and each
  markup's ``coordinateSystem``, with only the positions replaced.
- label volume: see :func:`map_label_file` (binary, soft, or a 3-D integer label map split into channels).
"""

from __future__ import annotations

import copy
import csv
import io
import re
from pathlib import Path

import nibabel as nib
import numpy as np

from scripts.data.nifti import (
    InputError,
    atomic_write,
    load_array,
    read_json,
    read_nifti,
    refuse_existing,
    same_grid,
    write_json,
    write_text,
)
from scripts.spatial.composed import read_field_nifti, warp
from scripts.spatial.geometry import RAS_LPS_FLIP, sample, world_to_voxel

__all__ = [
    "FRAMES",
    "MARKUPS_SCHEMA",
    "FIELD_FOR_POINTS",
    "FIELD_FOR_LABELS",
    "CSV_COLUMNS",
    "MAX_LABEL_VALUES",
    "to_lps",
    "from_lps",
    "read_points_csv",
    "write_points_csv",
    "read_markups",
    "write_markups",
    "read_label",
    "transform_points",
    "check_point_files",
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
CSV_COLUMNS = ("label", "x", "y", "z", "frame")  # the accepted columns; all but "frame" are required
MAX_LABEL_VALUES = 64  # an integer label map with more distinct non-zero values is refused (an image, not labels?)
_FRAME_LINE = re.compile(r"#\s*frame\s*[:=]\s*(\S*)\s*", re.IGNORECASE)


def _frame(frame, where: str = "frame") -> str:
    """``frame`` ("LPS"/"RAS", any case) upper-cased; anything else (None included) is an :class:`InputError`."""
    value = str(frame).strip().upper()
    if value not in FRAMES:
        raise InputError(f"{where} must be LPS or RAS, got {frame!r}")
    return value


def to_lps(points, frame: str) -> np.ndarray:
    """(N, 3) points in ``frame`` ("LPS"/"RAS") mm -> LPS mm (RAS flips the first two axes)."""
    points = np.asarray(points, np.float64).reshape(-1, 3)
    return points if _frame(frame) == "LPS" else points * RAS_LPS_FLIP


def from_lps(points_lps, frame: str) -> np.ndarray:
    """(N, 3) LPS mm -> ``frame`` mm (the flip is its own inverse)."""
    return to_lps(points_lps, frame)


def _read_csv(path, frame=None) -> tuple[list[str], np.ndarray, str]:
    """:func:`read_points_csv`, also returning the frame the file was read in."""
    path, given = Path(path), None if frame is None else _frame(frame, "the frame passed")
    if not path.is_file():
        raise InputError(f"{path}: point file does not exist")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines(keepends=True)  # -sig: Excel's byte-order mark
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read the point file as UTF-8 text ({err})") from None
    stated = {}  # where the file states its frame -> the frame
    skip = 0  # blank and '#' lines before the header
    for skip, line in enumerate(lines):
        text = line.strip()
        if text and not text.startswith("#"):
            break
        match = _FRAME_LINE.fullmatch(text)
        if match:
            stated[f"line {skip + 1}, {text!r}"] = _frame(match.group(1), f"{path}: line {skip + 1}: the frame")
        elif "frame" in text.lower():
            raise InputError(
                f"{path}: line {skip + 1}: cannot read a frame from {text!r}; write '# frame: LPS' or '# frame: RAS'"
            )
    else:
        skip = len(lines)
    reader = csv.reader(io.StringIO("".join(lines[skip:])))
    header = next(reader, None)
    if header is None:
        raise InputError(f"{path}: empty point file; expected a header line label,x,y,z[,frame] and one point a line")
    at = f"{path}: line {skip + 1}"
    names = [h.strip().lower() for h in header]
    for name in names:
        if names.count(name) > 1:
            raise InputError(f"{at}: column {name!r} appears {names.count(name)} times in the header")
        if name not in CSV_COLUMNS:
            raise InputError(f"{at}: unknown column {name!r}; the accepted columns are {', '.join(CSV_COLUMNS)}")
    missing = [c for c in CSV_COLUMNS[:4] if c not in names]
    if missing:
        raise InputError(
            f"{at}: missing column(s) {', '.join(missing)}; a point CSV needs the columns label, x, y, z "
            "(and a 'frame' column or a '# frame: LPS' first line)"
        )
    labels, points, frames = [], [], {}
    for row in reader:
        line = f"line {skip + reader.line_num}"
        at = f"{path}: {line}"
        if not row:
            continue  # a blank line
        if len(row) != len(names):
            raise InputError(f"{at}: {len(row)} fields, but the header names {len(names)} columns")
        values = dict(zip(names, (v.strip() for v in row)))
        try:
            point = [float(values[c]) for c in "xyz"]
        except ValueError:
            raise InputError(f"{at}: x, y, z must be numbers (mm), got {[values[c] for c in 'xyz']}") from None
        if not np.isfinite(point).all():
            raise InputError(f"{at}: x, y, z must be finite numbers (mm), got {[values[c] for c in 'xyz']}")
        if "frame" in values:
            frames.setdefault(_frame(values["frame"], f"{at}: the frame"), line)
        labels.append(values["label"])
        points.append(point)
    if not points:
        raise InputError(f"{path}: no points, only the header")
    if len(frames) > 1:
        raise InputError(
            f"{path}: the 'frame' column mixes {' and '.join(f'{f} ({w})' for f, w in frames.items())}; "
            "one file holds one frame"
        )
    stated.update({f"its 'frame' column, {w}": f for f, w in frames.items()})
    if len(set(stated.values())) > 1:
        raise InputError(f"{path}: the file states two frames: {'; '.join(f'{f} in {w}' for w, f in stated.items())}")
    if stated and given and given not in stated.values():
        where, found = next(iter(stated.items()))
        raise InputError(
            f"{path}: the file states frame {found} ({where}) but frame {given} was passed "
            f"(--frame {given}); make them agree or drop one"
        )
    frame = next(iter(stated.values()), given)
    if frame is None:
        raise InputError(
            f"{path}: the coordinate frame of the points is not stated; add a 'frame' column (LPS or "
            "RAS) or a '# frame: LPS' first line, or pass --frame LPS|RAS"
        )
    return labels, to_lps(points, frame), frame


def read_points_csv(path, frame: str | None = None) -> tuple[list[str], np.ndarray]:
    """Read a point CSV; returns ``(labels, points (N, 3) LPS mm)``.

    Header: ``label,x,y,z`` and optionally ``frame`` (any order and case; unknown or repeated columns are
    refused). The frame of x, y, z (mm) is the file's ``frame`` column (LPS or RAS, the same on every row)
    or a ``# frame: LPS|RAS`` line before the header, else ``frame``; ``frame=None`` means "the file must
    say". :class:`InputError` (naming the file and line) for an unstated frame, a file and ``frame`` that
    disagree, non-numeric or non-finite coordinates, missing columns or rows.
    """
    labels, points, _ = _read_csv(path, frame)
    return labels, points


def write_points_csv(labels, points_lps, path, frame: str = "LPS", overwrite: bool = False) -> Path:
    """Write ``label,x,y,z,frame`` rows for (N, 3) LPS mm points: x, y, z in mm of ``frame``, which every row names."""
    frame = _frame(frame)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for label, p in zip(labels, from_lps(points_lps, frame)):
        writer.writerow([label, *(f"{v:.4f}" for v in p), frame])
    return write_text(buffer.getvalue(), path, overwrite)


def read_markups(path) -> tuple[dict, list[tuple[int, int]], np.ndarray]:
    """Read a 3D Slicer markups file.

    Returns ``(document, refs, points)``: the parsed JSON, ``(markup index, control point index)`` of every
    mapped control point (positions defined, point-only markup types), and their (N, 3) LPS mm positions.
    Every markup must state its ``coordinateSystem`` ("LPS" or "RAS"); a missing or other one is an
    :class:`InputError` naming the file.
    """
    path = Path(path)
    document = read_json(path, "markups file")
    if not isinstance(document, dict) or not isinstance(document.get("markups"), list) or "@schema" not in document:
        raise InputError(f"{path}: not a 3D Slicer markups file (needs '@schema' and a 'markups' list)")
    refs, points = [], []
    for m, markup in enumerate(document["markups"]):
        kind = markup.get("type") if isinstance(markup, dict) else None
        if kind not in POINT_MARKUPS:
            raise InputError(f"{path}: markup {m} has type {kind!r}; only {POINT_MARKUPS} can be mapped point by point")
        frame = markup.get("coordinateSystem")
        if frame not in FRAMES:
            raise InputError(f"{path}: markup {m} has coordinateSystem {frame!r}; it must state LPS or RAS")
        control = markup.get("controlPoints", [])
        if not isinstance(control, list) or not all(isinstance(point, dict) for point in control):
            raise InputError(
                f"{path}: markup {m} has controlPoints {type(control).__name__}; it must be a list of points"
            )
        for c, point in enumerate(control):
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

    Each position is written in its markup's own ``coordinateSystem`` (checked by :func:`read_markups`);
    everything else is kept.
    """
    out = copy.deepcopy(document)
    for (m, c), p in zip(refs, np.asarray(points_lps)):
        markup = out["markups"][m]
        markup["controlPoints"][c]["position"] = [float(v) for v in from_lps(p, markup["coordinateSystem"])[0]]
    return write_json(out, path, overwrite)


def read_label(path, grid=None, what: str = "label") -> tuple[np.ndarray, np.ndarray, list[int] | None]:
    """Read a label volume for mapping; returns ``(channels, affine, values)``.

    - values all in [0, 1] (binary or soft, 3-D or 4-D channel-last): returned as they are, ``values`` None;
    - a 3-D map of non-negative integers with some value > 1 (e.g. 0/1/2/3): split into one binary channel
      per non-zero value, in ascending order of value (``values`` lists them: channel k is ``map == values[k]``);
    - anything else is an :class:`InputError` naming the file: a negative value, a value > 1 that is not an
      integer (e.g. 1.7), an integer map mixed with fractions, a 4-D label with values > 1, more than
      :data:`MAX_LABEL_VALUES` distinct values, or (with ``grid``, a NIfTI path) a grid other than ``grid``'s.
    """
    img = read_nifti(path, ndim=(3, 4), what=what)
    reference = None if grid is None else read_nifti(grid, what="grid reference")
    if reference is not None and not same_grid(img, reference):
        raise InputError(
            f"{path}: label grid {tuple(img.shape[:3])} differs from the grid it must lie on, that of "
            f"{grid} {tuple(reference.shape[:3])} (a label of the other image, or resampled?)"
        )
    data = load_array(img, path, what)
    if data.min() >= 0 and data.max() <= 1:
        return data, img.affine, None
    if data.min() < 0:
        raise InputError(f"{path}: label holds the negative value {data.min():g}; labels are 0..1 or 0, 1, 2, ...")
    fraction = data != np.round(data)
    if (fraction & (data > 1)).any():
        raise InputError(
            f"{path}: label holds the value {data[fraction & (data > 1)].flat[0]:g}, neither in [0, 1] "
            "(a binary or soft label) nor an integer (an integer label map 0, 1, 2, ...)"
        )
    if fraction.any():
        raise InputError(
            f"{path}: label mixes fractional values ({data[fraction].flat[0]:g}) with integers above 1 "
            f"({data.max():g}); a label is either binary or soft (values in [0, 1]) or an integer map"
        )
    if data.ndim == 4:
        raise InputError(
            f"{path}: 4-D label holds the value {data.max():g}; each channel must be binary or soft "
            "(values in [0, 1]); only a 3-D integer label map is split into channels"
        )
    values = np.unique(data[data != 0])
    if len(values) > MAX_LABEL_VALUES:
        raise InputError(
            f"{path}: label holds {len(values)} distinct non-zero values (more than {MAX_LABEL_VALUES}); "
            "an image rather than a label?"
        )
    return np.stack([data == v for v in values], axis=-1).astype(np.float32), img.affine, [int(v) for v in values]


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


def _mapped_points(path, field_path, frame=None):
    """Read and map one point file; returns ``write(out_path, overwrite)`` (nothing is written yet)."""
    if str(path).lower().endswith(".json"):
        document, refs, points = read_markups(path)
        names = [document["markups"][m]["controlPoints"][c].get("label", f"{m}:{c}") for m, c in refs]
        mapped = transform_points(points, field_path, names, path)
        return lambda out_path, overwrite: write_markups(document, refs, mapped, out_path, overwrite)
    labels, points, frame = _read_csv(path, frame)
    mapped = transform_points(points, field_path, labels, path)
    return lambda out_path, overwrite: write_points_csv(labels, mapped, out_path, frame, overwrite)


def _mapped_label(path, field_path, threshold: float = 0.5, grid=None):
    """Read, check and pull one label volume (:func:`map_label_file`); returns ``write(out_path, overwrite)``."""
    if not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise InputError(f"label_threshold must be a number in (0, 1], got {threshold!r}")
    channels, label_affine, values = read_label(path, grid)
    field, affine = read_field_nifti(field_path)
    img = nib.Nifti1Image((warp(channels, label_affine, field, affine) >= float(threshold)).astype(np.uint8), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    if values is not None:  # which label value each channel holds, in the file itself (80 characters at most)
        text = f"channels = label values {','.join(map(str, values))}"
        img.header["descrip"] = (
            text if len(text) <= 80 else f"channels = label values {values[0]}..{values[-1]} ascending ({len(values)})"
        ).encode()
    return lambda out_path, overwrite: atomic_write(out_path, lambda tmp: nib.save(img, tmp), overwrite)


def check_point_files(points, frame: str | None = None) -> int:
    """Read every point file (CSV or markups) as :func:`map_files` would, writing nothing; returns the point count.

    For a caller to refuse unreadable points (unstated frame, unknown column, ...) before a long registration.
    """
    points = [] if points is None else [points] if isinstance(points, (str, Path)) else list(points)
    return sum(len(read_markups(p)[1] if str(p).lower().endswith(".json") else _read_csv(p, frame)[0]) for p in points)


def map_point_file(path, field_path, out_path, frame: str | None = None, overwrite: bool = False) -> Path:
    """Map one point file (CSV, or markups JSON) through a field file; write the same format in the same frame.

    A CSV's frame comes from the file or ``frame`` (:func:`read_points_csv`); markups carry their own.
    """
    return _mapped_points(path, field_path, frame)(out_path, overwrite)


def map_label_file(path, field_path, out_path, threshold: float = 0.5, overwrite: bool = False, grid=None) -> Path:
    """Pull a 3-D or 4-D (channel-last) label volume onto a field's grid: ``out(p) = label(p + field(p))``.

    The label is read by :func:`read_label` (``grid``: a NIfTI whose grid the label must share, else
    :class:`InputError`): binary and soft labels (values in [0, 1]) are mapped as they are, a 3-D integer
    label map (e.g. 0/1/2) as one binary channel per non-zero value in ascending order of value (recorded in
    the output header's ``descrip``: ``channels = label values 1,2``). Each channel is interpolated linearly
    and a voxel is in the output when the result is ``>= threshold`` (0 < threshold <= 1; so a soft label
    is thresholded at ``threshold`` after interpolation), as the pipeline does for its warped labels. uint8
    output on the field's grid (affine), 3-D or 4-D as the input, 4-D for a split integer map.
    """
    return _mapped_label(path, field_path, threshold, grid)(out_path, overwrite)


def map_files(
    transforms,
    output_dir,
    points=None,
    labels=None,
    to: str = "fixed",
    frame: str | None = None,
    label_threshold: float = 0.5,
    overwrite: bool = False,
) -> list[str]:
    """Map point files and label volumes of one registered case into ``to`` space ("fixed" or "moving").

    Every input is read, checked and mapped before the first file is written, so a refused input leaves
    no output.

    Args:
        transforms: the case folder written by the registration (holds both ``transform_*.nii.gz``).
        output_dir: where the mapped files go, named ``<input name>_to_<to>.<same suffix>``.
        points: a point file or a list of them (CSV, or ``.mrk.json``), in the other space, mm.
        frame: None, "LPS" or "RAS": the frame of CSV coordinates when the CSV does not state it (it must
            agree when it does; None: every CSV must state it). Markups carry their own.
        labels: a label volume or a list of them (NIfTI on the other space's image grid, checked against
            the grid of that space's transform file); see :func:`map_label_file`.
        label_threshold: in (0, 1]: a mapped voxel is in the label when its interpolated value is >= it.
    Returns:
        the written paths.
    """
    if to not in FIELD_FOR_POINTS:
        raise InputError(f"to must be 'fixed' or 'moving', got {to!r}")
    frame = None if frame is None else _frame(frame)
    as_list = lambda x: [] if x is None else [x] if isinstance(x, (str, Path)) else list(x)  # noqa: E731
    points, labels = as_list(points), as_list(labels)
    if not points and not labels:
        raise InputError("nothing to map: give points (CSV or .mrk.json) and/or labels (NIfTI)")
    folder, out = Path(transforms), Path(output_dir)
    source_grid = folder / FIELD_FOR_POINTS[to]  # the field on the labels' own (other space's) grid
    jobs = [(p, folder / FIELD_FOR_POINTS[to], out / _output_name(p, to)) for p in points]
    jobs += [(v, folder / FIELD_FOR_LABELS[to], out / _output_name(v, to)) for v in labels]
    targets = [target for _, _, target in jobs]
    for path, field, target in jobs:
        for needed in (field, source_grid) if labels else (field,):
            if not needed.is_file():
                raise InputError(f"{needed}: transform file does not exist (is {folder} a registration output folder?)")
        if targets.count(target) > 1:
            raise InputError(f"{path}: two inputs would both be written to {target}; rename one")
        refuse_existing([target], overwrite)
    writers = [_mapped_points(p, f, frame) for p, f, _ in jobs[: len(points)]]
    writers += [_mapped_label(v, f, label_threshold, source_grid) for v, f, _ in jobs[len(points) :]]
    return [str(write(target, overwrite)) for write, target in zip(writers, targets)]
