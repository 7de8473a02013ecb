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
    "flag",
    "read_nifti",
    "check_finite",
    "same_grid",
    "atomic_write",
    "write_nifti",
    "write_json",
    "write_text",
]


_UMASK = os.umask(0)
os.umask(_UMASK)


class InputError(ValueError):
    """A user-supplied file or setting is unusable. The message names the file and the problem."""


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


def read_nifti(path: str | os.PathLike, ndim: int | tuple[int, ...] | None = None, what: str = "image"):
    """Open a NIfTI file and check its dimensionality, raising :class:`InputError` on failure.

    Args:
        path: file to read (``.nii`` or ``.nii.gz``).
        ndim: accepted number(s) of array dimensions (e.g. 3 for an image, (3, 4) for a label).
        what: a word for the error message ("MR image", "TRUS label", ...).

    Returns:
        the ``nibabel`` image; its data is not loaded yet (call ``get_fdata`` or ``dataobj``).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {what} file does not exist")
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
    return img


def load_array(img, path: str | os.PathLike, what: str = "image", dtype=np.float32) -> np.ndarray:
    """Read the voxel data of ``img`` (opened by :func:`read_nifti`), checking it is complete and finite."""
    try:
        data = np.asarray(img.dataobj, dtype=dtype)
    except Exception as err:  # truncated gzip streams and short files fail only here
        raise InputError(f"{path}: cannot read the voxel data of the {what} ({err})") from None
    check_finite(data, path, what)
    return data


def check_finite(data: np.ndarray, path: str | os.PathLike, what: str = "image") -> None:
    """Raise :class:`InputError` if ``data`` holds NaN or Inf values, saying how many."""
    bad = ~np.isfinite(data)
    if bad.any():
        raise InputError(f"{path}: {what} contains {int(bad.sum())} NaN/Inf voxels")


def same_grid(a, b, atol: float = 1e-3) -> bool:
    """True when two NIfTI images share the spatial shape (first 3 dims) and affine (to ``atol`` mm)."""
    return tuple(a.shape[:3]) == tuple(b.shape[:3]) and np.allclose(a.affine, b.affine, atol=atol)


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any], overwrite: bool = False) -> Path:
    """Call ``write(tmp_path)`` and rename the result to ``path``; refuse to replace a file unless ``overwrite``.

    The temporary file lives in the destination folder (same file system, so the rename is atomic)
    and keeps the destination's suffixes, so writers that look at the extension still work.
    """
    path, overwrite = Path(path), flag(overwrite, "overwrite")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
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
    data: np.ndarray, affine: np.ndarray, path: str | os.PathLike, overwrite: bool = False, intent: str | None = None
) -> Path:
    """Write ``data`` with the RAS voxel-to-world ``affine`` (mm) atomically; sets qform and sform to the affine."""
    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    if intent is not None:
        img.header.set_intent(intent)
    return atomic_write(path, lambda tmp: nib.save(img, tmp), overwrite)


def write_json(obj: Any, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    return write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", path, overwrite)


def write_text(text: str, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``text`` atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text), overwrite)
