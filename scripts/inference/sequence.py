"""Registering a static MR to a live TRUS sequence, frame by frame, with the network's state kept between frames.

A sequence is a 4-D NIfTI ``(X, Y, Z, T)`` (or a list of 3-D frames on one grid). Each frame is registered by
the :class:`scripts.inference.registrar.Registrar` like a pair (rigid, box, network, outputs), into
``<out>/frameNNN/``; a sequence network (:class:`scripts.networks.sequence.SequenceRegistrationNet`) is run
streaming through :class:`StreamingNetwork`: one frame in, one field out, its state kept for the next frame.
A static network registers every frame on its own. ``<out>`` also gets the frames as 3-D files
(``inputs/frameNNN.nii.gz``), the 4-D ``warped_label_sequence.nii.gz`` (X, Y, Z, T, C),
``transform_fixed_to_moving_sequence.nii.gz`` (X, Y, Z, T, 3; LPS mm, as each frame's field) and
``sequence.json`` (per-frame results and seconds).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from scripts.data.case_folder import case_transaction
from scripts.data.nifti import InputError, load_array, read_nifti, write_json, write_nifti
from scripts.inference.pair import Volume, check_contrast
from scripts.inference.registrar import MASK_OUTPUTS, OUTPUTS
from scripts.networks.sequence import SequenceRegistrationNet

__all__ = ["read_sequence", "StreamingNetwork", "register_sequence", "SEQUENCE_OUTPUTS"]

SEQUENCE_OUTPUTS = {
    "warped_label": "warped_label_sequence.nii.gz",
    "forward_field": "transform_fixed_to_moving_sequence.nii.gz",
    "record": "sequence.json",
}


def read_sequence(source, what: str = "fixed sequence") -> tuple[list[Volume], float | None]:
    """The frames of a 4-D NIfTI (X, Y, Z, T), or of a list of 3-D NIfTI files, and the frame interval (s, or None).

    Refused with an :class:`InputError` naming the file: not 4-D, a single frame, frames on different grids
    (a list), a frame with NaN/Inf values or a constant frame.
    """
    paths = [source] if isinstance(source, (str, Path)) else list(source)
    if len(paths) == 1:
        img = read_nifti(paths[0], ndim=(3, 4), what=what)
        if img.ndim == 3:
            raise InputError(f"{paths[0]}: {what} is 3-D {img.shape}; a sequence is 4-D (X, Y, Z, T)")
        try:
            data = np.asarray(img.dataobj, dtype=np.float32)
        except Exception as err:  # truncated gzip streams and short files fail only here
            raise InputError(f"{paths[0]}: cannot read the voxel data of the {what} ({err})") from None
        frames = [Volume(data[..., t], img.affine) for t in range(data.shape[3])]
        names = [f"{paths[0]} frame {t}" for t in range(len(frames))]
        interval = float(img.header.get_zooms()[3]) if img.header.get_xyzt_units()[1] == "sec" else None
    else:
        frames, names, interval = [], [], None
        for path in paths:
            img = read_nifti(path, ndim=3, what=f"{what} frame")
            frames.append(Volume(load_array(img, path, f"{what} frame"), img.affine))
            names.append(str(path))
        for name, frame in zip(names[1:], frames[1:]):
            if frame.data.shape != frames[0].data.shape or not np.allclose(frame.affine, frames[0].affine, atol=1e-4):
                raise InputError(
                    f"{name}: frame grid {frame.data.shape} / affine differs from the first frame's "
                    f"({names[0]}: {frames[0].data.shape}); all frames must share one grid"
                )
    if len(frames) < 2:
        raise InputError(f"{names[0]}: {what} has 1 frame; register a single frame as a 3-D image")
    for name, frame in zip(names, frames):
        if not np.isfinite(frame.data).all():
            raise InputError(f"{name}: {what} has NaN or Inf values")
        check_contrast(frame.data, name, what)
    return frames, interval


class StreamingNetwork:
    """A sequence network seen as a pair network (the registrar's contract) that keeps its state between calls.

    ``forward_train(image)`` runs ``network.step(image, state)`` and keeps the new state; :meth:`reset` starts a
    new sequence. Frames must come in order, one at a time (batch size 1).
    """

    def __init__(self, network: SequenceRegistrationNet):
        self.network, self.state, self.integrate = network, None, network.integrate

    def reset(self) -> None:
        self.state = None

    def forward_train(self, image):
        out, self.state = self.network.step(image, self.state)
        return out

    def __call__(self, image, train: bool = False):
        out = self.forward_train(image)
        return out if train else out["ddf"]


def register_sequence(
    registrar,
    moving_image,
    fixed_sequence,
    out_dir,
    moving_labels=None,
    moving_mask=None,
    fixed_masks=None,
    overwrite: bool = False,
    register_frame=None,
) -> dict:
    """Register ``moving_image`` to every frame of ``fixed_sequence`` (a 4-D NIfTI or a list of 3-D frames).

    ``fixed_masks``: a 4-D gland mask sequence (X, Y, Z, T) on the sequence's grid, or None (the masks rule per
    frame; the moving gland, when predicted, is predicted once, at frame 0). ``register_frame(registrar, pair,
    frame_out)`` registers one frame (default: ``registrar.register``; the CLI passes its own, which adds QC,
    pictures and points) and returns its record. Nothing is published unless every frame succeeds; ``out_dir`` is
    refused when it holds files, unless
    ``overwrite``. Returns ``sequence.json``'s content.
    """
    frames, interval = read_sequence(fixed_sequence)
    masks = _mask_frames(fixed_masks, frames) if fixed_masks is not None else [None] * len(frames)
    register_frame = register_frame or (lambda r, pair, out: r.register(out_dir=out, **pair))
    network = registrar.network
    streaming = isinstance(network, SequenceRegistrationNet)
    sources = [p for p in (moving_image, fixed_sequence, moving_labels, moving_mask, fixed_masks) if p is not None]
    with case_transaction(out_dir, overwrite, [p for p in sources if isinstance(p, (str, Path))]) as stage:
        if streaming:
            registrar.network = StreamingNetwork(network)
        try:
            records = []
            for t, (frame, mask) in enumerate(zip(frames, masks)):
                frame_path = write_nifti(frame.data.astype(np.float32), frame.affine, stage / "inputs" / _name(t))
                mask_path = (
                    None if mask is None else write_nifti(mask, frame.affine, stage / "inputs" / f"gland_{_name(t)}")
                )
                pair = {
                    "moving_image": moving_image,
                    "fixed_image": frame_path,
                    "moving_labels": moving_labels,
                    "moving_mask": moving_mask,
                    "fixed_mask": mask_path,
                }
                start = time.perf_counter()
                result = register_frame(registrar, pair, stage / _name(t, ""))
                records.append({"frame": t, "seconds_total": round(time.perf_counter() - start, 4), **result})
                predicted = stage / _name(t, "") / MASK_OUTPUTS["moving_mask"]
                if moving_mask is None and predicted.is_file():  # the MR is the same in every frame: segment it once
                    moving_mask = predicted
        finally:
            registrar.network = network
        record = {
            "frames": len(frames),
            "frame_interval_s": interval,
            "network": "sequence (state kept between frames)" if streaming else "per frame (no state)",
            "outputs": dict(SEQUENCE_OUTPUTS, frames="frameNNN/ (one registration each)", inputs="inputs/"),
            "per_frame": records,
        }
        _stack(stage, len(frames), moving_labels is not None)
        record = _published_paths(stage, Path(out_dir).absolute(), record, len(frames))
        write_json(record, stage / SEQUENCE_OUTPUTS["record"])
    return record


def _published_paths(stage: Path, out: Path, record: dict, frames: int) -> dict:
    """Paths into the private staging folder, in ``record`` and the frames' ``result.json``, as they will be."""

    def fix(obj):
        return json.loads(json.dumps(obj).replace(str(stage), str(out)))

    for t in range(frames):
        path = stage / _name(t, "") / OUTPUTS["result"]
        if path.is_file():
            write_json(fix(json.loads(path.read_text())), path, overwrite=True)
    return fix(record)


