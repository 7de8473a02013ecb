"""Multi-GPU training under ``torchrun`` (``configs/multi_gpu_train.json``): what stock DDP does not do.

``multi_gpu_train.json`` wraps the registration network and the task-mask subnet each in a stock
``torch.nn.parallel.DistributedDataParallel``: the iteration calls ``network(image, train=True)``, the
network's training forward through DDP's ``forward`` (:class:`scripts.networks.contract.RegistrationNetwork`),
and each module has its own forward and backward (the subnet reads detached features and has its own
objective), so each reducer sees one forward and one backward per iteration. This module keeps
:func:`rank0_decides` for decisions on shared storage.
"""

from __future__ import annotations

from typing import Any, Callable

import torch.distributed as dist

__all__ = ["rank0_decides"]


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
