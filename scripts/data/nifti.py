"""Checked NIfTI reading and atomic, non-overwriting writing.

Every file the bundle reads from a user goes through :func:`read_nifti`, so a bad file produces
one :class:`InputError` that names the file and what is wrong with it. Every file the bundle
writes goes through the ``write_*`` helpers: written to a temporary name in the same folder and
renamed into place, so a killed process never leaves a half-written output, and an existing
file is only replaced when the caller passes ``overwrite=True``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np

__all__ = [
    "InputError",
    "user_error",
    "flag",
    "read_nifti",
    "read_gland_mask",
    "check_header",
    "HEADER_TOLERANCE_MM",
    "SHEAR_TOLERANCE",
    "MIN_VOXELS_PER_AXIS",
    "check_finite",
    "same_grid",
    "make_folder",
    "refuse_existing",
    "atomic_write",
    "write_nifti",
    "write_json",
    "write_text",
]


_UMASK = os.umask(0)
os.umask(_UMASK)


class InputError(ValueError):
    """A user-supplied file or setting is unusable. The message names the file and the problem."""


EXPECTED = (InputError, FileExistsError)  # user errors: one line, no traceback, at every front-end


def user_error(err: BaseException) -> BaseException | None:
    """The first expected user error in ``err``'s chain of causes (``__cause__``, else ``__context__``), or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, EXPECTED):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


