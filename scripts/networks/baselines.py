"""MONAI's VoxelMorph and LocalNet behind the registration network's interface, for the comparison table.

Input ``image`` (N, 2, H, W, D) = [moving, fixed] on the network grid; output the displacement field
(N, 3, H, W, D) in VOXELS of that grid (MONAI ``Warp`` convention), exactly like
:class:`scripts.networks.registration.RegistrationNet`, so that the same training iteration, loss, pipeline and
evaluation run them (:class:`scripts.networks.contract.RegistrationNetwork`). The networks themselves are MONAI's;
this module only pads the grid to the multiple their pooling needs and exposes ``forward_train`` / ``integrate``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from monai.networks.nets import LocalNet, VoxelMorph, VoxelMorphUNet
from torch import nn

from scripts.networks.blocks import pad_to_multiple

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
        self.integrate: nn.Module | None  # the contract's integrator (velocity -> ddf), None for a direct DDF
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
        return fn(pad_to_multiple(image, self.multiple))[:, :, : size[0], : size[1], : size[2]]

    def forward_train(self, image: torch.Tensor) -> dict:
        """``{"ddf": (N, 3, H, W, D) voxels, "velocity": (N, 3, H, W, D) for VoxelMorph else None, "features": None}``."""
        if self.kind == "localnet":
            return {"ddf": self._padded(self.net, image), "velocity": None, "features": None}
        velocity = self._padded(self.net.backbone, image)
        with torch.autocast(device_type=velocity.device.type, enabled=False):  # sampling grids in fp32
            ddf = self.integrate(velocity.float())
        return {"ddf": ddf, "velocity": velocity, "features": None}

    def forward(self, image: torch.Tensor, train: bool = False):
        """image (N, 2, H, W, D) = [moving, fixed] -> ddf (N, 3, H, W, D) in voxels of this grid; ``train=True``
        (not compiled): the :meth:`forward_train` dict (the network contract's training forward, for stock DDP)."""
        if train and not torch.jit.is_scripting():
            return self.forward_train(image)
        return self.forward_train(image)["ddf"]
