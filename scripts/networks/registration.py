"""The registration network: dual encoder with E-CMCA, FuseConv U-Net, LSTM-refined velocity, VecInt.

Input ``image`` (N, 2, H, W, D) = [moving, fixed] on the network grid; output the displacement field
(N, 3, H, W, D) in VOXELS of that grid (MONAI ``Warp`` convention: warped(p) = moving(p + ddf(p))); the
interface is :class:`scripts.networks.contract.RegistrationNetwork`. Depth is the last spatial axis. Every
paper number is a constructor argument with the paper default.
"""

from __future__ import annotations

import json
from typing import Optional, Sequence

import torch
from monai.networks.blocks import DVF2DDF, UpSample
from torch import nn

from scripts.networks.blocks import (
    ECMCA,
    CompactLSTMRefiner,
    FuseConv,
    GridCachedWarp,
    PaperLSTMRefiner,
    conv_block,
    pad_to_multiple,
)

__all__ = ["RegistrationNet", "encode_settings", "decode_settings"]

LSTM_MODES = ("compact", "paper", "none")
NOT_SETTINGS = ("grid_cache",)  # speed switches: same results, free to differ from the training's
SETTINGS_BYTES = 4096  # room for the stored settings' JSON (about 700 bytes for this network's)


def encode_settings(settings: dict) -> torch.Tensor:
    """Settings as UTF-8 JSON in a zero-padded uint8 tensor of ``SETTINGS_BYTES``.

    A tensor of one fixed shape, because MONAI's ``copy_model_state`` (behind ``monai.bundle.load`` and
    ``ckpt_export``) reads ``.shape`` of every state-dict entry and copies only entries whose shapes agree.
    """
    data = json.dumps(settings, sort_keys=True).encode()
    if len(data) > SETTINGS_BYTES:
        raise ValueError(f"settings take {len(data)} bytes, more than the {SETTINGS_BYTES} kept with the weights")
    out = torch.zeros(SETTINGS_BYTES, dtype=torch.uint8)
    out[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return out


def decode_settings(tensor: torch.Tensor) -> dict:
    """The settings :func:`encode_settings` stored (``{}`` for none)."""
    data = bytes(tensor.to(torch.uint8).tolist()).rstrip(b"\0")
    return json.loads(data) if data else {}


class RegistrationNet(nn.Module):
    """Dual-encoder E-CMCA registration network with an LSTM-refined stationary velocity field.

    Args:
        in_channels: channels per modality (1 for grey-value images).
        encoder_channels: ConvBlock channels per encoder level; ``pool_size`` max-pooling between levels, so
            the grid is padded internally to a multiple of pool_size**(levels-1) (8 for the paper) and cropped back.
        decoder_channels: one ConvBlock per decoder level (as many as encoder levels); trilinear upsampling
            by ``pool_size`` and concatenation of the FuseConv skip between them.
        head_channels: ConvBlocks at full resolution after the decoder; their output (``features``) feeds the
            flow conv and, detached, the task-mask subnet (:mod:`scripts.networks.task_mask`, a component of its own).
        msfa, msfa_kernels, msfa_mode: multi-scale feature aggregation ("paper": k^3 kernels, "dilated": 3^3
            kernels with dilation (k-1)/2).
        dca, dca_kernel: dynamic channel attention and the width of its 1-D channel conv.
        attention, attention_reduction: the symmetric cross-modal spatial gates (W1, W2: C -> C/reduction).
            Ablations: CMCA = msfa=False, dca=False; plain U-Net = msfa=dca=attention=False, lstm="none".
        lstm: "compact" (default, any grid), "paper" (exact sizes, tied to ``spatial_size``) or "none".
        chunks: number T of depth chunks (LSTM steps and task-mask rows).
        lstm_hidden, lstm_layers: LSTM size. compact_code: per-chunk code grid of the compact LSTM.
        spatial_size: (H, W, D) of the network grid; required for lstm="paper" only (enforced in forward).
        int_steps: scaling-and-squaring steps of VecInt (MONAI ``DVF2DDF``).
        int_padding: how VecInt samples the field beyond the grid. "border" (the edge value) rather than
            MONAI's default "zeros", whose jump to zero at the edge folds the field there.
        flow_init_std: std of the flow conv's initial weights (bias zero), so training starts near identity.
        negative_slope: LeakyReLU slope of all ConvBlocks and FuseConvs.
        kernel_size: kernel of every ConvBlock and of the flow conv (3 -> 3x3x3).
        pool_size: max-pooling and upsampling factor between levels.
        grid_cache: speed option, VecInt warps with :class:`GridCachedWarp` (identity grid kept on the
            device) instead of MONAI's ``Warp`` (rebuilt on the host every step); same output.

    The state dict carries, as its ``_extra_state`` entry (:func:`encode_settings`), the settings the weights
    were trained with (``trained_settings``: ``{}`` while training; ``python -m scripts make-model`` writes the
    run's settings, :mod:`scripts.weights.trained_model`), so a plain state dict, as MONAI's and the model zoo's tools
    load it, keeps them. Loading weights whose stored ``network_def`` differs from this network's arguments is
    an error, in MONAI's loaders too.
    """

    def __init__(
        self,
        in_channels: int = 1,
        encoder_channels: Sequence[int] = (16, 32, 32, 32),
        decoder_channels: Sequence[int] = (32, 32, 32, 16),
        head_channels: Sequence[int] = (32, 16, 16),
        msfa: bool = True,
        msfa_kernels: Sequence[int] = (3, 5, 7),
        msfa_mode: str = "paper",
        dca: bool = True,
        dca_kernel: int = 3,
        attention: bool = True,
        attention_reduction: int = 2,
        lstm: str = "compact",
        chunks: int = 10,
        lstm_hidden: int = 128,
        lstm_layers: int = 2,
        compact_code: Sequence[int] = (16, 16, 2),
        spatial_size: Optional[Sequence[int]] = None,
        int_steps: int = 7,
        int_padding: str = "border",
        flow_init_std: float = 1e-5,
        negative_slope: float = 0.2,
        kernel_size: int = 3,
        pool_size: int = 2,
        grid_cache: bool = False,
    ):
        arguments = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        self.arguments = json.loads(json.dumps(arguments))  # lists, as a config and a weights file hold them
        self.trained_settings: dict = {}
        enc, dec, head = tuple(encoder_channels), tuple(decoder_channels), tuple(head_channels)
        if len(dec) != len(enc):
            raise ValueError(f"decoder_channels needs one entry per encoder level ({len(enc)}), got {dec}")
        if lstm not in LSTM_MODES:
            raise ValueError(f"lstm must be one of {LSTM_MODES}, got {lstm!r}")
        if lstm == "paper" and spatial_size is None:
            raise ValueError("lstm='paper' needs spatial_size=(H, W, D): its layer sizes depend on the grid")
        self.levels = len(enc)
        self.in_channels = in_channels
        self.multiple = pool_size ** (self.levels - 1)

        def encoder():
            return nn.ModuleList(
                [
                    conv_block(in_channels if i == 0 else enc[i - 1], c, kernel_size, negative_slope)
                    for i, c in enumerate(enc)
                ]
            )

        self.encoder_moving, self.encoder_fixed = encoder(), encoder()
        self.pool = nn.MaxPool3d(pool_size)
        self.ecmca = nn.ModuleList(
            [ECMCA(c, msfa, msfa_kernels, msfa_mode, dca, dca_kernel, attention, attention_reduction) for c in enc]
        )
        # one FuseConv per level: levels 0..L-2 give the skips, the deepest one is the bottleneck
        self.fuse = nn.ModuleList([FuseConv(2 * c, c, negative_slope) for c in enc])
        self.upsample = UpSample(
            3, scale_factor=pool_size, mode="nontrainable", interp_mode="trilinear", align_corners=False
        )
        self.decoder = nn.ModuleList(
            [conv_block(enc[-1], dec[0], kernel_size, negative_slope)]
            + [conv_block(dec[j - 1] + enc[-1 - j], dec[j], kernel_size, negative_slope) for j in range(1, len(dec))]
        )
        self.head = nn.Sequential(
            *[
                conv_block(dec[-1] if i == 0 else head[i - 1], c, kernel_size, negative_slope)
                for i, c in enumerate(head)
            ]
        )
        self.flow = nn.Conv3d(head[-1], 3, kernel_size=kernel_size, padding=kernel_size // 2)
        nn.init.normal_(self.flow.weight, mean=0.0, std=flow_init_std)
        nn.init.zeros_(self.flow.bias)

        if lstm == "paper":
            self.refiner: nn.Module = PaperLSTMRefiner(spatial_size, chunks, lstm_hidden, lstm_layers)
        elif lstm == "compact":
            self.refiner = CompactLSTMRefiner(chunks, compact_code, lstm_hidden, lstm_layers)
        else:
            self.refiner = nn.Identity()
        self.integrate = DVF2DDF(num_steps=int_steps, padding_mode=int_padding)  # the contract's integrator
        # MONAI's Warp, as TorchScript can compile it (same output); grid_cache keeps its identity grid
        self.integrate.warp_layer = GridCachedWarp(mode="bilinear", padding_mode=int_padding, cache=grid_cache)

    def _features(self, image: torch.Tensor) -> torch.Tensor:
        """(N, 2*in_channels, H, W, D), H, W, D multiples of ``self.multiple`` -> (N, head[-1], H, W, D)."""
        moving, fixed = image[:, : self.in_channels], image[:, self.in_channels :]
        skips = []
        for level, (enc_m, enc_f, attend, fuse) in enumerate(
            zip(self.encoder_moving, self.encoder_fixed, self.ecmca, self.fuse)
        ):
            if level > 0:
                moving, fixed = self.pool(moving), self.pool(fixed)
            moving, fixed = attend(enc_m(moving), enc_f(fixed))
            skips.append(fuse(moving, fixed))
        x = skips[-1]  # bottleneck
        for j, block in enumerate(self.decoder):
            if j > 0:
                x = torch.cat([self.upsample(x), skips[-1 - j]], dim=1)
            x = block(x)
        return self.head(x)

    def _velocity(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad to a multiple of ``self.multiple`` (zeros at the far end), predict, crop back.

        Returns the refined velocity (N, 3, H, W, D) and the head features (N, head[-1], H, W, D).
        """
        size = image.shape[2:]
        features = self._features(pad_to_multiple(image, self.multiple))[:, :, : size[0], : size[1], : size[2]]
        return self.refiner(self.flow(features)), features

    def _integrate(self, velocity: torch.Tensor) -> torch.Tensor:
        """VecInt in fp32 (sampling grids are not autocast): velocity -> ddf, both (N, 3, H, W, D) voxels."""
        if not torch.jit.is_scripting():
            with torch.autocast(device_type=velocity.device.type, enabled=False):
                return self.integrate(velocity.float())
        return self.integrate(velocity.float())

    def get_extra_state(self) -> torch.Tensor:
        """The settings these weights were trained with (``{}`` unless loaded from a make-model file), encoded."""
        return encode_settings(self.trained_settings)

    def set_extra_state(self, state: torch.Tensor) -> None:
        """Take stored settings; refuse them when their ``network_def`` arguments differ from this network's."""
        from scripts.weights.trained_model import differences  # it imports this module

        state = decode_settings(state)
        stored = state.get("network_def", {})
        shared = stored.keys() & self.arguments.keys() - set(NOT_SETTINGS)  # arguments both sides know
        diffs = differences({k: stored[k] for k in shared}, {k: self.arguments[k] for k in shared}, "built with")
        if diffs:
            raise ValueError("these weights were trained with another network_def: " + "; ".join(diffs))
        self.trained_settings = state

    def forward(self, image: torch.Tensor, train: bool = False):
        """image (N, 2, H, W, D) = [moving, fixed] -> ddf (N, 3, H, W, D) in voxels of this grid.

        ``train=True`` (not compiled): the :meth:`forward_train` dict instead, so that a stock
        ``DistributedDataParallel`` runs the training forward (:class:`scripts.networks.contract.RegistrationNetwork`).
        """
        if train and not torch.jit.is_scripting():
            return self.forward_train(image)
        velocity, _ = self._velocity(image)
        return self._integrate(velocity)

    def forward_train(self, image: torch.Tensor) -> dict:
        """``{"ddf", "velocity"}`` (N, 3, H, W, D) voxels and ``"features"`` (N, head[-1], H, W, D), in either mode."""
        velocity, features = self._velocity(image)
        return {"ddf": self._integrate(velocity), "velocity": velocity, "features": features}
