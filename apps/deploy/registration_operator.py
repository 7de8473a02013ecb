"""The MONAI Deploy operator that registers one moving/fixed NIfTI pair with the bundle's pipeline.

It builds nothing of its own: the registration is the ``registrar`` that ``configs/inference.json`` declares and runs
(network, weights, pair stage, segmenter, post-processing), obtained with
:func:`scripts.inference.registrar.load_registrar` as every front-end does.
Inputs, outputs and settings are described in ``docs/deploy.md``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from monai.deploy.core import Fragment, Operator, OperatorSpec

from scripts.data.nifti import InputError
from scripts.inference.registrar import CONFIG, load_registrar

__all__ = ["INPUTS", "OVERRIDES", "RegistrationOperator", "find_inputs", "find_model"]

# Registrar.register argument -> file stem in the input folder (".nii.gz" or ".nii"); the first two are required
INPUTS = {
    "moving_image": "moving",
    "fixed_image": "fixed",
    "moving_labels": "moving_labels",
    "moving_mask": "moving_mask",
    "fixed_mask": "fixed_mask",
}
# config file merged after configs/inference.json when it lies beside the weights (e.g. a smaller network_def)
OVERRIDES = "inference_overrides.json"
WEIGHTS = "model.pt"


def find_inputs(folder) -> dict:
    """``Registrar.register`` path arguments found in ``folder`` (see :data:`INPUTS`); moving and fixed are required."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(
            f"{folder}: input folder does not exist (expected {INPUTS['moving_image']}.nii.gz and "
            f"{INPUTS['fixed_image']}.nii.gz in it)"
        )
    found = {}
    for key, stem in INPUTS.items():
        hits = [folder / f"{stem}{suffix}" for suffix in (".nii.gz", ".nii") if (folder / f"{stem}{suffix}").is_file()]
        if len(hits) > 1:
            raise InputError(f"{hits[0]}: both {hits[0].name} and {hits[1].name} are in the input folder; keep one")
        if hits:
            found[key] = str(hits[0])
        elif key in ("moving_image", "fixed_image"):
            raise InputError(f"{folder / (stem + '.nii.gz')}: required input is missing from the input folder")
    return found


def find_model(path) -> tuple[str | None, str | None]:
    """The checkpoint and optional override config under the app's model path.

    ``path`` is a checkpoint file, or a folder holding ``model.pt`` directly or in one sub-folder (the layout
    of a packaged app's ``/opt/holoscan/models/<name>/``), either of them possibly a bundle-like folder with
    ``models/model.pt`` beside its ``large_files.yml``: the weights are then checked against that manifest
    before they are read (:func:`scripts.weights.manifest.verify_checkpoint`). ``inference_overrides.json`` beside the checkpoint
    is returned as the override config. ``(None, None)`` when there is no checkpoint: the config's own
    ``checkpoint`` is used then (``models/model.pt``; missing: rigid only, with a warning).
    """
    path = Path(path) if path else None
    if path is None or not path.exists():
        return None, None
    if path.is_file():
        weights = path
    else:
        hits = next((h for h in ([path / WEIGHTS], [path / "models" / WEIGHTS]) if h[0].is_file()), None) or sorted(
            [*path.glob(f"*/{WEIGHTS}"), *path.glob(f"*/models/{WEIGHTS}")]
        )
        if len(hits) > 1:
            raise InputError(f"{path}: several {WEIGHTS} files in sub-folders ({', '.join(map(str, hits))}); keep one")
        if not hits:
            return None, None
        weights = hits[0]
    overrides = weights.parent / OVERRIDES
    return str(weights), (str(overrides) if overrides.is_file() else None)


class RegistrationOperator(Operator):
    """Register ``moving`` to ``fixed`` from ``input_folder`` and write the pipeline's files into ``output_folder``.

    No ports: it runs once (give it a ``CountCondition(fragment, 1)``) and reads/writes files only.
    """

    def __init__(
        self, fragment: Fragment, *args, input_folder, output_folder, model_path=None, config_file=CONFIG, **kwargs
    ) -> None:
        self.input_folder, self.output_folder = Path(input_folder), Path(output_folder)
        self.model_path, self.config_file = model_path, config_file
        self._logger = logging.getLogger(f"{__name__}.{type(self).__name__}")
        super().__init__(fragment, *args, **kwargs)  # the base constructor calls setup(): attributes first

    def setup(self, spec: OperatorSpec):
        pass

    def compute(self, op_input, op_output, context):
        self.register()

    def register(self) -> dict:
        """Load the network and settings, register the pair, return ``result.json``'s content."""
        inputs = find_inputs(self.input_folder)
        checkpoint, overrides = find_model(self.model_path)
        configs = [str(self.config_file)] + ([overrides] if overrides else [])
        self._logger.info("configs %s, checkpoint %s, inputs %s", configs, checkpoint or "(the config's)", inputs)
        registrar = load_registrar(configs, {"checkpoint": checkpoint} if checkpoint else None)
        self.output_folder.mkdir(parents=True, exist_ok=True)
        result = registrar.register(out_dir=self.output_folder, **inputs)
        self._logger.info("wrote %d files in %s", len(result["files"]) + 1, self.output_folder)
        return result
