"""A trained run becomes a shipped model: weights plus the settings they need, checked at every load.

``python -m scripts make-model --run_dir runs/cpu_recipe --seg_run_dir runs/seg_recipe`` writes
``models/model.pt`` as a plain state dict of the registration network (the model zoo's format, what
``monai.bundle.load`` and ``ckpt_export`` read) whose ``_extra_state`` entry holds the settings (JSON in a
uint8 tensor, :func:`scripts.networks.registration.encode_settings`): the network
definition and the grid the weights were trained on, read from the run folder's ``run_config.json``
(:class:`scripts.networks.registration.RegistrationNet` keeps them, and refuses them when built with another definition).
``models/seg_model.pt`` (MONAI's U-Net, which has no extra state) is ``{"model": state_dict, "settings": {...}}``;
training checkpoints ``{"model": state_dict, ...}`` load too. Every loader (``scripts.weights.trained_model.load_weights``:
the bundle configs, the CLI, MONAI Label, Deploy) compares those settings with the config it runs and stops with the list of
differences, so that a model is never silently run on a grid or architecture it was not trained for
(the failure this prevents: a case falling from gland Dice 0.89 to 0.51 with a forgotten grid).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from monai.bundle import ConfigParser

from scripts.data.nifti import InputError, atomic_write
from scripts.networks.registration import NOT_SETTINGS, decode_settings, encode_settings
from scripts.weights.manifest import MANIFEST, is_state_dict, read_checkpoint, record_weights

BUNDLE_ROOT = Path(__file__).resolve().parents[2]  # holds large_files.yml

__all__ = [
    "load_weights",
    "REGISTRATION",
    "SEGMENTATION",
    "EXTRA_STATE",
    "settings_of",
    "stored_settings",
    "tensors_of",
    "check_settings",
    "check_finite_weights",
    "make_model",
]

# what a weights file depends on: plain config ids, and the network definition whose arguments count
REGISTRATION = {"keys": ("spatial_size", "depth_crop", "roi_mask"), "network": "network_def"}
SEGMENTATION = {"keys": ("seg_spatial_size",), "network": "seg_network_def"}
EXTRA_STATE = "_extra_state"  # PyTorch's state-dict entry for a module's get_extra_state()


def settings_of(config, kind: dict = REGISTRATION) -> dict:
    """The settings of ``kind`` in a config (a ``ConfigParser`` or a config content dict), resolved.

    Returns ``{id: value}`` for ``kind["keys"]`` present in the config and ``kind["network"]``: a dict of
    the network definition's arguments (references resolved, ``_target_`` kept, speed switches left out).
    """
    parser = config if isinstance(config, ConfigParser) else ConfigParser(json.loads(json.dumps(config, default=str)))
    if "bundle_root" not in parser:
        parser["bundle_root"] = "."
    out = {k: parser.get_parsed_content(k) for k in kind["keys"] if k in parser}
    if "depth_crop" in kind["keys"] and "pair" in parser:  # the pair stage (configs/pair.json) owns the crop
        out["depth_crop"] = parser.get_parsed_content("pair").depth_crop
    net = kind["network"]
    if net in parser:
        out[net] = {
            k: parser[net][k] if k == "_target_" else parser.get_parsed_content(f"{net}#{k}")
            for k in parser[net]
            if k not in NOT_SETTINGS
        }
    return json.loads(json.dumps(out, default=str))  # plain lists/numbers, as stored in a weights file


def stored_settings(checkpoint) -> dict | None:
    """The settings a loaded weights file stores: ``checkpoint["settings"]``, or a state dict's non-empty
    ``_extra_state``; None when it stores none (a training checkpoint, a foreign state dict)."""
    if not isinstance(checkpoint, dict):
        return None
    if isinstance(checkpoint.get("settings"), dict):
        return checkpoint["settings"]
    weights = checkpoint.get("model", checkpoint)
    extra = weights.get(EXTRA_STATE) if isinstance(weights, dict) else None
    return (decode_settings(extra) or None) if isinstance(extra, torch.Tensor) else None


def tensors_of(checkpoint):
    """The state dict of a loaded weights file (its ``"model"`` entry if it has one) without ``_extra_state``."""
    weights = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    return {k: v for k, v in weights.items() if k != EXTRA_STATE} if isinstance(weights, dict) else weights


def differences(stored: dict, current: dict, current_is: str = "configured", prefix: str = "") -> list[str]:
    """``"key: trained with A, <current_is> B"`` for every (nested) key whose values differ; a key one side lacks
    reads ``"(absent)"`` there."""
    diffs = []
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key, "(absent)"), current.get(key, "(absent)")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += differences(a, b, current_is, f"{prefix}{key}#")
        elif a != b:
            diffs.append(f"{prefix}{key}: trained with {json.dumps(a)}, {current_is} {json.dumps(b)}")
    return diffs


def check_settings(path, stored: dict | None, current: dict | None) -> None:
    """Raise :class:`InputError` naming ``path`` and every difference unless ``stored`` (from the weights
    file) and ``current`` (from the running config) agree. No-op when either is None (a plain state dict,
    or a caller that has no config)."""
    if stored is None or current is None:
        return
    diffs = [d for d in differences(stored, current) if not d.endswith(', configured "(absent)"')]
    if diffs:
        shown = "\n  ".join(diffs[:12]) + (f"\n  ... {len(diffs) - 12} more" if len(diffs) > 12 else "")
        raise InputError(
            f"{path}: these weights were trained with other settings than the config gives:\n  {shown}\n"
            "pass the trained values as overrides (--id value), or use weights trained with these settings"
        )


def check_finite_weights(path, weights: dict) -> None:
    """Raise :class:`InputError` naming ``path`` when a floating-point tensor of ``weights`` holds NaN/Inf."""
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise InputError(f"{path}: {len(bad)} weight tensors hold NaN/Inf (e.g. {bad[0]}); a diverged training?")


def _run_weights(run_dir: Path, checkpoint: str, kind: dict) -> tuple[dict, dict]:
    """``(state_dict, settings)`` of a finished run: the weights of ``checkpoint`` and the run config's settings."""
    record, weights = (
        run_dir / "run_config.json",
        (Path(checkpoint) if Path(checkpoint).is_absolute() else run_dir / checkpoint),
    )
    for path in (record, weights):
        if not path.is_file():
            raise InputError(f"{path}: missing; is {run_dir} a finished training run folder of this bundle?")
    state = tensors_of(read_checkpoint(weights))
    if not is_state_dict(state):
        raise InputError(f"{weights}: holds no state dict of tensors")
    check_finite_weights(weights, state)
    return state, settings_of(json.loads(record.read_text())["config"], kind)


