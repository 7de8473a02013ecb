"""MONAI's VoxelMorph and LocalNet behind the registration network's interface, for the comparison table.

Input ``image`` (N, 2, H, W, D) = [moving, fixed] on the network grid; output the displacement field
(N, 3, H, W, D) in VOXELS of that grid (MONAI ``Warp`` convention), exactly like
:class:`scripts.networks.registration.RegistrationNet`, so that the same training iteration, loss, pipeline and
evaluation run them. The networks themselves are MONAI's; this module only pads the grid to the
multiple their pooling needs and exposes ``forward_train`` / ``registration_parameters``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import LocalNet, VoxelMorph, VoxelMorphUNet
from torch import nn

__all__ = ["BaselineNet"]

KINDS = ("voxelmorph", "localnet")


class BaselineNet(nn.Module):
    """MONAI ``VoxelMorph`` (diffeomorphic, scaling and squaring) or ``LocalNet`` (direct DDF).

    Args:
        kind: "voxelmorph" or "localnet".
        channels, unet_out_channels, final_conv_channels: of ``VoxelMorphUNet`` (the VoxelMorph paper's vm2
            widths by default: U-Net 16-32-32-32-32-32 ending in 32 channels, then 16-16, then the 3-channel flow).
        integration_steps: VoxelMorph's scaling-and-squaring steps (7, as ours).
        num_channel_initial, extract_levels: of ``LocalNet`` (levels 0-3 as Hu et al. 2018).
    """

    def __init__(
        self,
        kind: str = "voxelmorph",
        channels: Sequence[int] = (16, 32, 32, 32, 32, 32),
        unet_out_channels: int = 32,
        final_conv_channels: Sequence[int] = (16, 16),
        integration_steps: int = 7,
        num_channel_initial: int = 16,
        extract_levels: Sequence[int] = (0, 1, 2, 3),
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        if kind == "voxelmorph":
            backbone = VoxelMorphUNet(
                3, 2, unet_out_channels, channels=tuple(channels), final_conv_channels=tuple(final_conv_channels)
            )
            self.net = VoxelMorph(backbone=backbone, integration_steps=integration_steps, spatial_dims=3)
            self.integrate = self.net.dvf2ddf  # velocity -> ddf; the pipeline integrates -v for the inverse
            self.multiple = 2 ** (len(channels) // 2)
        else:
            self.net = LocalNet(3, 2, num_channel_initial, tuple(extract_levels), out_channels=3)
            self.integrate = None  # a direct DDF: the pipeline inverts it numerically
            self.multiple = 2 ** max(extract_levels)

    def _padded(self, fn, image: torch.Tensor) -> torch.Tensor:
        """Zero-pad the far end of each axis to ``self.multiple``, run ``fn``, crop back."""
        size = image.shape[2:]
        pad = [0] * 6
        for axis in range(3):  # F.pad lists the last axis first
            pad[2 * (2 - axis) + 1] = (-size[axis]) % self.multiple
        return fn(F.pad(image, pad))[:, :, : size[0], : size[1], : size[2]]

    def forward_train(self, image: torch.Tensor) -> dict:
        """{"ddf": (N, 3, H, W, D) voxels, "velocity": (N, 3, ...) for VoxelMorph else None, "task_mask": None}."""
        if self.kind == "localnet":
            return {"ddf": self._padded(self.net, image), "velocity": None, "task_mask": None}
        velocity = self._padded(self.net.backbone, image)
        with torch.autocast(device_type=velocity.device.type, enabled=False):  # sampling grids in fp32
            ddf = self.integrate(velocity.float())
        return {"ddf": ddf, "velocity": velocity, "task_mask": None}

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image (N, 2, H, W, D) = [moving, fixed] -> ddf (N, 3, H, W, D) in voxels of this grid."""
        return self.forward_train(image)["ddf"]

    def task_mask_parameters(self) -> list[nn.Parameter]:
        """No task-mask subnet."""
        return []

    def registration_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())
