"""Register one MR–TRUS pair end to end and write every output on the fixed image's own grid.

``register_pair`` is the one entry point used by ``configs/inference.json`` (and meant for MONAI Label,
MONAI Deploy and the CLI). Steps (``docs/pipeline.md``):

0. optional ROI pre-stage: a gland segmenter (:mod:`scripts.inference.segmentation`) predicts both masks;
1. rigid pre-alignment R (fixed -> moving, LPS) with ANTs (:mod:`scripts.spatial.rigid`), on the masks when
   there are any, or identity;
2. the network box on the fixed image (:func:`scripts.spatial.geometry.network_box`); the fixed image and the
   moving image seen through R are resampled onto it, intensities scaled by ``preprocessing``, and
   with ``roi_mask`` multiplied by their masks;
3. the network predicts a DDF in box voxels; it becomes a box field u in LPS mm; the inverse deformable
   part is the integral of -v when the network exposes its velocity, else a numerical inverse;
4. ONE resampling of the original moving image and labels through ``p -> R(p + u(p))``; outside the box
   only R applies;
5. files: warped image and labels, the composed and inverse transforms (NIfTI + ITK .h5), the ANTs rigid
   ``.mat`` files and box warps, and ``result.json``.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from monai.networks.blocks import DVF2DDF
from monai.transforms import ScaleIntensityRangePercentiles

from scripts.data.case_folder import case_transaction, check_replaceable, is_taken
from scripts.data.datalist import check_direction, load_split
from scripts.data.nifti import MIN_VOXELS_PER_AXIS, InputError, flag, load_array, read_nifti, write_json, write_nifti
from scripts.inference.memory import keep_freed_memory
from scripts.inference.timing import StageTimer
from scripts.networks.registration import encode_settings
from scripts.spatial.composed import (
    compose_field,
    inverse_composed_field,
    invert_box_field,
    read_field_nifti,
    warp,
    write_ants_rigid,
    write_field_h5,
    write_field_nifti,
)
from scripts.spatial.geometry import (
    apply_affine,
    box_ddf_to_mm,
    grid_points,
    mm_to_box_ddf,
    network_box,
    sample,
    world_to_voxel,
)
from scripts.spatial.points import read_label
from scripts.spatial.rigid import rigid_prealign
from scripts.weights.manifest import is_state_dict, read_checkpoint
from scripts.weights.trained_model import EXTRA_STATE, check_finite_weights, check_settings, stored_settings, tensors_of

__all__ = [
    "OUTPUTS",
    "MASK_OUTPUTS",
    "check_contrast",
    "check_overlap",
    "box_inputs",
    "register_pair",
    "register_folder",
    "run_inference",
    "field_as_network",
    "load_weights",
]

BUNDLE_ROOT = Path(__file__).resolve().parent.parent  # holds large_files.yml
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
# predicted gland masks (written only when register_pair segments the pair itself)
MASK_OUTPUTS = {"moving_mask": "moving_gland.nii.gz", "fixed_mask": "fixed_gland.nii.gz"}


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


def field_as_network(field_path, box) -> callable:
    """A stand-in "network" returning a given fixed-grid displacement field (ITK convention) as a box DDF.

    Used to push a ground-truth field through exactly the same post-stage as the network's output.
    Returns a callable ``image (1, 2, H, W, D) -> ddf (1, 3, H, W, D)`` in box voxels.
    """
    ddf = torch.as_tensor(field_to_box_ddf(field_path, box)[None], dtype=torch.float32)
    return lambda image: ddf.to(image.device)


def field_to_box_ddf(field_path, box, rigid=None) -> np.ndarray:
    """A fixed-grid displacement field file (ITK convention, LPS mm) as the network's box field (3, H, W, D),
    box voxels, after the LPS fixed -> moving ``rigid`` (None: identity): u(p) = R^-1(p + d(p)) - p at the box
    points, so that R(p + u(p)) is the field's map, as :func:`scripts.spatial.composed.compose_field` composes."""
    field, affine = read_field_nifti(field_path)
    points = grid_points(box.affine, box.shape)
    moved = points + sample(field, affine, points)
    if rigid is not None:
        moved = apply_affine(np.linalg.inv(np.asarray(rigid, np.float64)), moved)
    return mm_to_box_ddf(moved - points, box)


def _read(path, what, ndim, min_size=1):
    img = read_nifti(path, ndim=ndim, what=what, min_size=min_size)
    return load_array(img, path, what), img.affine