def _save(content: dict, out, overwrite: bool) -> str:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    return str(atomic_write(out, lambda tmp: torch.save(content, tmp), overwrite))


def make_model(
    run_dir: str | None = None,
    out: str = "models/model.pt",
    checkpoint: str = "best.pt",
    seg_run_dir: str | None = None,
    seg_checkpoint: str | None = None,
    seg_out: str = "models/seg_model.pt",
    overwrite: bool = False,
) -> None:
    """Write the weights of a registration run (and optionally of a segmenter run) with their settings.

    Args:
        run_dir: a ``configs/train.json`` run folder (``run_config.json`` and ``checkpoint`` inside); None: the
            segmenter only.
        out: the registration weights file to write (a state dict; the settings in its ``_extra_state``).
        checkpoint: the run's checkpoint to take (``best.pt``: the best validated epoch).
        seg_run_dir: a ``configs/seg_train.json`` run folder, for its settings.
        seg_checkpoint: the segmenter weights that run wrote (its ``checkpoint`` id; default
            ``<seg_run_dir>/../seg_model.pt`` is not assumed: give it).
        seg_out: the segmenter weights file to write.
        overwrite: replace existing output files.

    Prints the written paths. Weights with NaN/Inf are refused.
    """
    written = []
    if run_dir is None and seg_run_dir is None:
        raise InputError("give --run_dir (registration run) and/or --seg_run_dir (segmenter run)")
    if run_dir is not None:
        state, settings = _run_weights(Path(run_dir), checkpoint, REGISTRATION)
        written.append(_save({**state, EXTRA_STATE: encode_settings(settings)}, out, overwrite))
    if seg_run_dir is not None:
        if seg_checkpoint is None:
            raise InputError("--seg_checkpoint: give the segmenter weights file the seg_train.json run wrote")
        seg_state, seg_settings = _run_weights(Path(seg_run_dir), seg_checkpoint, SEGMENTATION)
        written.append(_save({"model": seg_state, "settings": seg_settings}, seg_out, overwrite))
    for path in written:
        print(f"wrote {path}")
    for path in map(Path, written):  # weights written into a bundle's models/: its manifest entries follow
        root = path.resolve().parent.parent
        if path.resolve().parent.name == "models" and (root / MANIFEST).is_file():
            print(f"updated {record_weights(root, [path])} for {path.name}")