# not monai.utils.str2bool: it raises a plain ValueError without the setting's name, and refuses int 0/1
def flag(value: bool | int | str, name: str = "flag") -> bool:
    """A yes/no setting from a config or the command line: a bool, 0/1, or true/false, yes/no, 1/0 in any case.

    ``python -m monai.bundle`` and fire pass ``--overwrite true`` as the string "true" (only ``True`` is a
    Python literal), and a non-empty string such as "false" would otherwise count as yes.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    if isinstance(value, str) and value.strip().lower() in words:
        return words[value.strip().lower()]
    raise InputError(f"{name} must be true or false (or yes/no, 1/0), got {value!r}")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Parse a JSON file; :class:`InputError` naming the file when it is missing or not valid JSON."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {what} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None


# The header rule (docs/pipeline.md, "Header rules and storage order"). The geometry of a NIfTI file is its sform
# when sform_code > 0, else its qform (nibabel's rule, used by every resampling in the bundle); a file is read only
# when ITK and ANTs (the rigid step, QC, every tool applying the written transforms) read the same geometry:
HEADER_TOLERANCE_MM = 1e-3  # sform vs qform, sform vs pixdim: largest gap of a corner voxel centre (mm)
SHEAR_TOLERANCE = 1e-4  # cosine between two voxel axes (ITK refuses a direction matrix beyond 1e-4 as well)
MIN_VOXEL_MM = 1e-3  # a voxel axis shorter than this makes the affine singular
MIN_VOXELS_PER_AXIS = 4  # images to register: ITK's recursive Gaussian (ANTs' mutual information, QC) needs 4
_HEADER_FIX = (
    "write the one affine you trust into both (nibabel: img.set_sform(affine, code=1); "
    "img.set_qform(affine, code=1), which also sets pixdim; or fslorient)"
)


def _corner_gap(a: np.ndarray, b: np.ndarray, shape) -> float:
    """Largest distance (mm) between the positions two voxel -> world affines give the 8 corner voxels of ``shape``."""
    corners = np.array(
        [[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)]
    )
    difference = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return float(np.linalg.norm(corners @ difference[:3].T, axis=1).max())


def _sizes(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ") mm"


def check_header(img, path: str | os.PathLike, what: str = "image") -> None:
    """Raise :class:`InputError` unless nibabel, ITK and ANTs read the same voxel -> world geometry from ``img``'s header.

    nibabel (the bundle's resampling) uses the sform when sform_code > 0, else the qform; ITK 5.4 (hence ANTs) takes
    the spacing from pixdim and the directions and origin from the sform only when sform_code is 1 (scanner) or the
    qform_code is 0, else from the qform; with both codes 0 each reader guesses differently. Refused, each with
    one line naming the file, saying what is wrong and how to fix it:

    - both codes 0;
    - a zero, negative or non-finite voxel size in pixdim, or a negative qfac other than -1 (nibabel repairs
      them while loading, ITK differently: the stored header is judged);
    - a non-finite, singular (a voxel axis under ``MIN_VOXEL_MM``, or parallel axes) or sheared (axes not
      orthogonal to ``SHEAR_TOLERANCE`` in cosine, which ITK cannot represent) sform, or qform if it is used;
    - an sform whose voxel sizes differ from pixdim by more than ``HEADER_TOLERANCE_MM`` at a corner voxel;
    - an sform and a qform (both codes > 0) more than ``HEADER_TOLERANCE_MM`` apart at a corner voxel, unless
      the qform stores the sform's own rotation and origin (its float32 quaternion, rebuilt as a matrix, can miss
      a rotation near 180 degrees by a fraction of a mm) and sform_code is 1, so that ITK reads the sform too.

    Accepted headers (both codes with one affine, as :func:`write_nifti` and ITK write; sform only, as
    ``nib.Nifti1Image(data, affine)`` writes; qform only) read the same in all three to 1e-4 mm
    (``tests/test_geometry.py``).
    """
    from nibabel.openers import ImageOpener

    # nibabel "fixes" pixdim and qfac while loading (abs of a negative voxel size, 1 for 0) where ITK does not
    # (a negative pixdim flips an axis there): judge the header as stored
    try:
        with ImageOpener(str(path)) as f:
            raw = type(img.header).from_fileobj(f, check=False)
    except Exception:  # noqa: BLE001 - not readable a second time: judge the header nibabel loaded
        raw = img.header
    shape = (tuple(int(n) for n in img.shape[:3]) + (1, 1, 1))[:3]
    spatial = min(len(img.shape), 3)
    scode, qcode = int(raw["sform_code"]), int(raw["qform_code"])
    if scode <= 0 and qcode <= 0:
        raise InputError(
            f"{path}: {what} has no orientation (qform_code and sform_code are both 0): nibabel, ITK "
            f"and ANTs would each guess a different position; {_HEADER_FIX}"
        )
    pixdim = np.asarray(raw["pixdim"][1 : 1 + spatial], np.float64)
    if not np.all(np.isfinite(pixdim)) or np.any(pixdim <= 0):
        raise InputError(
            f"{path}: {what} has voxel size {_sizes(pixdim)} in pixdim; every voxel size must be "
            f"positive (readers guess a repair, not always the same one); {_HEADER_FIX}"
        )
    qfac = float(raw["pixdim"][0])
    if qcode > 0 and qfac < 0 and qfac != -1:
        raise InputError(
            f"{path}: {what} has qfac (pixdim[0]) {qfac:g}, which must be 1 or -1 (nibabel reads it "
            f"as 1, ITK/ANTs as -1); {_HEADER_FIX}"
        )
    form = "sform" if scode > 0 else "qform"
    affine = np.asarray(raw.get_sform() if scode > 0 else img.header.get_qform(), np.float64)
    if not np.all(np.isfinite(affine)):
        raise InputError(f"{path}: {what} has a non-finite {form} (NaN or Inf); {_HEADER_FIX}")
    lengths = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(lengths < MIN_VOXEL_MM):
        raise InputError(
            f"{path}: {what} has a singular {form}: voxel axes of length {_sizes(lengths)} (under "
            f"{MIN_VOXEL_MM:g} mm); {_HEADER_FIX}"
        )
    unit = affine[:3, :3] / lengths
    if abs(np.linalg.det(unit)) < 1e-6:
        raise InputError(f"{path}: {what} has a singular {form}: two voxel axes are parallel; {_HEADER_FIX}")
    skew = max(np.abs(unit.T @ unit - np.eye(3)).max(), np.abs(unit @ unit.T - np.eye(3)).max())
    if skew > SHEAR_TOLERANCE:
        raise InputError(
            f"{path}: {what} has a sheared {form} (voxel axes off orthogonal by {skew:.2g} in cosine, "
            f"over {SHEAR_TOLERANCE:g}), which ITK and ANTs cannot represent: resample the image onto "
            f"a grid with orthogonal axes, or if the shear is rounding noise, replace the sform by its "
            f"nearest rotation (nibabel: img.set_qform(img.affine, code=1); "
            f"img.set_sform(img.get_qform(), code=1))"
        )
    if scode > 0:
        as_itk = affine.copy()  # what ITK reads: the sform's directions and origin, pixdim's voxel sizes
        as_itk[:3, :spatial] = unit[:, :spatial] * pixdim
        gap = _corner_gap(affine, as_itk, shape)
        if gap > HEADER_TOLERANCE_MM:
            raise InputError(
                f"{path}: {what}'s voxel size in pixdim {_sizes(pixdim)} differs from its sform's "
                f"{_sizes(lengths[:spatial])}, {gap:.3g} mm at the grid corners (over "
                f"{HEADER_TOLERANCE_MM:g} mm): ITK/ANTs take the voxel size from pixdim, nibabel from the "
                f"sform; {_HEADER_FIX}"
            )
    if scode > 0 and qcode > 0:
        # the qform is a float32 quaternion: rebuilt as a matrix it can miss the sform it was written from by a
        # fraction of a mm (rotations near 180 degrees, e.g. ITK-written oblique LPS volumes); a qform that stores the
        # sform's own rotation and origin (to 1e-5 and HEADER_TOLERANCE_MM) agrees with it whatever that gap
        gap = _corner_gap(affine, img.header.get_qform(), shape)
        if gap > HEADER_TOLERANCE_MM and not _stores_same_qform(raw, affine):
            raise InputError(
                f"{path}: {what}'s sform (code {scode}) and qform (code {qcode}) disagree by {gap:.3g} "
                f"mm at the grid corners (over {HEADER_TOLERANCE_MM:g} mm): nibabel reads the sform, "
                f"ITK/ANTs {'the sform' if scode == 1 else 'the qform'}, other tools either; keep the one "
                f"you trust (nibabel: img.set_qform(img.get_sform(), code=1) or "
                f"img.set_sform(img.get_qform(), code=1); fslorient -copysform2qform or -copyqform2sform)"
            )
        if gap > HEADER_TOLERANCE_MM and scode != 1:  # ITK reads the qform unless sform_code is 1 (scanner)
            raise InputError(
                f"{path}: {what}'s qform stores its sform only to {gap:.3g} mm at the grid corners (the "
                f"NIfTI quaternion's precision for this rotation), and with sform_code {scode} ITK/ANTs "
                f"read the qform where nibabel reads the sform; set sform_code to 1 (nibabel: "
                f"img.set_sform(img.get_sform(), code=1)) or qform_code to 0"
            )


def _stores_same_qform(header, sform: np.ndarray) -> bool:
    """True when ``header``'s qform parameters are those of ``sform`` (quaternion to 1e-5, origin to the tolerance)."""
    expected = header.copy()
    expected.set_qform(sform)

    def params(h):
        return (
            np.array([h["quatern_b"], h["quatern_c"], h["quatern_d"]], np.float64),
            np.array([h["qoffset_x"], h["qoffset_y"], h["qoffset_z"]], np.float64),
            -1.0 if h["pixdim"][0] < 0 else 1.0,
        )

    (q, offset, qfac), (q0, offset0, qfac0) = params(header), params(expected)
    rotation = min(np.abs(q - q0).max(), np.abs(q + q0).max())  # q and -q: one rotation
    return qfac == qfac0 and rotation <= 1e-5 and np.abs(offset - offset0).max() <= HEADER_TOLERANCE_MM


