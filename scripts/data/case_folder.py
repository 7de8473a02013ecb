"""A case folder written as one transaction: staged privately, published by one rename under a lock.

Every file of one registration (the pipeline's outputs, ``qc.json``, pictures, mapped points) is written into
a private staging folder beside the destination; when all are written, the staging folder replaces the
destination in one ``rename`` while a lock on the parent folder is held. So:

- a reader never sees a half-written case, and a killed process leaves the old folder (or none) plus a hidden
  ``.<name>.staging-*`` folder, never a mix;
- two writers to the same destination never mix files: the second to publish finds the folder taken and fails
  with ``FileExistsError`` (or, with ``overwrite``, replaces it whole);
- ``overwrite`` replaces the whole folder: nothing of the previous run survives.

Hand-written: no maintained library publishes a directory atomically. Replacing a non-empty folder uses
Linux's ``renameat2(RENAME_EXCHANGE)`` (an atomic swap) through ctypes, with two renames as the fallback where
the kernel or file system lacks it. A destination that is a mount point (e.g. a container's output volume)
cannot be renamed; there the files are staged inside it and moved in one by one under the lock.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from scripts.data.nifti import _UMASK, InputError, flag, make_folder, refuse_existing

__all__ = ["case_transaction", "check_replaceable", "is_taken"]

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _is_staging(path: Path) -> bool:
    return path.name.startswith(".") and ".staging-" in path.name


def is_taken(folder: Path) -> bool:
    """True when ``folder`` exists and holds anything other than hidden staging folders."""
    return folder.is_dir() and any(not _is_staging(p) for p in folder.iterdir())


@contextmanager
def _locked(folder: Path):
    """Hold an exclusive ``flock`` on ``folder`` (a directory) until the block ends; other publishers wait."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (``renameat2`` with ``RENAME_EXCHANGE``); False where unsupported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _publish(stage: Path, dest: Path, overwrite: bool) -> None:
    """Move ``stage`` to ``dest`` (under the caller's lock): a rename, or an exchange and removal of the old folder."""
    if is_taken(dest) and not overwrite:
        raise FileExistsError(
            f"{dest}: already exists (written by another run meanwhile?); pass overwrite=True "
            "(CLI: --overwrite) to replace it"
        )
    if not dest.exists() or not is_taken(dest):
        os.rename(stage, dest)  # an empty destination folder is replaced by the rename itself
        return
    if not _exchange(stage, dest):
        os.rename(dest, stage.with_name(stage.name + "-old"))
        os.rename(stage, dest)
        stage = stage.with_name(stage.name + "-old")
    shutil.rmtree(stage)  # now the previous run's folder


def check_replaceable(dest, overwrite: bool, inputs=(), marker: str = "result.json") -> None:
    """Raise unless ``dest`` is free, or ``overwrite`` is set and ``dest`` is an earlier case folder that no input is in.

    ``FileExistsError`` when ``dest`` holds files and ``overwrite`` is false. With ``overwrite``, an
    :class:`InputError` when ``dest`` holds files but no ``marker`` (it is not a case folder this bundle wrote:
    replacing it would delete someone's files) or when one of ``inputs`` lies inside it (it would be deleted).
    """
    given, dest = Path(dest), Path(dest).resolve()
    if given.is_symlink():
        raise InputError(
            f"{given}: is a symbolic link (to {os.readlink(given)}); a case folder is replaced by a rename, "
            "which would replace the link, so give the folder itself"
        )
    if dest.exists() and not dest.is_dir():
        raise InputError(f"{given}: is a file, not a folder; choose a folder for the outputs")
    if Path.cwd().resolve().is_relative_to(dest):
        raise InputError(
            f"{given}: is the current folder (or holds it); a case folder is published by a rename, which "
            "would pull the folder from under the shell: write into a sub-folder"
        )
    if not is_taken(dest):
        return
    if not flag(overwrite, "overwrite"):
        taken = sum(1 for p in dest.iterdir() if not _is_staging(p))
        raise FileExistsError(
            f"{dest}: already exists ({taken} files); pass overwrite=True (CLI: --overwrite) to replace it"
        )
    if not (dest / marker).is_file():
        raise InputError(
            f"{dest}: holds files but no {marker}, so it is not an earlier registration's output folder; "
            "overwrite replaces a whole case folder, so choose a new or empty folder"
        )
    inside = [str(p) for p in inputs if p is not None and Path(p).resolve().is_relative_to(dest)]
    if inside:
        raise InputError(
            f"{inside[0]}: an input lies inside the output folder {dest}, which overwrite would replace; "
            "move it or write elsewhere"
        )


@contextmanager
def case_transaction(dest, overwrite: bool = False, inputs=()):
    """Yield an empty private folder to write a case into; publish it as ``dest`` when the block succeeds.

    Checks ``dest`` at once (:func:`check_replaceable`, with the run's ``inputs``), and again at publishing,
    under the lock, in case another run published meanwhile (``FileExistsError`` without ``overwrite``). On an
    exception inside the block the staging folder is removed and ``dest`` is untouched. Afterwards ``dest``
    holds exactly what was staged.
    """
    overwrite = flag(overwrite, "overwrite")
    check_replaceable(dest, overwrite, inputs)
    dest = Path(dest).absolute()
    mount = os.path.ismount(dest)
    parent = dest if mount else dest.parent
    make_folder(parent, output=dest)
    stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.staging-", dir=parent))
    os.chmod(stage, 0o777 & ~_UMASK)  # mkdtemp makes it 0700; the published folder gets what mkdir would give
    try:
        yield stage
        with _locked(parent):
            if mount:
                _publish_into_mount(stage, dest, overwrite)
            else:
                _publish(stage, dest, overwrite)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _publish_into_mount(stage: Path, dest: Path, overwrite: bool) -> None:
    """``dest`` is a mount point (cannot be renamed): clear it (with ``overwrite``) and move the staged files in."""
    if is_taken(dest):
        refuse_existing([dest], overwrite)
        for old in dest.iterdir():
            if old != stage:
                shutil.rmtree(old) if old.is_dir() else old.unlink()
    for path in stage.iterdir():
        os.replace(path, dest / path.name)
