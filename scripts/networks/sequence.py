"""Sequence mode: a registration network that carries state from frame to frame of a live TRUS sequence.

In a live sequence the moving MR stays the same and the fixed TRUS frame changes. :class:`SequenceRegistrationNet`
wraps a static network (:class:`scripts.networks.registration.RegistrationNet`, frozen by default) and adds a
convolutional GRU, at 1/``stride`` resolution, that blends each frame's static velocity with the previous frame's
output velocity and adds a learned correction. Unlike the paper's LSTM, which runs over depth chunks of ONE static
volume (the ``lstm`` refiner inside the static network, kept as it is), this cell runs over time frames, causally:
frame t's output depends on frames 0..t only.

Per frame, with ``v_s`` the static velocity, ``v_prev`` the previous frame's output velocity (``v_s`` itself on the
first frame, the warm start) and the head's correction ``c`` and gate logit ``g`` upsampled to the full grid::

    v_t = v_s + sigmoid(g) * (v_prev - v_s) + c

The head starts with zero weights, ``c``'s bias zero and ``g``'s bias ``gate_bias``: frame 0 then gives the static
network's output exactly, later frames a small blend, ``sigmoid(gate_bias)`` (1.8 % for -4) of the previous output,
not zero. Velocities and ddfs are (N, 3, H, W, D) in VOXELS of the network grid; the interface is
:class:`scripts.networks.contract.RegistrationNetwork` for a single pair (a one-frame sequence).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvGRUCell", "SequenceRegistrationNet", "SequenceState"]

# (hidden (N, hidden, h, w, d) on the 1/stride grid, velocity (N, 3, H, W, D) voxels: the last output velocity)
SequenceState = tuple[torch.Tensor, torch.Tensor]


class ConvGRUCell(nn.Module):
    """A convolutional GRU cell (neither MONAI nor PyTorch provides one, so it is written out here).

    ``cell(x, h)``: input x (N, in_channels, h, w, d) and hidden h (N, hidden, h, w, d) -> the new hidden state.
    """

    def __init__(self, in_channels: int, hidden: int, kernel_size: int = 3):
        super().__init__()
        self.hidden = hidden
        padding = kernel_size // 2
        self.gates = nn.Conv3d(in_channels + hidden, 2 * hidden, kernel_size, padding=padding)  # update z, reset r
        self.candidate = nn.Conv3d(in_channels + hidden, hidden, kernel_size, padding=padding)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        z, r = torch.sigmoid(self.gates(torch.cat([x, h], dim=1))).chunk(2, dim=1)
        candidate = torch.tanh(self.candidate(torch.cat([x, r * h], dim=1)))
        return (1 - z) * h + z * candidate


class SequenceRegistrationNet(nn.Module):
    """A static registration network plus a ConvGRU that carries state across the frames of a sequence.

    Args:
        network: the static registration network (the submodule ``static``); its ``forward_train`` gives each
            frame's static velocity and features, its ``integrate`` turns the output velocity into the ddf.
        hidden: channels of the GRU's hidden state.
        stride: the GRU runs on a grid average-pooled by ``stride`` (ceil mode: any H, W, D) and its head is
            upsampled trilinearly back to (H, W, D).
        kernel_size: kernel of the GRU's convs and of its head.
        gate_bias: initial bias of the gate logit; at initialisation each later frame keeps
            ``sigmoid(gate_bias)`` of the previous output velocity.
        freeze_static: keep ``static`` fixed: no gradients, and always in eval mode (``train()`` leaves it there).

    State (:data:`SequenceState`): ``(hidden (N, hidden, ceil(H/stride), ceil(W/stride), ceil(D/stride)),
    velocity (N, 3, H, W, D) voxels)``, or None before the first frame (zero hidden, warm start).
    """

    def __init__(
        self,
        network: nn.Module,
        hidden: int = 16,
        stride: int = 2,
        kernel_size: int = 3,
        gate_bias: float = -4.0,
        freeze_static: bool = True,
    ):
        super().__init__()
        if stride < 1:
            raise ValueError(f"stride must be at least 1, got {stride}")
        self.static = network
        self.stride = stride
        self.freeze_static = freeze_static
        self.cell = ConvGRUCell(6, hidden, kernel_size)  # [static velocity, previous output velocity]
        self.head = nn.Conv3d(hidden, 4, kernel_size, padding=kernel_size // 2)  # correction (3), gate logit (1)
        nn.init.zeros_(self.head.weight)
        with torch.no_grad():
            self.head.bias.copy_(torch.tensor([0.0, 0.0, 0.0, gate_bias]))
        self.integrate = network.integrate  # the contract's integrator: the static network's
        if freeze_static:
            for parameter in self.static.parameters():
                parameter.requires_grad_(False)
            self.static.eval()

    def train(self, mode: bool = True) -> SequenceRegistrationNet:
        """Set the mode of every submodule, except a frozen ``static``, which stays in eval mode."""
        super().train(mode)
        if self.freeze_static:
            self.static.eval()
        return self

    def _integrate(self, velocity: torch.Tensor) -> torch.Tensor:
        """The static network's integrate in fp32 (sampling grids are not autocast): velocity -> ddf, voxels."""
        with torch.autocast(device_type=velocity.device.type, enabled=False):
            return self.integrate(velocity.float())

    def step(
        self, image: torch.Tensor, state: Optional[SequenceState] = None, static_velocity: Optional[torch.Tensor] = None
    ) -> tuple[dict, SequenceState]:
        """One frame: image (N, 2, H, W, D) = [moving, fixed] and the state after the previous frame (None first).

        Returns the frame's :class:`scripts.networks.contract.TrainOutput` (``ddf``, ``velocity`` (N, 3, H, W, D)
        voxels, ``features`` of the static network) and the new state. Streaming inference calls this per frame.
        ``static_velocity``: the frozen static network's velocity of this frame, when the caller has it already
        (training revisits frames; :meth:`static_velocity`); ``features`` is then None.
        """
        if static_velocity is None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_static):
                static = self.static.forward_train(image)
        else:
            static = {"velocity": static_velocity, "features": None}
        v_static = static["velocity"]
        size = v_static.shape[2:]
        if state is None:
            pooled = F.avg_pool3d(v_static, self.stride, ceil_mode=True)
            h = v_static.new_zeros((v_static.shape[0], self.cell.hidden) + pooled.shape[2:])
            v_prev = v_static  # warm start: frame 0 blends nothing in
        else:
            h, v_prev = state
        x = F.avg_pool3d(torch.cat([v_static, v_prev], dim=1), self.stride, ceil_mode=True)
        h = self.cell(x, h)
        out = F.interpolate(self.head(h), size=tuple(size), mode="trilinear", align_corners=False)
        correction, gate = out[:, :3], torch.sigmoid(out[:, 3:])
        velocity = v_static + gate * (v_prev - v_static) + correction
        output = {"ddf": self._integrate(velocity), "velocity": velocity, "features": static["features"]}
        return output, (h, velocity)

    @torch.no_grad()
    def static_velocity(self, image: torch.Tensor) -> torch.Tensor:
        """The frozen static network's velocity (N, 3, H, W, D) of one frame, for :meth:`step`'s ``static_velocity``."""
        if not self.freeze_static:
            raise ValueError("static velocities can be reused only with freeze_static")
        return self.static.forward_train(image)["velocity"]

    def forward_sequence(
        self, images: torch.Tensor, state: Optional[SequenceState] = None, static_velocities=None
    ) -> tuple[dict, SequenceState]:
        """images (N, T, 2, H, W, D), frame by frame through :meth:`step` (so streaming gives the same).

        Returns ``{"ddf", "velocity"}`` (N, T, 3, H, W, D) voxels and the state after the last frame.
        """
        ddfs, velocities = [], []
        for t in range(images.shape[1]):
            output, state = self.step(images[:, t], state, None if static_velocities is None else static_velocities[t])
            ddfs.append(output["ddf"])
            velocities.append(output["velocity"])
        return {"ddf": torch.stack(ddfs, dim=1), "velocity": torch.stack(velocities, dim=1)}, state

    @torch.no_grad()
    def burn_in(
        self, images: torch.Tensor, state: Optional[SequenceState] = None, static_velocities=None
    ) -> Optional[SequenceState]:
        """Run frames (N, T, 2, H, W, D) without gradients; the state after them, detached.

        For truncated back-propagation: burn in the frames before a training window, then run the window from
        this state with gradients. T = 0 returns ``state`` (detached) unchanged.
        """
        for t in range(images.shape[1]):
            _, state = self.step(images[:, t], state, None if static_velocities is None else static_velocities[t])
        return None if state is None else tuple(s.detach() for s in state)

    def forward_train(self, image: torch.Tensor) -> dict:
        """The :class:`scripts.networks.contract.TrainOutput` of one pair (N, 2, H, W, D): a one-frame sequence."""
        output, _ = self.step(image)
        return output

    def forward(self, image: torch.Tensor, train: bool = False):
        """image (N, 2, H, W, D) as a one-frame sequence -> ddf (N, 3, H, W, D) voxels, or with ``train=True``
        the :meth:`forward_train` dict."""
        output = self.forward_train(image)
        return output if train else output["ddf"]