def read_nifti(
    path: str | os.PathLike, ndim: int | tuple[int, ...] | None = None, what: str = "image", min_size: int = 1
):
    """Open a NIfTI file, check its dimensionality and its header's geometry, raising :class:`InputError` on failure.

    Args:
        path: file to read (``.nii`` or ``.nii.gz``).
        ndim: accepted number(s) of array dimensions (e.g. 3 for an image, (3, 4) for a label).
        what: a word for the error message ("MR image", "TRUS label", ...).
        min_size: voxels needed along each of the (first three) spatial axes; images to register need
            ``MIN_VOXELS_PER_AXIS``.

    The header must give one geometry to every reader (:func:`check_header`); ``img.affine`` is that geometry.

    Returns:
        the ``nibabel`` image; its data is not loaded yet (call ``get_fdata`` or ``dataobj``).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {what} {'is a folder, not a file' if path.is_dir() else 'file does not exist'}")
    try:
        img = nib.load(str(path))
    except Exception as err:  # nibabel raises several unrelated types for unreadable files
        raise InputError(f"{path}: cannot read {what} as NIfTI ({err})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"{path}: {what} is a {type(img).__name__}, not a NIfTI image")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if img.ndim not in allowed:
            raise InputError(
                f"{path}: {what} has {img.ndim} dimensions {tuple(img.shape)}, expected {' or '.join(map(str, allowed))}"
            )
    short = [(k, int(n)) for k, n in enumerate(img.shape[:3]) if n < min_size]
    if short:
        axis, n = short[0]
        raise InputError(
            f"{path}: {what} has {n} voxel{'s' if n != 1 else ''} along axis {axis} (shape "
            f"{tuple(img.shape)}); registration needs at least {min_size} along every axis "
            f"(a volume, not a slice)"
        )
    check_header(img, path, what)
    return img


def load_array(img, path: str | os.PathLike, what: str = "image", dtype=np.float32) -> np.ndarray:
    """Read the voxel data of ``img`` (opened by :func:`read_nifti`), checking it is complete and finite."""
    if np.issubdtype(img.get_data_dtype(), np.complexfloating):
        raise InputError(f"{path}: {what} holds complex voxels ({img.get_data_dtype()}); give the magnitude image")
    try:
        data = np.asarray(img.dataobj, dtype=dtype)
    except Exception as err:  # truncated gzip streams and short files fail only here
        raise InputError(f"{path}: cannot read the voxel data of the {what} ({err})") from None
    check_finite(data, path, what)
    return data


def read_gland_mask(path: str | os.PathLike, what: str = "gland mask") -> tuple[np.ndarray, Any]:
    """A gland mask's values (X, Y, Z) float32, from a 3-D mask or channel 0 (the gland) of a 4-D channel-last label,
    and its checked NIfTI image (:func:`read_nifti`)."""
    img = read_nifti(path, ndim=(3, 4), what=what)
    data = load_array(img, path, what)
    return (data if data.ndim == 3 else data[..., 0]), img


def check_finite(data: np.ndarray, path: str | os.PathLike, what: str = "image") -> None:
    """Raise :class:`InputError` if ``data`` holds NaN or Inf values, saying how many."""
    bad = ~np.isfinite(data)
    if bad.any():
        raise InputError(f"{path}: {what} contains {int(bad.sum())} NaN/Inf voxels")


def same_grid(a, b, atol: float = 1e-3) -> bool:
    """True when two NIfTI images share the spatial shape (first 3 dims) and affine (to ``atol`` mm)."""
    return tuple(a.shape[:3]) == tuple(b.shape[:3]) and np.allclose(a.affine, b.affine, atol=atol)


def make_folder(folder: str | os.PathLike, output=None) -> Path:
    """``mkdir -p``, with an :class:`InputError` naming ``output`` (default: the folder) and what is in the way
    (a file where a folder must be)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
        reason = f"{blocker} is a file, not a folder" if blocker else err.strerror
        raise InputError(f"{output or folder}: cannot create the output folder ({reason})") from None
    return folder