def _name(t: int, suffix: str = ".nii.gz") -> str:
    return f"frame{t:03d}{suffix}"


def _mask_frames(path, frames: list[Volume]) -> list[np.ndarray]:
    img = read_nifti(path, ndim=4, what="fixed gland mask sequence")
    if img.shape != (*frames[0].data.shape, len(frames)) or not np.allclose(img.affine, frames[0].affine, atol=1e-4):
        raise InputError(
            f"{path}: fixed gland mask sequence grid {img.shape} differs from the sequence's "
            f"{(*frames[0].data.shape, len(frames))}; give one mask per frame on the frames' grid"
        )
    data = np.asarray(img.dataobj) > 0
    return [data[..., t].astype(np.uint8) for t in range(len(frames))]


def _stack(stage: Path, frames: int, labels: bool) -> None:
    """The per-frame label and field files as one 4-D file each (time on axis 3), on the fixed grid."""
    for key in ("warped_label", "forward_field") if labels else ("forward_field",):
        imgs = [nib.load(stage / _name(t, "") / OUTPUTS[key]) for t in range(frames)]
        data = [np.asarray(img.dataobj) for img in imgs]
        data = [d.reshape(*d.shape[:3], -1) if key == "forward_field" else d for d in data]
        stacked = np.stack(data, axis=3)
        write_nifti(stacked, imgs[0].affine, stage / SEQUENCE_OUTPUTS[key], intent="vector" if "field" in key else None)
