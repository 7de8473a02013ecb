"""MONAI Label inference task: the MR labels of a case, registered onto the TRUS image the user opened.

Naming rule of the datastore (``--studies`` folder; ``docs/monailabel.md``)::

    <datastore>/<case>.nii.gz               TRUS image (listed by MONAI Label; the image the user opens)
    <datastore>/mr_images/<case>.nii.gz     its MR image
    <datastore>/mr_labels/<case>.nii.gz     MR labels on the MR grid: 4-D channel-last (X, Y, Z, C), channel 0 = gland,
                                            or 3-D (gland only)

MONAI Label lists only the NIfTI files at the top of the datastore, so the MR files in sub-folders are never
offered as images. The registration is the ``registrar`` of the bundle's ``configs/inference.json`` (mr2us: moving MR, fixed TRUS),
obtained with :func:`scripts.inference.registrar.load_registrar`; this module only finds the files and turns
the warped channel-last labels into one label map on the TRUS grid.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from scripts.data.nifti import InputError, write_nifti
from scripts.inference.registrar import OUTPUTS, load_registrar

__all__ = [
    "MR_IMAGES",
    "MR_LABELS",
    "DEFAULT_LABEL_NAMES",
    "RESULT_EXTENSIONS",
    "case_id",
    "paired_files",
    "label_map",
    "MRLabelsOnTRUS",
]

MR_IMAGES, MR_LABELS = "mr_images", "mr_labels"  # datastore sub-folders of the naming rule
# names of the label channels 0..5 of μ-RegPro-layout labels (channel 0 = gland; the others are landmarks)
DEFAULT_LABEL_NAMES = ("prostate", "landmark_1", "landmark_2", "landmark_3", "landmark_4", "landmark_5")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd")  # 3D Slicer's MONAI Label module asks for ".nrrd"


def case_id(image_path) -> str:
    """The case name of a datastore image: its file name without ``.nii.gz`` / ``.nii``."""
    name = Path(image_path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    raise InputError(f"{image_path}: not a NIfTI image (expected {' or '.join(NIFTI_SUFFIXES)})")


def paired_files(datastore, case: str) -> tuple[Path, Path]:
    """``(MR image, MR labels)`` of ``case`` under the naming rule; :class:`InputError` names a missing file."""
    found = []
    for folder in (MR_IMAGES, MR_LABELS):
        candidates = [Path(datastore) / folder / f"{case}{suffix}" for suffix in NIFTI_SUFFIXES]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise InputError(
                f"{candidates[0]}: missing; the TRUS image {case} needs its MR image in "
                f"<datastore>/{MR_IMAGES}/ and its MR labels in <datastore>/{MR_LABELS}/ (same file name)"
            )
        found.append(path)
    return found[0], found[1]


def label_map(labels: np.ndarray) -> np.ndarray:
    """Binary channel-last labels ``(X, Y, Z, C)`` -> a uint8 label map ``(X, Y, Z)``: 0 background, channel c -> c + 1.

    Where channels overlap the higher channel wins, so landmarks (channels 1..) stay visible inside the gland
    (channel 0). Written by hand: MONAI's argmax-style transforms give ties to the lowest channel.
    """
    if labels.ndim == 3:
        labels = labels[..., None]
    out = np.zeros(labels.shape[:3], np.uint8)
    for channel in range(labels.shape[-1]):
        out[labels[..., channel] > 0] = channel + 1
    return out


class MRLabelsOnTRUS(InferTask):
    """Register the case's MR to the TRUS image of the request and return the MR labels as a label map on the TRUS grid.

    Args:
        datastore: the datastore folder (MONAI Label's ``--studies``) holding the naming rule's sub-folders.
        config_files: inference config(s) of the bundle merged in order (default ``configs/inference.json``).
        checkpoint: registration weights (default: the config's ``checkpoint``; without weights, rigid only).
        label_names: names of the label channels 0..C-1 (label values 1..C of the returned map).
    """

    def __init__(self, datastore, config_files=None, checkpoint=None, label_names=DEFAULT_LABEL_NAMES):
        names = {str(name): value for value, name in enumerate(label_names, start=1)}
        super().__init__(
            type=InferType.SEGMENTATION,
            labels=names,
            dimension=3,
            description="MR gland and landmark labels registered onto the opened TRUS image (MRI-TRUS registration)",
            config={"result_extension": ".nii.gz"},
        )
        self.datastore = Path(datastore)
        self.registrar = load_registrar(config_files, {"checkpoint": str(checkpoint)} if checkpoint else None)

    def is_valid(self) -> bool:
        return True

    def __call__(self, request) -> tuple[str, dict]:
        """``request["image"]``: the TRUS image path (MONAI Label resolves the datastore id to it).

        Returns the label map file (``request["result_extension"]``, one of :data:`RESULT_EXTENSIONS`; the
        server deletes it after sending) and the response JSON with ``label_names`` (name -> label value).
        The client gets the reason of a failure, not a bare 500: HTTP 404 for an image id the datastore does
        not hold (MONAI Label passes an empty path), HTTP 400 with the :class:`InputError` line for a bad
        request or case (missing MR partner and where it must be, unreadable image, too many label channels).
        """
        if not request.get("image"):
            raise HTTPException(
                status_code=404,
                detail=f"unknown image id: the datastore {self.datastore} lists only "
                "the TRUS NIfTI files at its top level (see docs/monailabel.md)",
            )
        try:
            return self._register(request)
        except InputError as err:
            raise HTTPException(status_code=400, detail=str(err)) from None

    def _register(self, request) -> tuple[str, dict]:
        fixed = Path(request["image"])
        extension = request.get("result_extension") or self.config()["result_extension"]
        if extension not in RESULT_EXTENSIONS:
            raise InputError(f"result_extension={extension!r}: expected one of {RESULT_EXTENSIONS}")
        case = case_id(fixed)
        moving, moving_labels = paired_files(self.datastore, case)
        work = Path(tempfile.mkdtemp(prefix=f"mrtrus_{case}_"))
        try:
            result = self.registrar.register(moving, fixed, work, moving_labels, direction="mr2us")
            warped = nib.load(work / OUTPUTS["warped_label"])
            labels = np.asarray(warped.dataobj)
            channels = 1 if labels.ndim == 3 else labels.shape[-1]
            if channels > len(self.labels):
                raise InputError(
                    f"{moving_labels}: has {channels} label channels but the app names only "
                    f"{len(self.labels)} (set --conf label_names)"
                )
            nifti = write_nifti(label_map(labels), warped.affine, work / f"{case}_labels.nii.gz")
            fd, out = tempfile.mkstemp(prefix=f"{case}_mr_labels_", suffix=extension)
            os.close(fd)
            if extension == ".nrrd":  # ITK converts the NIfTI's RAS affine to NRRD's LPS space
                itk.imwrite(itk.imread(str(nifti)), out)
            else:
                shutil.copyfile(nifti, out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        names = dict(list(self.labels.items())[:channels])
        return out, {
            "label_names": names,
            "case": case,
            "moving_image": str(moving),
            "moving_labels": str(moving_labels),
            "rigid": result["rigid"]["method"],
            "deformable": result["deformable"],
        }