REPLACE_ADVICE = "pass overwrite=True (CLI: --overwrite) to replace it"


def refuse_existing(paths, overwrite: bool | str = False, what: str = "outputs", advice: str = REPLACE_ADVICE) -> bool:
    """Raise ``FileExistsError`` naming the first of ``paths`` that exists (and how many ``what`` exist) unless
    ``overwrite``; return ``overwrite`` as a bool (:func:`flag`)."""
    overwrite = flag(overwrite, "overwrite")
    existing = [Path(p) for p in paths if Path(p).exists()]
    if existing and not overwrite:
        count = f" ({len(existing)} {what})" if len(existing) > 1 else ""
        raise FileExistsError(f"{existing[0]}: already exists{count}; {advice}")
    return overwrite


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any], overwrite: bool = False) -> Path:
    """Call ``write(tmp_path)`` and rename the result to ``path``; refuse to replace a file unless ``overwrite``.

    The temporary file lives in the destination folder (same file system, so the rename is atomic)
    and keeps the destination's suffixes, so writers that look at the extension still work.
    """
    path = Path(path)
    refuse_existing([path], overwrite)
    make_folder(path.parent)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the permissions a plain open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_nifti(
    data: np.ndarray,
    affine: np.ndarray,
    path: str | os.PathLike,
    overwrite: bool = False,
    intent: str | None = None,
    frame_interval: float | None = None,
) -> Path:
    """Write ``data`` with the RAS voxel-to-world ``affine`` (mm) atomically; sets qform and sform to the affine.
    ``frame_interval``: seconds between the frames of a sequence (4th axis), stored as pixdim[4], units mm and s."""
    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    if intent is not None:
        img.header.set_intent(intent)
    if frame_interval is not None:
        zooms = list(img.header.get_zooms())
        zooms[3] = float(frame_interval)
        img.header.set_zooms(zooms)
        img.header.set_xyzt_units("mm", "sec")
    return atomic_write(path, lambda tmp: nib.save(img, tmp), overwrite)


def write_json(obj: Any, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    return write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", path, overwrite)


def write_text(text: str, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``text`` atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text), overwrite)
