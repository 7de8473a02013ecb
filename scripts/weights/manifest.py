"""The bundle's weight manifest ``large_files.yml``: SHA-256 of every weight file, checked before use.

``large_files.yml`` follows the MONAI model zoo: a list ``large_files`` of entries with ``path``
(relative to the bundle root), ``url``, ``hash_val`` and ``hash_type`` (here always ``sha256``).
MONAI's ``ConfigParser`` reads and writes the YAML; ``monai.apps.utils.check_hash`` computes hashes.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch
from monai.apps.utils import check_hash
from monai.bundle import ConfigParser

from scripts.data.nifti import InputError, atomic_write

__all__ = [
    "MANIFEST",
    "WEIGHT_SUFFIXES",
    "sha256",
    "weight_files",
    "manifest",
    "write_manifest",
    "record_weights",
    "verify_weights",
    "verify_checkpoint",
    "read_checkpoint",
]

MANIFEST = "large_files.yml"
# files under models/ that are weights: checkpoints, TorchScript, torch.export programs, ONNX
WEIGHT_SUFFIXES = (".pt", ".ts", ".pt2", ".onnx")


def sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (read in chunks)."""
    with open(path, "rb") as f:
        if sys.version_info >= (3, 11):
            return hashlib.file_digest(f, "sha256").hexdigest()
        digest = hashlib.sha256()  # Python 3.10 has no hashlib.file_digest
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_state_dict(obj) -> bool:
    """Whether a loaded checkpoint is a plain state dict: a dict whose every value is a tensor."""
    return isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values())


def weight_files(bundle_root: str | os.PathLike = ".") -> list[str]:
    """Weight files of a bundle, as sorted POSIX paths relative to ``bundle_root`` (``models/*.pt`` etc.)."""
    models = Path(bundle_root) / "models"
    if not models.is_dir():
        return []
    return sorted(f"models/{p.name}" for p in models.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def manifest(bundle_root: str | os.PathLike = ".", url_base: str = "") -> dict:
    """The ``large_files.yml`` content for the weights now in ``bundle_root/models``.

    ``url_base``: where the files are hosted; each ``url`` is ``url_base/<path>`` (empty when not hosted yet).
    """
    entries = []
    for rel in weight_files(bundle_root):
        url = f"{url_base.rstrip('/')}/{rel}" if url_base else ""
        entries.append({"path": rel, "url": url, "hash_val": sha256(Path(bundle_root) / rel), "hash_type": "sha256"})
    return {"large_files": entries}


def write_manifest(bundle_root: str | os.PathLike = ".", out=None, url_base: str = "", overwrite: bool = False) -> Path:
    """Write :func:`manifest` to ``out`` (default ``bundle_root/large_files.yml``) atomically."""
    content = manifest(bundle_root, url_base)
    out = Path(bundle_root) / MANIFEST if out is None else Path(out)
    return atomic_write(out, lambda tmp: ConfigParser.export_config_file(content, tmp, fmt="yaml"), overwrite)


def _entries(bundle_root) -> list[dict]:
    path = Path(bundle_root) / MANIFEST
    if not path.is_file():
        return []
    try:
        content = ConfigParser.load_config_file(str(path)) or {}
    except Exception as err:  # the YAML parser raises several unrelated types
        raise InputError(f"{path}: cannot read the weight manifest ({err})") from None
    entries = content.get("large_files") or []
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "path" in e for e in entries):
        raise InputError(f"{path}: 'large_files' must be a list of entries with 'path', 'hash_val', 'hash_type'")
    return entries


def verify_weights(bundle_root: str | os.PathLike = ".", path=None) -> list[str]:
    """Check weight files against the SHA-256 (or other) hashes in ``bundle_root/large_files.yml``.

    Args:
        bundle_root: the bundle folder holding ``large_files.yml`` and ``models/``.
        path: check only this file (absolute, or relative to ``bundle_root``); ``None``: every listed file.

    Returns:
        the checked paths (relative to ``bundle_root``); empty when no manifest or the file is not listed.

    Raises:
        InputError naming the file when a listed file is missing or its hash differs.
    """
    root = Path(bundle_root).resolve()
    entries = _entries(root)
    if path is not None:
        wanted = (root / path).resolve()
        entries = [e for e in entries if (root / e["path"]).resolve() == wanted]
    checked = []
    for entry in entries:
        file = root / entry["path"]
        if not file.is_file():
            raise InputError(
                f"{file}: listed in {MANIFEST} but missing; download it from {entry.get('url') or 'its host'}"
            )
        if not entry.get("hash_val"):
            raise InputError(f"{root / MANIFEST}: entry {entry['path']} has no hash_val")
        if not check_hash(str(file), entry["hash_val"], entry.get("hash_type", "sha256")):
            raise InputError(
                f"{file}: {entry.get('hash_type', 'sha256')} differs from {MANIFEST}; the file is corrupt or replaced"
            )
        checked.append(entry["path"])
    return checked


def record_weights(bundle_root: str | os.PathLike, paths) -> Path:
    """Set the manifest entries of the weight files ``paths`` (inside ``bundle_root``) to their current hashes.

    Only these entries change: a listed file that was replaced behind the manifest's back stays refused.
    """
    root = Path(bundle_root).resolve()
    entries = {e["path"]: e for e in _entries(root)}
    for path in paths:
        rel = Path(path).resolve().relative_to(root).as_posix()
        entries[rel] = {
            "path": rel,
            "url": entries.get(rel, {}).get("url", ""),
            "hash_val": sha256(root / rel),
            "hash_type": "sha256",
        }
    content = {"large_files": [entries[k] for k in sorted(entries)]}
    return atomic_write(root / MANIFEST, lambda tmp: ConfigParser.export_config_file(content, tmp, fmt="yaml"), True)


def verify_checkpoint(path, bundle_root: str | os.PathLike | None = None) -> list[str]:
    """Check one weight file against every manifest that may list it: ``bundle_root``'s and that of the bundle
    holding the file (the nearest of its two parent folders with a ``large_files.yml``: ``<bundle>/models/x.pt``,
    or a model folder carrying its own manifest). Raises :class:`InputError` on a mismatch; returns the checked
    manifests (empty: the file is listed nowhere, e.g. weights trained locally)."""
    path = Path(path).resolve()
    roots = [Path(bundle_root).resolve()] if bundle_root is not None else []
    roots += [p for p in path.parents[:2] if (p / MANIFEST).is_file()][:1]
    return [str(root / MANIFEST) for root in dict.fromkeys(roots) if verify_weights(root, path)]


def read_checkpoint(path, bundle_root: str | os.PathLike | None = None, device="cpu"):
    """Verify (:func:`verify_checkpoint`), then ``torch.load(weights_only=True)`` a checkpoint; :class:`InputError`
    in one line when it does not exist or cannot be read (torch's own message is pages long and advises turning
    the safe loading off)."""
    if Path(path).is_dir():
        raise InputError(f"{path}: is a folder, not a checkpoint file")
    if not Path(path).is_file():
        raise InputError(f"{path}: checkpoint does not exist (train the network first, or pass another checkpoint)")
    verify_checkpoint(path, bundle_root)
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # truncated or foreign files, pickles with code: torch raises several types
        text, marker = " ".join(str(err).split()), "WeightsUnpickler error:"
        reason = text.split(marker, 1)[1] if marker in text else text
        reason = reason.split(" Check the documentation")[0].split(". ")[0].strip().rstrip(".")
        raise InputError(
            f"{path}: not a readable weights-only checkpoint (corrupt, truncated, or a pickle that would "
            f"run code; {type(err).__name__}: {reason})"
        ) from None
