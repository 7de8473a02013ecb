"""The registrar: one object that registers an MR–TRUS pair end to end, declared by ``configs/inference.json``.

Stages of :meth:`Registrar.register` (``docs/pipeline.md``, ``docs/architecture.md``), each a method:

0. masks: the gland masks given with the pair, else predicted by the segmenter (the rule below);
1. the pair stage (:class:`scripts.inference.pair.PairStage`): read and check, ANTs rigid R (fixed -> moving,
   LPS), the network box on the fixed image, the scaled (and with ``roi_mask`` masked) network inputs;
2. the network's DDF in box voxels, as a box field u in LPS mm; the inverse deformable part is the integral of
   -v for a velocity network, else a numerical inverse;
3. ONE resampling of the original moving image and labels through ``p -> R(p + u(p))`` (outside the box, R);
4. files: warped image and labels, composed and inverse transforms (NIfTI + ITK .h5), ANTs rigid ``.mat`` and
   box warps, ``result.json``; written into a private folder published by one rename.

Masks rule (the same at every entry point: bundle run, CLI, MONAI Deploy, MONAI Label): a pair without both gland
masks gets them from the segmenter; when the config declares none (``use_seg`` false) and the network needs
masked inputs (``roi_mask``), or the segmenter's weights file is missing, registration stops with an
:class:`InputError` saying what to pass. Nothing is dropped silently.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser

from scripts.data.case_folder import case_transaction, check_replaceable, is_taken
from scripts.data.datalist import check_direction, load_split
from scripts.data.nifti import InputError, flag, refuse_existing, user_error, write_json, write_nifti
from scripts.inference.memory import keep_freed_memory
from scripts.inference.pair import PairStage, Volume
from scripts.inference.timing import StageTimer
from scripts.spatial.composed import (
    compose_field,
    inverse_composed_field,
    invert_box_field,
    warp,
    write_ants_rigid,
    write_field_h5,
    write_field_nifti,
)
from scripts.spatial.geometry import box_ddf_to_mm
from scripts.spatial.points import read_label

__all__ = ["OUTPUTS", "MASK_OUTPUTS", "Registrar", "load_registrar", "lost_channels", "refuse_taken_case_folders"]

BUNDLE_ROOT = Path(__file__).resolve().parents[2]  # holds configs/ and large_files.yml
CONFIG = BUNDLE_ROOT / "configs" / "inference.json"
# output key -> file name inside the case folder
OUTPUTS = {
    "warped_image": "warped_image.nii.gz",
    "warped_label": "warped_label.nii.gz",
    "forward_field": "transform_fixed_to_moving.nii.gz",
    "forward_h5": "transform_fixed_to_moving.h5",
    "inverse_field": "transform_moving_to_fixed.nii.gz",
    "inverse_h5": "transform_moving_to_fixed.h5",
    "ants_rigid": "ants_rigid.mat",
    "ants_warp": "ants_warp.nii.gz",
    "ants_rigid_inverse": "ants_rigid_inverse.mat",
    "ants_inverse_warp": "ants_inverse_warp.nii.gz",
    "result": "result.json",
}
# predicted gland masks (written only when the registrar segments the pair itself)
MASK_OUTPUTS = {"moving_mask": "moving_gland.nii.gz", "fixed_mask": "fixed_gland.nii.gz"}


class Registrar:
    """Registers pairs of NIfTI files with one network, one pair stage and one optional segmenter.

    Args:
        network: a :class:`scripts.networks.contract.RegistrationNetwork` (``forward_train`` -> ``ddf`` (1, 3,
            H, W, D) box voxels and ``velocity`` or None; ``integrate``), or None: rigid only.
        pair: the :class:`scripts.inference.pair.PairStage` (box, rigid, intensities, ``roi_mask``).
        segmenter: ``image path -> (mask (X, Y, Z), affine)`` on that image's grid
            (:class:`scripts.inference.segmentation.GlandSegmenter`), or None.
        inferer: MONAI inferer ``inferer(inputs, forward)``; None calls the network directly.
        postprocessing: transform of the (C, X, Y, Z) warped soft labels (e.g. ``AsDiscrete``); None: threshold.
        label_threshold: binarisation of warped labels (and what counts as a label voxel).
        device: where the network runs; amp: bfloat16 autocast of its forward (docs/speed.md).
        direction: "mr2us" or "us2mr", recorded in ``result.json`` (a call may give its own).
        overwrite: replace earlier case folders whole (a call may give its own); else they are refused.
    """

    def __init__(
        self,
        network,
        pair: PairStage,
        segmenter=None,
        inferer=None,
        postprocessing=None,
        label_threshold: float = 0.5,
        device="cpu",
        amp: bool = False,
        direction: str = "mr2us",
        overwrite: bool = False,
    ):
        self.network, self.pair, self.segmenter, self.inferer = network, pair, segmenter, inferer
        self.postprocessing, self.label_threshold = postprocessing, float(label_threshold)
        self.device, self.amp = torch.device(device), flag(amp, "amp")
        self.direction, self.overwrite = check_direction(direction), flag(overwrite, "overwrite")

    def register(
        self,
        moving_image,
        fixed_image,
        out_dir,
        moving_labels=None,
        moving_mask=None,
        fixed_mask=None,
        direction: str | None = None,
        rigid=None,
        overwrite: bool | None = None,
        publish: bool = True,
    ) -> dict:
        """Register ``moving_image`` to ``fixed_image`` (paths) and write the outputs into ``out_dir``.

        ``moving_labels``: 3-D or 4-D channel-last labels on the moving grid (channel 0 the gland);
        ``moving_mask``/``fixed_mask``: gland masks on each image's grid; ``rigid``: a given 4x4 LPS fixed ->
        moving matrix instead of the ANTs step. ``overwrite``: replace an earlier case folder whole (else an
        ``out_dir`` holding files raises ``FileExistsError`` before anything runs). ``publish`` false:
        ``out_dir`` is a private folder the caller publishes itself (the CLI adds QC and pictures first).
        Returns ``result.json``'s content, with ``seconds`` per stage.
        """
        keep_freed_memory()  # large arrays keep their pages between stages and registrations (memory.py)
        direction = self.direction if direction is None else direction
        overwrite = self.overwrite if overwrite is None else overwrite
        check_direction(direction)
        args = (moving_image, fixed_image, moving_labels, moving_mask, fixed_mask, direction, rigid)
        if not flag(publish, "publish"):
            return self._register_into(Path(out_dir), *args)
        with case_transaction(out_dir, overwrite, args[:5]) as stage:
            return self._register_into(stage, *args)

    def _register_into(
        self, stage, moving_image, fixed_image, moving_labels, moving_mask, fixed_mask, direction, rigid
    ):
        """:meth:`register`'s stages, every file written into the private folder ``stage``."""
        timer = StageTimer()
        with timer("read"):
            moving, fixed = self.pair.read(moving_image, "moving image"), self.pair.read(fixed_image, "fixed image")
            labels = self._read_labels(moving_labels, moving, moving_image)
        masks, sources = self._masks(stage, moving_image, fixed_image, moving_mask, fixed_mask, timer)
        with timer("rigid"):
            rigid_info = {"method": "given"}
            if rigid is None:
                rigid, rigid_info = self.pair.rigid(fixed_image, moving_image, masks["fixed"], masks["moving"])
            rigid = np.asarray(rigid, np.float64)
        with timer("box"):
            box = self.pair.box(moving, fixed, rigid, moving_image, fixed_image)
        u_box, w_box, inverse = self._deform(moving, fixed, rigid, box, masks, timer)
        with timer("resampling"):
            forward = compose_field(u_box, box, rigid, fixed.affine, fixed.data.shape)
            backward = inverse_composed_field(w_box, box, rigid, moving.affine, moving.data.shape)
            stack = moving.data[..., None] if labels is None else np.concatenate([moving.data[..., None], labels], -1)
            warped = warp(stack, moving.affine, forward, fixed.affine)
        with timer("writing"):
            hard = self._binarise(warped[..., 1:]) if labels is not None else None
            files = self._write(stage, moving, fixed, warped[..., 0], hard, forward, backward, u_box, w_box, box, rigid)
        record = self._result(moving_image, fixed_image, direction, files, sources, masks, rigid, rigid_info, box)
        lost = [] if hard is None else lost_channels(labels, hard, self.label_threshold)
        result = {**record, "inverse": inverse, "label_channels_lost": lost, "seconds": timer.seconds}
        write_json(result, stage / OUTPUTS["result"])
        return result

    def _result(self, moving_image, fixed_image, direction, files, sources, masks, rigid, rigid_info, box) -> dict:
        """``result.json``'s record of the inputs, files, rigid, masks, box and the ANTs transform lists (the caller
        adds the inverse's method, ``label_channels_lost`` — moving label channels with no voxel left after
        warping, which the QC warns about — and the seconds per stage)."""
        predicted = {f"{k}_mask": MASK_OUTPUTS[f"{k}_mask"] for k, s in sources.items() if s == "predicted"}
        return {
            "direction": direction,
            "moving_image": str(moving_image),
            "fixed_image": str(fixed_image),
            "files": {**files, **predicted},
            "rigid": {"matrix_lps_fixed_to_moving": rigid.tolist(), **rigid_info},
            "deformable": "none (rigid only)" if self.network is None else "network",
            "masks": self._mask_record(masks, sources),
            "network_box": box.to_dict(),
            "ants_forward": [OUTPUTS["ants_warp"], OUTPUTS["ants_rigid"]],
            # ANTs' convention (its invtransforms): the forward .mat inverted, then the inverse warp; antspyx's
            # apply_transforms inverts a leading .mat by default, antsApplyTransforms needs -t [ants_rigid.mat,1]
            "ants_inverse": [OUTPUTS["ants_rigid"], OUTPUTS["ants_inverse_warp"]],
            "ants_inverse_whichtoinvert": [True, False],
        }

    def _read_labels(self, path, moving: Volume, moving_image):
        """Moving labels (X, Y, Z, C) on the moving grid, gland in channel 0 (not empty), or None."""
        if path is None:
            return None
        labels, affine, _ = read_label(path, what="moving label")  # integer maps split into channels
        if labels.shape[:3] != moving.data.shape or not np.allclose(affine, moving.affine, atol=1e-3):
            raise InputError(f"{path}: label grid differs from the moving image's ({moving_image})")
        labels = labels if labels.ndim == 4 else labels[..., None]
        if not (labels[..., 0] >= self.label_threshold).any():
            raise InputError(f"{path}: gland label (channel 0) is empty (no voxel >= {self.label_threshold:g})")
        return labels

    def _masks(self, stage, moving_image, fixed_image, moving_mask, fixed_mask, timer) -> tuple[dict, dict]:
        """Gland mask paths ``{"moving", "fixed"}`` (None: none) and their sources, applying the masks rule."""
        given = {"moving": moving_mask, "fixed": fixed_mask}
        missing = [k for k, v in given.items() if v is None]
        if missing and self.segmenter is None and self.pair.roi_mask and self.network is not None:
            raise InputError(
                f"roi_mask: the network takes gland-masked images but the {' and '.join(missing)} gland mask is "
                "missing and no segmenter is declared: pass moving_mask and fixed_mask, set use_seg true (with "
                "segmenter weights), or set roi_mask false"
            )
        sources = {k: "given" if v is not None else "none" for k, v in given.items()}
        images = {"moving": moving_image, "fixed": fixed_image}
        for key in missing if self.segmenter is not None else []:
            with timer("segmentation"):
                mask, affine = self.segmenter(images[key])
            with timer("writing"):
                given[key] = write_nifti(mask.astype(np.uint8), affine, stage / MASK_OUTPUTS[f"{key}_mask"])
            sources[key] = "predicted"
        return given, sources

    def _mask_record(self, masks: dict, sources: dict) -> dict:
        """``result.json``'s masks: a predicted mask by its file name in the case folder, a given one by its path."""
        record = {"source": {f"{k}_mask": v for k, v in sources.items()}}
        record["roi_mask"] = bool(self.pair.roi_mask and self.network is not None)
        for key, path in masks.items():
            record[key] = MASK_OUTPUTS[f"{key}_mask"] if sources[key] == "predicted" else path and str(path)
        return record

    def _deform(self, moving: Volume, fixed: Volume, rigid, box, masks: dict, timer):
        """The network's box field u and its inverse w, (H, W, D, 3) LPS mm (None, None: rigid only)."""
        if self.network is None:
            return None, None, "none"
        with timer("box"):
            glands = None
            if self.pair.roi_mask:
                glands = [self.pair.read_mask(masks[k], f"{k} mask") for k in ("moving", "fixed")]
            inputs = self.pair.inputs(moving, fixed, rigid, box, glands)
        with timer("network"):
            ddf, inverse_ddf = self._predict(inputs[None].to(self.device))
            u_box = box_ddf_to_mm(ddf, box)
            if inverse_ddf is not None:
                return u_box, box_ddf_to_mm(inverse_ddf, box), "integrated -velocity"
            return u_box, invert_box_field(u_box, box), "numerical (ITK fixed point)"

    def _predict(self, inputs: torch.Tensor):
        """The network's DDF and, for a velocity network, exp(-v): (3, H, W, D) numpy arrays, box voxels."""
        network = self.network
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.inferer(inputs, network.forward_train) if self.inferer else network.forward_train(inputs)
            ddf = out["ddf"][0].float().cpu().numpy()
            if out.get("velocity") is None:  # a direct-DDF network (LocalNet): numerical inverse
                return ddf, None
            return ddf, network.integrate(-out["velocity"].float())[0].float().cpu().numpy()

    def _binarise(self, soft: np.ndarray) -> np.ndarray:
        """Warped soft labels (X, Y, Z, C) -> binary, by ``postprocessing`` or ``label_threshold``."""
        if self.postprocessing is None:
            return soft >= self.label_threshold
        return np.moveaxis(np.asarray(self.postprocessing(torch.as_tensor(np.moveaxis(soft, -1, 0)))), 0, -1)

    def _write(self, stage, moving, fixed, image, labels, forward, backward, u_box, w_box, box, rigid) -> dict:
        """Write the output files concurrently (zlib and file I/O release the GIL); returns key -> file name."""
        paths = {
            k: stage / v for k, v in OUTPUTS.items() if k != "result" and (k != "warped_label" or labels is not None)
        }
        zero = np.zeros(tuple(box.shape) + (3,))
        jobs = [
            (write_field_h5, backward, moving.affine, paths["inverse_h5"]),  # the largest files first
            (write_field_nifti, backward, moving.affine, paths["inverse_field"]),
            (write_field_h5, forward, fixed.affine, paths["forward_h5"]),
            (write_field_nifti, forward, fixed.affine, paths["forward_field"]),
            (write_nifti, image.astype(np.float32), fixed.affine, paths["warped_image"]),
            (write_field_nifti, zero if u_box is None else u_box, box.affine, paths["ants_warp"]),
            (write_field_nifti, zero if w_box is None else w_box, box.affine, paths["ants_inverse_warp"]),
            (write_ants_rigid, rigid, paths["ants_rigid"]),
            (write_ants_rigid, np.linalg.inv(rigid), paths["ants_rigid_inverse"]),
        ]
        if labels is not None:
            jobs.append((write_nifti, labels.astype(np.uint8), fixed.affine, paths["warped_label"]))
        with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
            for future in [pool.submit(*job) for job in jobs]:
                future.result()
        return {k: p.name for k, p in paths.items()}

    def register_folder(self, dataset_dir, split: str, out_dir) -> list:
        """Register every case of a μ-RegPro-layout split into ``out_dir/<case>/``; refuses taken folders first."""
        cases = load_split(dataset_dir, split, self.direction)
        refuse_taken_case_folders(out_dir, cases, self.overwrite)
        return [
            self.register(c["moving_image"], c["fixed_image"], Path(out_dir) / c["case"], c["moving_label"])
            for c in cases
        ]

    def run(
        self,
        output_dir,
        moving=None,
        fixed=None,
        moving_label=None,
        moving_mask=None,
        fixed_mask=None,
        dataset_dir=None,
        split: str = "holdout",
    ) -> list:
        """``configs/inference.json``'s ``run``: one pair (``moving`` and ``fixed``, paths; outputs in ``output_dir``)
        or every case of a μ-RegPro split (``dataset_dir``; outputs in ``output_dir/<case>/``)."""
        if (moving is None) != (fixed is None):
            raise InputError("give both moving and fixed (one pair), or neither (a μ-RegPro dataset_dir)")
        if moving is not None:
            return [self.register(moving, fixed, output_dir, moving_label, moving_mask, fixed_mask)]
        if dataset_dir is None:
            raise InputError("give moving and fixed images, or a dataset_dir in the μ-RegPro layout")
        return self.register_folder(dataset_dir, split, output_dir)


