"""The sequence mode's own weights (``models/sequence_model.pt``): the temporal cell and head only.

The static network inside :class:`scripts.networks.sequence.SequenceRegistrationNet` is the shipped
``models/model.pt`` (frozen while the cell trained), so the sequence file holds ``{"model": state dict of
cell.* and head.*, "settings": {...}}``: the cell's size, and the SHA-256 of the static weights it was trained
on (a cell is refused on top of other static weights).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from scripts.data.nifti import InputError, atomic_write
from scripts.networks.sequence import SequenceRegistrationNet
from scripts.weights.manifest import sha256
from scripts.weights.trained_model import BUNDLE_ROOT, load_weights

__all__ = ["temporal_part", "sequence_settings", "make_sequence_model", "load_sequence_model"]


def temporal_part(network: SequenceRegistrationNet) -> nn.Module:
    """The trained part of a sequence network (its ``cell`` and ``head``, shared, not copied) as one module."""
    return nn.ModuleDict({"cell": network.cell, "head": network.head})


def sequence_settings(network: SequenceRegistrationNet, static_checkpoint) -> dict:
    """What a sequence weights file must agree with: the cell's size and the static weights under it."""
    return {
        "hidden": network.cell.hidden,
        "stride": network.stride,
        "kernel_size": network.head.kernel_size[0],
        "static_sha256": sha256(static_checkpoint),
    }


def make_sequence_model(
    run_dir,
    out: str = "models/sequence_model.pt",
    static_checkpoint: str = "models/model.pt",
    checkpoint: str = "last.pt",
    overwrite: bool = False,
) -> str:
    """Write the temporal weights of a ``configs/sequence_train.json`` run (``<run_dir>/<checkpoint>``) to ``out``.

    ``static_checkpoint``: the static weights the run started from (its ``init_weights``), recorded by SHA-256.
    """
    path = Path(run_dir) / checkpoint
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint (run configs/sequence_train.json first)")
    model = torch.load(path, map_location="cpu", weights_only=True)["model"]
    temporal = {k: v for k, v in model.items() if k.split(".")[0] in ("cell", "head")}
    if not temporal:
        raise InputError(f"{path}: holds no sequence-mode weights (cell.*, head.*)")
    settings = {
        "hidden": int(model["head.weight"].shape[1]),
        "stride": int(json.loads((Path(run_dir) / "run_config.json").read_text())["config"]["sequence_def"]["stride"]),
        "kernel_size": int(model["head.weight"].shape[-1]),
        "static_sha256": sha256(static_checkpoint),
    }
    atomic_write(out, lambda tmp: torch.save({"model": temporal, "settings": settings}, tmp), overwrite)
    return str(out)


def load_sequence_model(
    network: SequenceRegistrationNet, path, static_checkpoint, device="cpu", bundle_root=BUNDLE_ROOT
) -> SequenceRegistrationNet:
    """Load ``path``'s temporal weights into ``network`` (whose static part holds ``static_checkpoint``'s weights),
    checked like every weights file (SHA-256 when listed, tensor names and shapes, settings, finite values)."""
    load_weights(
        temporal_part(network),
        path,
        device,
        required=True,
        bundle_root=bundle_root,
        settings=sequence_settings(network, static_checkpoint),
    )
    return network.to(device).eval()
