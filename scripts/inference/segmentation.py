"""The ROI pre-stage: one 3-D U-Net segmenting the prostate gland in MR and in TRUS.

One single-channel network serves both modalities (``docs/segmentation.md`` says why): every image of
a split, MR or TRUS, is one training sample, labelled by its own gland (label channel 0). The
transforms, network, loss and engines are MONAI's and live in ``configs/seg_train.json`` and
``configs/seg_inference.json``; this module holds what those configs and ``scripts/inference/pipeline.py`` need
around them: the per-image data list, a predictor that returns a mask on the input image's own grid,
and the writing of mask files (never over an existing file unless asked).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser

from scripts.data.datalist import case_name, load_split
from scripts.data.nifti import InputError, read_nifti, refuse_existing, write_nifti
from scripts.weights.trained_model import SEGMENTATION, load_weights, settings_of

__all__ = [
    "MODALITIES",
    "gland_items",
    "GlandSegmenter",
    "load_segmenter",
    "mask_outputs",
    "segment_files",
    "check_new_output",
]

MODALITIES = ("mr", "us")
MASK_DIRS = {"mr": "mr_glands", "us": "us_glands"}  # output folder per modality (dataset mode)


def gland_items(dataset_dir=None, split: str = "train", datalist=None, modalities=MODALITIES, check: bool = True):
    """One data dict per image of a split: ``{"case", "modality", "image", "label"}`` (paths).

    Each case of :func:`scripts.data.datalist.load_split` gives one item per modality in ``modalities``
    ("mr", "us"); ``label`` is the 4-D channel-last (or 3-D) label on that image's grid.
    """
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown:
        raise InputError(f"modalities must be among {MODALITIES}, got {unknown}")
    cases = load_split(dataset_dir, split, datalist=datalist, check=check)
    return [
        {"case": c["case"], "modality": m, "image": c[f"{m}_image"], "label": c[f"{m}_label"]}
        for c in cases
        for m in modalities
    ]


class GlandSegmenter:
    """Predict the binary gland mask of one 3-D image, on that image's own grid.

    Args:
        network: a segmentation network ``(1, 1, *seg_spatial_size) -> (1, 2, *seg_spatial_size)`` logits
            (background, gland), e.g. the config's MONAI ``UNet``.
        preprocessing: dictionary transform of ``{"image": path}`` producing the network input under
            ``"image"`` (a MetaTensor that records its invertible steps).
        postprocessing: dictionary transform of ``{"image", "pred"}`` turning the logits under ``"pred"``
            into a (1, X, Y, Z) mask on the original grid (``Invertd`` of the preprocessing, then the argmax of the two channels).
        inferer: MONAI inferer ``inferer(inputs, network)``; ``None`` calls the network directly.
        device: where the network runs.
    """

    def __init__(self, network, preprocessing, postprocessing, inferer=None, device="cpu"):
        self.network, self.preprocessing, self.postprocessing = network, preprocessing, postprocessing
        self.inferer, self.device = inferer, device

    def __call__(self, image_path) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(mask, affine)``: (X, Y, Z) uint8 gland mask on the image's grid and its nibabel affine."""
        source = read_nifti(image_path, ndim=3, what="image to segment")
        data = self.preprocessing({"image": str(image_path)})
        inputs = data["image"][None].to(self.device)
        if isinstance(self.network, torch.nn.Module):
            self.network.eval()
        with torch.no_grad():
            logits = self.inferer(inputs, self.network) if self.inferer is not None else self.network(inputs)
        data["pred"] = logits[0].detach().cpu()
        data["image"] = data["image"].cpu()
        mask = np.asarray(self.postprocessing(data)["pred"])[0]
        if mask.shape != tuple(source.shape):  # the postprocessing must undo every spatial step
            raise RuntimeError(f"{image_path}: predicted mask {mask.shape} is not on the image grid {source.shape}")
        return (mask > 0.5).astype(np.uint8), source.affine