def lost_channels(labels: np.ndarray, warped: np.ndarray, threshold: float = 0.5) -> list[int]:
    """Channels that hold a structure in the moving ``labels`` (X, Y, Z, C; a voxel >= ``threshold``) but none in
    the binarised ``warped`` labels (X', Y', Z', C): outside the fixed field of view after the transform, or
    smaller than what linear resampling onto the fixed grid keeps above the threshold (a small landmark on a
    coarse grid). Map such a structure's centre as a point instead (``--points``)."""
    present = (labels >= threshold).reshape(-1, labels.shape[-1]).any(0)
    kept = np.asarray(warped, bool).reshape(-1, warped.shape[-1]).any(0)
    return [int(c) for c in np.flatnonzero(present & ~kept)]


def refuse_taken_case_folders(out_dir, cases, overwrite=False, extra=(), inputs=()) -> None:
    """Raise ``FileExistsError`` if any case folder ``out_dir/<case>`` (or an ``extra`` path) already holds files;
    with ``overwrite``, :class:`InputError` if one of them could not be replaced safely
    (:func:`scripts.data.case_folder.check_replaceable`: not a case folder, or holding an input of its case or one
    of ``inputs``, e.g. the config and checkpoint files). Checked before a folder run registers anything."""
    folders = [Path(out_dir) / c["case"] for c in cases]
    if flag(overwrite, "overwrite"):
        for folder, case in zip(folders, cases):
            check_replaceable(
                folder, True, [*(v for k, v in case.items() if k != "case" and isinstance(v, str)), *inputs]
            )
        return
    refuse_existing([f for f in folders if is_taken(f)] + list(extra), False, f"outputs in {out_dir}")


