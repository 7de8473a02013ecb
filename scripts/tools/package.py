"""Package the bundle in the MONAI model zoo's layout: ``<out>/<name>/`` with configs, code, docs, weights.

The packaged folder holds ``configs/`` (with ``metadata.json``), ``scripts/``, ``docs/`` (the zoo
``README.md`` and ``data_license.txt``), ``LICENSE``, ``models/`` and a freshly written
``large_files.yml`` listing EVERY weight file with its SHA-256. Weight files larger than the zoo's limit
are listed but not copied (they are hosted at ``url_base`` and fetched with ``python -m monai.bundle
download`` or by hand). Tests, CI files, data and run folders are not part of the package.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from scripts.data.nifti import InputError, refuse_existing, write_text
from scripts.weights.manifest import (
    MANIFEST,
    is_state_dict,
    read_checkpoint,
    verify_weights,
    weight_files,
    write_manifest,
)

__all__ = ["BUNDLE_NAME", "CONTENT", "NOT_SHIPPED", "ZOO_MAX_FILE_MB", "package"]

logger = logging.getLogger(__name__)

BUNDLE_NAME = "prostate_mri_trus_registration"
CONTENT = ("configs", "scripts", "docs", "LICENSE")  # copied as they are; models/ is handled file by file
NOT_SHIPPED = ("scripts/tools",)  # repository tools (CLI, demo, packager, exporter): the configs import none of them
REQUIRED = ("configs/metadata.json", "configs/inference.json", "LICENSE", "docs/README.md")
ZOO_MAX_FILE_MB = 25.0  # the model zoo keeps larger files out of its repository (listed in large_files.yml)
UNTRAINED_NOTE = (
    "This package holds NO trained weights (packaged with --untrained).\n"
    "Train first (configs/train.json, see docs/README.md) and package again; until then the\n"
    "network runs with its random initial weights and its output is meaningless.\n"
)


def _check_plain_state_dict(path: Path, root: Path) -> None:
    """Refuse a ``model.pt`` that is not a plain state dict: MONAI's ``load`` and ``ckpt_export`` and the zoo's
    checks read the file as one, and a wrapped checkpoint (``{"model": ...}``) would load no weight at all."""
    state = read_checkpoint(path, root)
    if not is_state_dict(state):
        raise InputError(
            f"{path}: not a plain state dict (keys {sorted(state)[:4] if isinstance(state, dict) else type(state)}); "
            "MONAI's load and ckpt_export would load no weights from it. Write models/ from a training run with "
            "`python -m scripts make-model --run_dir RUN`"
        )


def package(
    out: str = "bundle",
    bundle_root: str = ".",
    name: str = BUNDLE_NAME,
    url_base: str = "",
    max_file_mb: float = ZOO_MAX_FILE_MB,
    untrained: bool = False,
    overwrite: bool = False,
) -> str:
    """Build the zoo-ready bundle ``<out>/<name>`` from the bundle at ``bundle_root``; returns its path.

    Args:
        out: parent folder of the package (``bundle/``, git-ignored).
        bundle_root: the source bundle (this repository).
        name: folder name of the packaged bundle (zoo style, snake case).
        url_base: where the weight files are hosted; each manifest ``url`` is ``url_base/models/<file>``
            (empty when not hosted yet).
        max_file_mb: weight files larger than this are listed in ``large_files.yml`` but not copied.
        untrained: allow packaging without ``models/model.pt``; the package then says so in
            ``models/UNTRAINED.txt``. Without it, a missing checkpoint is an error.
        overwrite: replace an existing ``<out>/<name>``; otherwise it raises ``FileExistsError``.

    The package is assembled in a temporary folder beside the destination and renamed into place.
    """
    root = Path(bundle_root).resolve()
    missing = [rel for rel in REQUIRED if not (root / rel).is_file()]
    if missing:
        raise InputError(f"{root / missing[0]}: required bundle file missing ({len(missing)} missing: {missing})")
    if not (root / "models" / "model.pt").is_file() and not untrained:
        raise InputError(
            f"{root / 'models' / 'model.pt'}: no trained weights; train first, or pass --untrained to package "
            "the code without weights (marked untrained)"
        )
    verify_weights(root)  # a listed file replaced behind the manifest's back is refused, not re-hashed
    if (root / "models" / "model.pt").is_file():
        _check_plain_state_dict(root / "models" / "model.pt", root)
    dest = Path(out).resolve() / name
    overwrite = refuse_existing([dest], overwrite)
    dest.parent.mkdir(parents=True, exist_ok=True)

    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=dest.parent))
    try:
        patterns = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")

        def ignore(folder, names):
            left_out = {n for n in names if (Path(folder) / n).relative_to(root).as_posix() in NOT_SHIPPED}
            return set(patterns(folder, names)) | left_out

        for item in CONTENT:
            src = root / item
            if src.is_dir():
                shutil.copytree(src, staging / item, ignore=ignore)
            elif src.is_file():
                shutil.copy2(src, staging / item)
        (staging / "models").mkdir()
        for rel in weight_files(root):
            size_mb = (root / rel).stat().st_size / 2**20
            if size_mb > max_file_mb:
                logger.info("%s: %.1f MB > %.1f MB, listed in %s but not copied", rel, size_mb, max_file_mb, MANIFEST)
            else:
                shutil.copy2(root / rel, staging / rel)
        write_manifest(root, staging / MANIFEST, url_base)  # hashes of the source files, copied or not
        if untrained and not (root / "models" / "model.pt").is_file():
            write_text(UNTRAINED_NOTE, staging / "models" / "UNTRAINED.txt")
        if dest.exists():  # overwrite: the old package goes only once the new one is complete
            shutil.rmtree(dest)
        staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("packaged %s", dest)
    return str(dest)