class MissingSegmenter:
    """The declared gland segmenter whose weights file is missing: asked for a mask, it raises :class:`InputError`
    naming the file and what to pass instead (the registrar's masks rule, :mod:`scripts.inference.registrar`)."""

    def __init__(self, checkpoint):
        self.checkpoint = str(checkpoint)

    def __call__(self, image):
        raise InputError(
            f"{self.checkpoint}: no gland segmenter weights, and {image} comes without its gland mask: pass "
            "moving_mask and fixed_mask, train the segmenter (configs/seg_train.json), or set use_seg false "
            "(with roi_mask false: the network then sees whole images, which it was not trained on)"
        )


def load_segmenter(config_file, checkpoint=None, device="cpu", overrides: dict | None = None) -> GlandSegmenter:
    """Build the ``segmenter`` of ``configs/seg_inference.json`` (network, transforms) and load its weights.

    Used by ``configs/inference.json`` so that the registration pipeline segments exactly as the
    segmentation bundle does. ``overrides``: config ids -> values (e.g. ``{"seg_spatial_size": [96, 96, 96]}``).
    A missing weights file gives a :class:`MissingSegmenter`: the registrar needs it only for a pair without
    both gland masks, and then stops with an error that says what to pass.
    """
    parser = ConfigParser()
    parser.read_config(str(config_file))
    for key, value in {**(overrides or {}), "device": device}.items():
        parser[key] = value
    if checkpoint is not None:
        parser["checkpoint"] = str(checkpoint)
    if not Path(parser.get_parsed_content("checkpoint")).exists():
        return MissingSegmenter(parser.get_parsed_content("checkpoint"))
    segmenter = parser.get_parsed_content("segmenter")
    load_weights(
        segmenter.network,
        parser.get_parsed_content("checkpoint"),
        device,
        required=True,
        settings=settings_of(parser, SEGMENTATION),
    )
    return segmenter


def mask_outputs(output_dir, image=None, dataset_dir=None, split: str = "holdout", modalities=MODALITIES):
    """Pairs ``(image path, mask path)`` to segment: one image (mask ``output_dir/<name>_gland.nii.gz``), or
    every image of a μ-RegPro split (``output_dir/mr_glands/<case>.nii.gz``, ``output_dir/us_glands/<case>.nii.gz``)."""
    out = Path(output_dir)
    if image is not None:
        return [(str(image), out / f"{case_name(Path(image).name)}_gland.nii.gz")]
    if dataset_dir is None:
        raise InputError("give an image to segment, or a dataset_dir in the μ-RegPro layout")
    items = gland_items(dataset_dir, split, modalities=modalities)
    return [(i["image"], out / MASK_DIRS[i["modality"]] / f"{i['case']}.nii.gz") for i in items]


def segment_files(segmenter: GlandSegmenter, pairs, overwrite: bool = False) -> list[str]:
    """Segment every ``(image, mask path)`` pair and write the masks (uint8, the image's affine).

    Every output is checked before any work: an existing file raises ``FileExistsError`` unless ``overwrite``.
    """
    overwrite = refuse_existing([m for _, m in pairs], overwrite, "masks")
    written = []
    for image, mask_path in pairs:
        mask, affine = segmenter(image)
        written.append(str(write_nifti(mask, affine, mask_path, overwrite)))
    return written


def check_new_output(path, overwrite: bool = False, resume_from=None) -> str:
    """Refuse to start a training that would replace the weights file ``path`` (e.g. ``models/seg_model.pt``).

    Allowed when the file does not exist, when ``overwrite`` is set, or when the training resumes
    (``resume_from`` is a checkpoint path). Returns ``path``.
    """
    if Path(path).exists() and not overwrite and resume_from is None:
        raise InputError(f"{path}: weights file already exists; pass --overwrite true to replace it")
    return str(path)