def check_contrast(data: np.ndarray, path, what: str = "image") -> None:
    """Raise :class:`InputError` when an image is constant: percentile scaling and mutual information need contrast."""
    if data.size and data.min() == data.max():
        raise InputError(f"{path}: {what} is constant (every voxel is {data.flat[0]:g}); registration needs contrast")


def check_overlap(moving_affine, moving_shape, rigid, box, moving_path, fixed_path) -> None:
    """Raise :class:`InputError` when no voxel of the network ``box`` (on the fixed image) maps, through the
    LPS fixed -> moving ``rigid``, into the moving image's field of view: the network would see no moving image."""
    index = world_to_voxel(apply_affine(rigid, grid_points(box.affine, box.shape)), moving_affine)
    if not np.all((index >= -0.5) & (index <= np.asarray(moving_shape[:3], np.float64) - 0.5), axis=-1).any():
        raise InputError(
            f"{moving_path}: field of view does not overlap that of {fixed_path} after the rigid "
            "pre-alignment (check both images' affines, or enable the rigid step)"
        )


def _read_mask(path, what):
    """A gland mask (3-D, or channel 0 of a 4-D channel-last label) and its affine."""
    data, affine = _read(path, what, (3, 4))
    return (data if data.ndim == 3 else data[..., 0]), affine


def box_inputs(moving, fixed, rigid, box, preprocessing=None, masks=None) -> torch.Tensor:
    """The network input ``(2, H, W, D)`` = [moving seen through ``rigid``, fixed] on the network ``box``.

    ``moving`` and ``fixed`` are ``(array (X, Y, Z), nibabel affine)``; ``rigid`` is the 4x4 LPS fixed -> moving
    matrix. Linear sampling, then ``preprocessing`` per image (default: percentiles 1–99 -> [0, 1], clipped).
    With ``masks`` (``(moving mask, affine)``, ``(fixed mask, affine)``) each scaled image is multiplied by its
    gland mask (nearest, > 0.5), the paper's ROI images; zeroing after scaling keeps the gland's intensity scale.
    Shared by inference (:func:`register_pair`) and training (:class:`scripts.data.transforms.PairToBoxd`).
    """
    scale = preprocessing or ScaleIntensityRangePercentiles(lower=1, upper=99, b_min=0.0, b_max=1.0, clip=True)
    fixed_points = grid_points(box.affine, box.shape)
    points = (apply_affine(rigid, fixed_points), fixed_points)
    pair = [sample(data, affine, p) for (data, affine), p in zip((moving, fixed), points)]
    inputs = torch.stack([torch.as_tensor(scale(torch.as_tensor(x[None], dtype=torch.float32)))[0] for x in pair])
    if masks is not None:
        gland = [sample(data, affine, p, order=0) > 0.5 for (data, affine), p in zip(masks, points)]
        inputs = inputs * torch.as_tensor(np.stack(gland), dtype=inputs.dtype)
    return inputs


def _predict(network, inferer, inputs, int_steps, amp=False):
    """Run the network: returns (ddf, inverse ddf or None), (3, H, W, D) numpy, box voxels.

    ``amp``: bfloat16 autocast of the network's forward (its integration and sampling grids stay fp32).
    """
    with torch.inference_mode(), torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=flag(amp, "amp")):
        if hasattr(network, "forward_train"):  # RegistrationNet, VoxelMorph: the velocity gives the exact inverse
            out = inferer(inputs, network.forward_train) if inferer is not None else network.forward_train(inputs)
            if out.get("velocity") is None:  # a direct-DDF network (LocalNet): numerical inverse
                return out["ddf"][0].float().cpu().numpy(), None
            integrate = getattr(network, "integrate", None) or DVF2DDF(num_steps=int_steps)
            inverse = integrate(-out["velocity"].float())
            return out["ddf"][0].float().cpu().numpy(), inverse[0].float().cpu().numpy()
        out = inferer(inputs, network) if inferer is not None else network(inputs)
        return out[0].float().cpu().numpy(), None


