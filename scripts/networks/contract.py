"""The registration network contract: what every registration network of the bundle provides.

Followed by :class:`scripts.networks.registration.RegistrationNet`, :class:`scripts.networks.baselines.BaselineNet`,
:class:`scripts.networks.onnx_runtime.OnnxRegistrationNet` (inference only), and the stand-ins
:class:`scripts.spatial.composed.FieldNetwork` and those of the tests. Callers use these attributes
directly; nothing is probed with ``hasattr``.

Tensors: ``image`` (N, 2, H, W, D) = [moving, fixed] on the network grid (depth last); ``ddf`` and
``velocity`` (N, 3, H, W, D) in VOXELS of that grid (MONAI ``Warp`` convention: warped(p) = moving(p + ddf(p))).
"""

from __future__ import annotations

from typing import Optional, Protocol, TypedDict, runtime_checkable

import torch
from torch import nn

__all__ = ["RegistrationNetwork", "TrainOutput", "TRAIN_KEYS"]

TRAIN_KEYS = ("ddf", "velocity", "features")


class TrainOutput(TypedDict):
    """What :meth:`RegistrationNetwork.forward_train` returns (every key present).

    ddf: (N, 3, H, W, D) voxels, with graph while training.
    velocity: (N, 3, H, W, D) voxels, the stationary velocity ``integrate`` turns into ``ddf``; None for a
        direct-DDF network.
    features: (N, C, H, W, D) full-resolution decoder features (what a task-mask subnet,
        :class:`scripts.networks.task_mask.TaskMaskNet`, reads, detached); None for a network that exposes none.
    """

    ddf: torch.Tensor
    velocity: Optional[torch.Tensor]
    features: Optional[torch.Tensor]


@runtime_checkable
class RegistrationNetwork(Protocol):
    """A registration network.

    ``network(image)`` (``forward``; inference, validation, export): the ``ddf`` tensor (N, 3, H, W, D) voxels.
    ``network(image, train=True)``: the :class:`TrainOutput` dict, the training forward. The training iteration
        calls this, so a stock ``DistributedDataParallel(network)`` runs it (DDP reduces gradients only of what
        runs through its own ``forward``). A compiled (TorchScript) network has the ddf form only, and so
        may inference-only stand-ins (ONNX Runtime, a given field).
    ``forward_train(image)``: the same :class:`TrainOutput` without DDP (inference reads the velocity).
    ``integrate``: the module turning a velocity (N, 3, H, W, D) into a ddf (N, 3, H, W, D), both voxels
        (MONAI ``DVF2DDF``: scaling and squaring), e.g. ``integrate(-velocity)`` for the inverse field; None for
        a direct-DDF network (the inverse is then found numerically).
    """

    integrate: Optional[nn.Module]

    def __call__(self, image: torch.Tensor, train: bool = False):
        """``forward``: the ddf, or with ``train=True`` the :class:`TrainOutput`."""

    def forward_train(self, image: torch.Tensor) -> TrainOutput:
        """The :class:`TrainOutput` of ``image`` (N, 2, H, W, D)."""
