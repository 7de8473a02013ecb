"""Multi-GPU training under ``torchrun`` (``configs/multi_gpu_train.json``): DDP for the registration network.

Two things MONAI's plain multi-GPU pattern (``DistributedDataParallel(network)``) does not cover here:

* :class:`scripts.training.iteration.RegistrationIteration` calls ``network.forward_train(image)``. DDP prepares
  its gradient reduction only when the DDP module itself is called, so :class:`RegistrationDDP` routes
  ``forward_train`` through DDP's ``forward``.
* The task-mask subnet is stepped after a SECOND backward pass (its own objective). DDP's reducer
  expects one backward per forward and finishes the reduction only when every parameter it tracks has
  a gradient, so with the subnet inside DDP the registration step would run on unreduced gradients.
  The subnet's parameters are therefore left out of DDP and averaged over the ranks by hooks, each as
  soon as backward has accumulated its gradient.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["RegistrationDDP", "rank0_decides"]


class _Forwards(nn.Module):
    """``forward(image, train=False)``: the network's ``forward_train(image)`` (a dict) or ``forward(image)``."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor, train: bool = False):
        return self.network.forward_train(image) if train else self.network(image)


def _average_gradient(param: torch.Tensor) -> None:
    """Post-accumulate-grad hook: replace ``param.grad`` by its mean over the ranks."""
    dist.all_reduce(param.grad)
    param.grad.div_(dist.get_world_size())


class RegistrationDDP(DistributedDataParallel):
    """``DistributedDataParallel`` for :class:`scripts.networks.registration.RegistrationNet`; same calls as the network.

    * ``forward(image)`` -> ddf (N, 3, H, W, D) voxels, as the network (evaluator, inference);
    * ``forward_train(image)`` -> the network's ``forward_train`` dict, run through DDP's ``forward``;
    * ``registration_parameters()`` / ``task_mask_parameters()`` of the network (the two optimisers).

    DDP synchronises the registration parameters (broadcast from rank 0 at construction, gradients
    averaged in the backward of the composite loss). The task-mask parameters are excluded from DDP
    (the subnet has its own backward pass, see the module docstring); they are broadcast from rank 0
    here and their gradients averaged by hooks. Requires an initialised process group.

    Args:
        network: the RegistrationNet, already on this rank's device.
        kwargs: passed to ``DistributedDataParallel`` (e.g. ``device_ids``). ``find_unused_parameters``
            stays False: every registration parameter takes part in the composite loss.
    """

    def __init__(self, network: nn.Module, **kwargs: Any):
        wrapper = _Forwards(network)
        mask_ids = {id(p) for p in network.task_mask_parameters()}
        ignored = [name for name, p in wrapper.named_parameters() if id(p) in mask_ids]
        # DDP's documented-in-source hook for leaving parameters out of its reducer (used by FSDP and others)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(wrapper, ignored)
        super().__init__(wrapper, **kwargs)
        for param in network.task_mask_parameters():
            dist.broadcast(param.data, src=0)
            param.register_post_accumulate_grad_hook(_average_gradient)

    def forward_train(self, image: torch.Tensor) -> dict:
        """The network's ``forward_train(image)`` through DDP (gradient reduction prepared)."""
        return self(image, train=True)

    def registration_parameters(self) -> list[nn.Parameter]:
        return self.module.network.registration_parameters()

    def task_mask_parameters(self) -> list[nn.Parameter]:
        return self.module.network.task_mask_parameters()


def rank0_decides(function: Callable, *args: Any, **kwargs: Any) -> Any:
    """Call ``function`` on rank 0 only and return its result on every rank (its exception, re-raised, too).

    For decisions with side effects on shared storage, e.g. :func:`scripts.training.run_folder.prepare_run_dir`
    (writes ``run_config.json``, may clear the run folder): the other ranks wait for rank 0 and use its
    answer. Without an initialised process group it simply calls ``function``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return function(*args, **kwargs)
    message: list = [None]
    if dist.get_rank() == 0:
        try:
            message[0] = (True, function(*args, **kwargs))
        except Exception as err:
            message[0] = (False, err)
            dist.broadcast_object_list(message, src=0)
            raise
    dist.broadcast_object_list(message, src=0)
    ok, value = message[0]
    if not ok:
        raise value
    return value