def register_pair(
    moving_image,
    fixed_image,
    out_dir,
    moving_labels=None,
    network=None,
    direction: str = "mr2us",
    spatial_size=(128, 128, 120),
    depth_crop: int = 4,
    axcodes: str = "RAS",
    use_rigid: bool = True,
    rigid=None,
    moving_mask=None,
    fixed_mask=None,
    rigid_args: dict | None = None,
    preprocessing=None,
    inferer=None,
    device="cpu",
    int_steps: int = 7,
    label_threshold: float = 0.5,
    postprocessing=None,
    seg_network=None,
    roi_mask: bool = False,
    amp: bool = False,
    overwrite: bool = False,
    publish: bool = True,
) -> dict:
    """Register ``moving_image`` to ``fixed_image`` (NIfTI paths) and write the outputs into ``out_dir``.

    Args:
        moving_labels: 4-D channel-last (or 3-D) labels on the moving grid, warped channel by channel.
        network: module/callable ``(1, 2, H, W, D) [moving, fixed] -> (1, 3, H, W, D)`` DDF in box voxels;
            ``None``: identity deformable part (rigid only).
        direction: "mr2us" or "us2mr", recorded in ``result.json``.
        spatial_size, depth_crop, axcodes: the network box (:func:`scripts.spatial.geometry.network_box`).
        use_rigid, rigid: ANTs pre-alignment on/off, or a given 4x4 LPS fixed -> moving matrix.
        moving_mask, fixed_mask: gland masks (NIfTI) for the mask-based rigid; without both, Mattes MI.
        rigid_args: extra arguments of :func:`scripts.spatial.rigid.rigid_prealign`.
        preprocessing: intensity transform of each box image (default: percentiles 1–99 -> [0, 1], clipped,
            as in ``configs/train.json``).
        inferer: MONAI inferer ``inferer(inputs, network)``; ``None`` calls the network directly.
        int_steps: scaling-and-squaring steps for -v when the network has no ``integrate`` module.
        label_threshold: warped (linearly interpolated) labels are binarised at this value ...
        postprocessing: ... unless this transform of the (C, X, Y, Z) warped labels is given (e.g. ``AsDiscrete``).
        seg_network: gland segmenter ``image path -> (mask (X, Y, Z), affine)`` on that image's grid
            (:class:`scripts.inference.segmentation.GlandSegmenter`); when given and the masks are not, both glands are
            predicted (a missing one of the two only), written (``MASK_OUTPUTS``) and used by the rigid and
            by ``roi_mask``.
        roi_mask: multiply each scaled box image by its gland mask (the paper's ROI images) before the network.
        amp: run the network under bfloat16 autocast (about 2x faster on CPUs with AMX/AVX512-BF16; the
            field changes by ~0.5 % relative, docs/speed.md).
        overwrite: replace an earlier case folder whole; otherwise an ``out_dir`` holding files raises
            ``FileExistsError`` before anything runs.
        publish: write into a private staging folder and publish it as ``out_dir`` by one rename under a lock
            (:func:`scripts.data.case_folder.case_transaction`); false: ``out_dir`` is such a private folder already,
            opened by the caller to add files of its own (the CLI's QC, pictures and points) before publishing.

    Returns:
        the content of ``result.json`` (direction, output files, rigid matrix and method, network box, and
        ``seconds``: wall time per stage — read, segmentation, rigid, box, network, resampling, writing — and total).
    """
    arguments = dict(locals())  # every argument, handed on to the work below
    keep_freed_memory()  # large arrays keep their pages between stages and registrations (scripts/inference/memory.py)
    if roi_mask and None in (moving_mask, fixed_mask) and seg_network is None:
        raise InputError("roi_mask needs both gland masks (moving_mask and fixed_mask) or a seg_network")
    check_direction(direction)
    if not flag(publish, "publish"):
        return _register_into(Path(out_dir), **arguments)
    inputs = (moving_image, fixed_image, moving_labels, moving_mask, fixed_mask)
    with case_transaction(out_dir, overwrite, inputs) as stage:
        return _register_into(stage, **arguments)