def load_weights(
    network: torch.nn.Module,
    path,
    device="cpu",
    required: bool = False,
    bundle_root=BUNDLE_ROOT,
    settings: dict | None = None,
) -> torch.nn.Module:
    """Load a checkpoint (a state dict, or a training checkpoint with a ``"model"`` entry) if ``path`` exists.

    A file listed in ``bundle_root/large_files.yml``, or in the manifest of the bundle holding it, must match its
    SHA-256 before a byte is read (:func:`scripts.weights.manifest.read_checkpoint`; unlisted files, e.g. locally trained
    weights, are not checked).
    A weights file written by ``python -m scripts make-model`` stores the settings it was trained with (in the
    state dict's ``_extra_state``, or a ``"settings"`` entry);
    ``settings`` (of the running config, :func:`scripts.weights.trained_model.settings_of`) must equal them.
    Weights holding NaN/Inf are refused.
    Loads with ``weights_only=True``. A missing file is an :class:`InputError` when ``required``, else a warning
    (the network keeps its initial weights: for the registration network, a near-identity field).
    """
    if path and (required or os.path.exists(path)):  # read_checkpoint names a missing file or a folder
        state = read_checkpoint(path, bundle_root, device)
        weights, stored = tensors_of(state), stored_settings(state)
        _check_fits(network, weights, path)
        check_settings(path, stored, settings)
        check_finite_weights(path, weights)
        if EXTRA_STATE in network.state_dict():  # a network that keeps its settings (RegistrationNet)
            weights = {**weights, EXTRA_STATE: encode_settings(stored or {})}
        network.load_state_dict(weights)
    elif required:
        raise InputError("no checkpoint given (train the network first, or pass one)")
    else:
        logging.getLogger(__name__).warning("%s: no checkpoint, the network keeps its initial weights", path)
    return network.to(device).eval()


def _check_fits(network: torch.nn.Module, weights, path) -> None:
    """Raise :class:`InputError` (one line) unless ``weights`` has exactly the tensor names and shapes of ``network``."""
    name = type(network).__name__
    if not is_state_dict(weights):
        raise InputError(f"{path}: holds no state dict of tensors for {name}")
    expected = {k: v for k, v in network.state_dict().items() if k != EXTRA_STATE}
    missing, unexpected = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
    shapes = sorted(k for k in expected.keys() & weights.keys() if weights[k].shape != expected[k].shape)
    if missing or unexpected or shapes:
        example = (missing or unexpected or shapes)[0]
        raise InputError(
            f"{path}: weights do not fit this {name} ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(shapes)} wrong-shape tensors, e.g. {example!r}); a checkpoint of another architecture "
            "or network_def?"
        )