def load_registrar(config_files=None, overrides: dict | None = None, rigid_without_weights: bool = True) -> Registrar:
    """``configs/inference.json``'s ``registrar`` (or that of ``config_files`` merged in order), ids set from
    ``overrides`` first: the one way every front-end (CLI, MONAI Deploy, MONAI Label) builds it.

    A config file that is missing or does not parse is an :class:`InputError` naming it. With
    ``rigid_without_weights``, a missing registration weights file (the config's ``checkpoint``) gives a warning
    and a rigid-only registrar (``network`` None), as the front-ends always did; the bundle run stops instead.
    """
    if config_files is None:
        files = [CONFIG]
    else:
        files = list(config_files) if isinstance(config_files, (list, tuple)) else [config_files]
    parser = _read_configs(files)
    parser["bundle_root"] = str(BUNDLE_ROOT)
    _check_checkpoint(parser, (overrides or {}).get("checkpoint"))
    for key, value in (overrides or {}).items():
        parser[key] = value
    if rigid_without_weights:
        _rigid_only_without_weights(parser)
    try:
        return parser.get_parsed_content("registrar")
    except Exception as err:  # MONAI wraps errors raised in config expressions: surface the user's own
        cause = user_error(err)
        if cause is None:
            raise
        raise cause from None


def _read_configs(files) -> ConfigParser:
    """A parser holding ``files`` merged in order; a missing or unreadable file is an :class:`InputError` naming it."""
    parser = ConfigParser()
    for path in files:  # one by one, so that a file that does not parse is named
        if not Path(path).is_file():
            raise InputError(
                f"{path}: config {'is a folder, not a file' if Path(path).is_dir() else 'file does not exist'}"
            )
        try:
            parser.load_config_file(str(path))
        except Exception as err:  # json and yaml raise their own types
            raise InputError(f"{path}: cannot read the config ({type(err).__name__}: {err})") from None
    parser.read_config([str(f) for f in files])  # later files override earlier ones, as with the bundle runner
    return parser


def _check_checkpoint(parser: ConfigParser, checkpoint) -> None:
    """A checkpoint a user names must exist and fit the config's kind of network (an ONNX network loads none)."""
    if checkpoint is not None and isinstance(parser.get("network"), dict):  # e.g. configs/inference_onnx.json
        raise InputError(
            f"{checkpoint}: the config's network ({parser.get('network').get('_target_')}) does not load "
            "PyTorch checkpoints; leave the checkpoint out"
        )
    if checkpoint is not None and not Path(checkpoint).is_file():
        problem = (
            "is a folder, not a checkpoint file" if Path(checkpoint).is_dir() else "checkpoint file does not exist"
        )
        raise InputError(f"{checkpoint}: {problem}")


def _rigid_only_without_weights(parser: ConfigParser) -> None:
    """Without the config's registration weights file: a warning, and ``network`` None (the rigid step only)."""
    if not isinstance(parser.get("network"), dict) and parser.get("network") is not None:
        weights = Path(parser.get_parsed_content("checkpoint"))
        if not weights.is_file():
            logging.getLogger(__name__).warning(
                "no trained weights at %s: registering with the RIGID step only (no deformable part); train the "
                "network (configs/train.json) or pass a checkpoint",
                weights,
            )
            parser["network"] = None
