"""The registration network run by ONNX Runtime from the bundle's ONNX export (``models/model.onnx``).

``OnnxRegistrationNet`` stands in for :class:`scripts.networks.registration.RegistrationNet` in
:meth:`scripts.inference.registrar.Registrar.register`: same input (1, 2, H, W, D) [moving, fixed] on the box grid, same
output (the DDF in box voxels), and ``forward_train`` gives the velocity too when the file carries it
(``scripts.tools.export`` writes a ``velocity`` output for networks that integrate one), so the pipeline
integrates -velocity for the exact inverse as with the PyTorch network. The file is specialised to one
grid: feed exactly the shape it was exported for (``input_shape``).

Used by ``configs/inference_onnx.json`` (``python -m monai.bundle run`` with both config files).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from monai.networks.blocks import DVF2DDF

from scripts.data.nifti import InputError

__all__ = ["OnnxRegistrationNet"]


class OnnxRegistrationNet:
    """An ONNX registration network on ONNX Runtime's CPU execution provider (inference only; follows
    :class:`scripts.networks.contract.RegistrationNetwork`: ``__call__``, ``forward_train``, ``integrate``).

    Args:
        path: the ``.onnx`` file (input ``image``; outputs ``pred`` = DDF and, optionally, ``velocity``).
        int_steps, int_padding: scaling-and-squaring steps and padding of the inverse (integrating -velocity
            in PyTorch, fp32); None (default): the network's own, stored in the file by ``scripts.tools.export``.
        threads: ORT intra-op threads; 0 = ``torch.get_num_threads()`` (so ``OMP_NUM_THREADS`` and
            ``torch.set_num_threads`` apply to both runtimes alike).
    """

    def __init__(self, path, int_steps: int | None = None, int_padding: str | None = None, threads: int = 0):
        try:
            import onnxruntime as ort  # optional: only this backend needs it
        except ImportError as err:
            raise InputError(
                f"{path}: running an ONNX file needs onnxruntime, which this environment lacks "
                "(pip install onnxruntime==1.32.0)"
            ) from err

        path = Path(path)
        if not path.is_file():
            raise InputError(
                f"{path}: ONNX file does not exist; write it with `python -m scripts export --formats onnx`"
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads) or torch.get_num_threads()
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # ORT raises its own exception types for unreadable or invalid files
            raise InputError(f"{path}: ONNX Runtime cannot load it ({err})") from err
        inputs = self.session.get_inputs()
        self.outputs = [o.name for o in self.session.get_outputs()]
        if len(inputs) != 1 or "pred" not in self.outputs:
            raise InputError(
                f"{path}: expected one input and an output named 'pred', got inputs "
                f"{[i.name for i in inputs]} and outputs {self.outputs}"
            )
        self.input_name, self.input_shape = inputs[0].name, list(inputs[0].shape)
        self.path = path
        self.integrate: DVF2DDF | None = None  # the contract's integrator: only with a velocity output
        if "velocity" in self.outputs:
            stored = self.session.get_modelmeta().custom_metadata_map
            if None in (int_steps, int_padding) and not {"int_steps", "int_padding"} <= stored.keys():
                raise InputError(
                    f"{path}: has a velocity output but no integration settings (int_steps, int_padding) "
                    "in its metadata; export it again with `python -m scripts export`, or pass them"
                )
            self.integrate = DVF2DDF(
                num_steps=int(int_steps or stored["int_steps"]),
                mode=stored.get("int_mode", "bilinear"),
                padding_mode=int_padding or stored["int_padding"],
            )

    def _run(self, image: torch.Tensor) -> dict:
        if list(image.shape) != self.input_shape:
            raise InputError(
                f"{self.path}: exported for input shape {self.input_shape}, got {list(image.shape)}; "
                "export again at this grid (spatial_size) or set spatial_size to the exported grid"
            )
        arrays = self.session.run(None, {self.input_name: image.detach().float().cpu().numpy()})
        return {name: torch.from_numpy(a).to(image.device) for name, a in zip(self.outputs, arrays)}

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """(1, 2, H, W, D) -> DDF (1, 3, H, W, D) in voxels of the box grid."""
        return self._run(image)["pred"]

    def forward_train(self, image: torch.Tensor) -> dict:
        """``{"ddf", "velocity", "features": None}`` (:class:`scripts.networks.contract.TrainOutput`; velocity None if
        the file lacks it)."""
        out = self._run(image)
        return {"ddf": out["pred"], "velocity": out.get("velocity"), "features": None}

    def __repr__(self) -> str:
        return f"OnnxRegistrationNet({os.fspath(self.path)!r}, input {self.input_shape}, outputs {self.outputs})"
