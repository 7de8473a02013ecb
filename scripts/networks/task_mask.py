"""The task-mask subnet ("WeightStitching"): per-depth-chunk weights of the registration and smoothness losses.

A component of its own (``task_mask`` in ``configs/train.json``), with its own optimiser (``mask_optimizer``):
it reads the registration network's ``features`` (:class:`scripts.networks.contract.TrainOutput`) DETACHED, and
only its own objective (:func:`scripts.training.iteration.mask_objective`) trains it. Not part of the shipped
registration weights: inference does not use it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from scripts.networks.blocks import chunk_matrix

__all__ = ["TaskMaskNet"]


class TaskMaskNet(nn.Module):
    """Features (N, C, H, W, D) -> mask (N, T, 2), softmax over the 2 (registration, smoothness) weights.

    Per depth chunk (:func:`scripts.networks.blocks.chunk_bounds`) global average pooling gives (N, T, C); two
    parallel branches, each Linear(C, hidden) -> ReLU -> Linear(hidden, 1), give two logits per chunk; softmax.
    The last layers start at zero, so the mask starts at 0.5 / 0.5. Computed in fp32 (autocast off).

    Args:
        in_channels: C, the registration network's feature channels (``head_channels[-1]`` of RegistrationNet).
        chunks: T, the depth chunks (the network's and the loss's ``chunks``).
        hidden: width of each branch's hidden layer.
        device: where the subnet lives (built on the CPU, as its initial weights do not depend on the device).
    """

    def __init__(self, in_channels: int, chunks: int = 10, hidden: int = 256, device: Optional[torch.device] = None):
        super().__init__()
        self.chunks = chunks
        self.branches = nn.ModuleList(
            [nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU(), nn.Linear(hidden, 1)) for _ in range(2)]
        )
        for branch in self.branches:
            nn.init.zeros_(branch[2].weight)
            nn.init.zeros_(branch[2].bias)
        if device is not None:
            self.to(device)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (N, C, H, W, D) -> mask (N, T, 2), fp32, rows sum to 1. Detach the features beforehand."""
        with torch.autocast(device_type=features.device.type, enabled=False):
            features = features.float()
            per_slice = features.mean(dim=(2, 3))  # (N, C, D)
            pooled = (per_slice @ chunk_matrix(features.shape[-1], self.chunks, features.device)).transpose(1, 2)
            logits = torch.cat([branch(pooled) for branch in self.branches], dim=-1)  # (N, T, 2)
            return torch.softmax(logits, dim=-1)