def _register_into(
    stage: Path,
    moving_image,
    fixed_image,
    moving_labels,
    network,
    direction,
    spatial_size,
    depth_crop,
    axcodes,
    use_rigid,
    rigid,
    moving_mask,
    fixed_mask,
    rigid_args,
    preprocessing,
    inferer,
    device,
    int_steps,
    label_threshold,
    postprocessing,
    seg_network,
    roi_mask,
    amp,
    **_,
) -> dict:
    """:func:`register_pair`'s work, every file written into the private folder ``stage``."""
    timer = StageTimer()
    given = {"moving_mask": moving_mask, "fixed_mask": fixed_mask}
    predict = [k for k, v in given.items() if v is None] if seg_network is not None else []
    paths = {k: stage / v for k, v in OUTPUTS.items()}
    if moving_labels is None:
        paths.pop("warped_label")
    paths.update({k: stage / MASK_OUTPUTS[k] for k in predict})
    with timer("read"):
        moving, moving_affine = _read(moving_image, "moving image", 3, MIN_VOXELS_PER_AXIS)
        fixed, fixed_affine = _read(fixed_image, "fixed image", 3, MIN_VOXELS_PER_AXIS)
        check_contrast(moving, moving_image, "moving image")
        check_contrast(fixed, fixed_image, "fixed image")
        labels = None
        if moving_labels is not None:  # the label rules of scripts.spatial.points.read_label (integer maps split)
            labels, label_affine, _ = read_label(moving_labels, what="moving label")
            if labels.shape[:3] != moving.shape or not np.allclose(label_affine, moving_affine, atol=1e-3):
                raise InputError(f"{moving_labels}: label grid differs from the moving image's ({moving_image})")
            labels = labels if labels.ndim == 4 else labels[..., None]
            if not (labels[..., 0] >= label_threshold).any():
                raise InputError(f"{moving_labels}: gland label (channel 0) is empty (no voxel >= {label_threshold:g})")

    # 0. ROI pre-stage: gland masks predicted on each image's own grid
    images = {"moving_mask": moving_image, "fixed_mask": fixed_image}
    for key in predict:
        with timer("segmentation"):
            mask, affine = seg_network(images[key])
        with timer("writing"):
            given[key] = write_nifti(mask.astype(np.uint8), affine, paths[key])
    moving_mask, fixed_mask = given["moving_mask"], given["fixed_mask"]
    mask_source = {k: "predicted" if k in predict else ("given" if v is not None else "none") for k, v in given.items()}

    # 1. rigid (fixed -> moving, LPS)
    rigid_info = {"method": "given" if rigid is not None else ("none" if not use_rigid else None)}
    if rigid is None:
        rigid = np.eye(4)
        if use_rigid:
            with timer("rigid"):
                rigid, rigid_info = rigid_prealign(
                    fixed_image, moving_image, fixed_mask, moving_mask, **(rigid_args or {})
                )
    rigid = np.asarray(rigid, np.float64)

    # 2-3. network on the box
    with timer("box"):
        box = network_box(fixed_affine, fixed.shape, spatial_size, depth_crop, axcodes)
        check_overlap(moving_affine, moving.shape, rigid, box, moving_image, fixed_image)
    u_box = w_box = None
    inverse_method = "none"
    if network is not None:
        with timer("box"):
            masks = None
            if roi_mask:
                masks = (_read_mask(moving_mask, "moving mask"), _read_mask(fixed_mask, "fixed mask"))
            inputs = box_inputs((moving, moving_affine), (fixed, fixed_affine), rigid, box, preprocessing, masks)
        with timer("network"):
            ddf, inverse_ddf = _predict(network, inferer, inputs[None].to(device), int_steps, amp)
            u_box = box_ddf_to_mm(ddf, box)
            if inverse_ddf is not None:
                w_box, inverse_method = box_ddf_to_mm(inverse_ddf, box), "integrated -velocity"
            else:
                w_box, inverse_method = invert_box_field(u_box, box), "numerical (ITK fixed point)"

    # 4. one resampling through the composed transform
    with timer("resampling"):
        forward = compose_field(u_box, box, rigid, fixed_affine, fixed.shape)
        inverse = inverse_composed_field(w_box, box, rigid, moving_affine, moving.shape)
        stack = moving[..., None] if labels is None else np.concatenate([moving[..., None], labels], axis=-1)
        warped = warp(stack, moving_affine, forward, fixed_affine)

    # 5. files, written concurrently (zlib and file I/O release the GIL: ~2x on 2 cores)
    with timer("writing"):
        hard = None
        if labels is not None:
            soft = warped[..., 1:]
            if postprocessing is None:
                hard = soft >= label_threshold
            else:
                hard = np.moveaxis(np.asarray(postprocessing(torch.as_tensor(np.moveaxis(soft, -1, 0)))), 0, -1)
        lost = [] if hard is None else lost_channels(labels, hard, label_threshold)
        zero = np.zeros(tuple(box.shape) + (3,))
        jobs = [
            (write_field_h5, inverse, moving_affine, paths["inverse_h5"]),  # the largest files first
            (write_field_nifti, inverse, moving_affine, paths["inverse_field"]),
            (write_field_h5, forward, fixed_affine, paths["forward_h5"]),
            (write_field_nifti, forward, fixed_affine, paths["forward_field"]),
            (write_nifti, warped[..., 0].astype(np.float32), fixed_affine, paths["warped_image"]),
            (write_field_nifti, zero if u_box is None else u_box, box.affine, paths["ants_warp"]),
            (write_field_nifti, zero if w_box is None else w_box, box.affine, paths["ants_inverse_warp"]),
            (write_ants_rigid, rigid, paths["ants_rigid"]),
            (write_ants_rigid, np.linalg.inv(rigid), paths["ants_rigid_inverse"]),
        ]
        if hard is not None:
            jobs.append((write_nifti, hard.astype(np.uint8), fixed_affine, paths["warped_label"]))
        with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
            for future in [pool.submit(*job) for job in jobs]:
                future.result()
    result = {
        "direction": direction,
        "moving_image": str(moving_image),
        "fixed_image": str(fixed_image),
        "files": {k: p.name for k, p in paths.items() if k != "result"},
        "rigid": {"matrix_lps_fixed_to_moving": rigid.tolist(), **rigid_info},
        "deformable": "none (rigid only)" if network is None else "network",
        # a predicted mask by its file name in the case folder (as "files"), a given one by its path
        "masks": {
            "source": mask_source,
            "roi_mask": bool(roi_mask and network is not None),
            **{
                k.split("_")[0]: (MASK_OUTPUTS[k] if k in predict else None if v is None else str(v))
                for k, v in given.items()
            },
        },
        "inverse": inverse_method,
        "network_box": box.to_dict(),
        "ants_forward": [OUTPUTS["ants_warp"], OUTPUTS["ants_rigid"]],
        # ANTs' own convention (its invtransforms): the forward .mat, inverted, then the inverse warp; antspyx's
        # apply_transforms inverts a leading .mat by default, antsApplyTransforms needs -t [ants_rigid.mat,1]
        "ants_inverse": [OUTPUTS["ants_rigid"], OUTPUTS["ants_inverse_warp"]],
        "ants_inverse_whichtoinvert": [True, False],
        # moving label channels with voxels that have none after warping (QC warns; scripts.evaluation.qc)
        "label_channels_lost": lost,
        "seconds": timer.seconds,
    }
    write_json(result, paths["result"])
    return result


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
    (:func:`scripts.data.case_folder.check_replaceable`: not a case folder, or holding an input of its case or one of
    ``inputs``, e.g. the config and checkpoint files).

    Checked before a folder run registers anything, so that a refusal never leaves some cases redone.
    """
    folders = [Path(out_dir) / c["case"] for c in cases]
    if flag(overwrite, "overwrite"):
        for folder, case in zip(folders, cases):
            check_replaceable(
                folder, True, [*(v for k, v in case.items() if k != "case" and isinstance(v, str)), *inputs]
            )
        return
    taken = [f for f in folders if is_taken(f)] + [Path(p) for p in extra if Path(p).exists()]
    if taken:
        raise FileExistsError(
            f"{taken[0]}: already exists ({len(taken)} outputs in {out_dir}); pass --overwrite to replace"
        )


def register_folder(dataset_dir, split: str, out_dir, direction: str = "mr2us", **kwargs) -> list[dict]:
    """Register every case of a μ-RegPro-layout split; outputs go to ``out_dir/<case>/`` (see :func:`register_pair`)."""
    results, cases = [], load_split(dataset_dir, split, direction)
    refuse_taken_case_folders(out_dir, cases, kwargs.get("overwrite", False))
    for case in cases:
        results.append(
            register_pair(
                case["moving_image"],
                case["fixed_image"],
                Path(out_dir) / case["case"],
                moving_labels=case["moving_label"],
                direction=direction,
                **kwargs,
            )
        )
    return results


def run_inference(
    network,
    output_dir,
    moving=None,
    fixed=None,
    moving_label=None,
    dataset_dir=None,
    split: str = "holdout",
    direction: str = "mr2us",
    **kwargs,
) -> list[dict]:
    """``configs/inference.json``'s entry: one pair (``moving`` and ``fixed`` given, outputs in ``output_dir``)
    or every case of a μ-RegPro split (outputs in ``output_dir/<case>/``). ``kwargs`` go to :func:`register_pair`."""
    if (moving is None) != (fixed is None):
        raise InputError("give both moving and fixed (one pair), or neither (a μ-RegPro dataset_dir)")
    if moving is not None:
        return [register_pair(moving, fixed, output_dir, moving_label, network=network, direction=direction, **kwargs)]
    if dataset_dir is None:
        raise InputError("give moving and fixed images, or a dataset_dir in the μ-RegPro layout")
    return register_folder(dataset_dir, split, output_dir, direction, network=network, **kwargs)
