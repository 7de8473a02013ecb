"""Building blocks of the registration network (shapes: N batch, C channels, H x W x D voxels).

Depth is the LAST spatial axis (inferior -> superior after RAS orientation). Everything here works on
the network grid; fields are in voxels of that grid.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, Warp
from torch import nn

__all__ = [
    "adaptive_avg_pool3d_as_matmul",
    "conv_block",
    "chunk_bounds",
    "pad_to_multiple",
    "chunk_matrix",
    "MSFA",
    "DCA",
    "CrossModalGate",
    "ECMCA",
    "FuseConv",
    "PaperLSTMRefiner",
    "CompactLSTMRefiner",
    "GridCachedWarp",
]


def conv_block(in_channels: int, out_channels: int, kernel_size: int = 3, negative_slope: float = 0.2) -> nn.Module:
    """Conv (same padding) + LeakyReLU, no normalisation: (N, in, H, W, D) -> (N, out, H, W, D)."""
    return Convolution(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=kernel_size,
        act=("leakyrelu", {"negative_slope": negative_slope}),
        norm=None,
    )


def pad_to_multiple(image: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the far end of each spatial axis of an (N, C, H, W, D) tensor up to a multiple of ``multiple``."""
    size = image.shape[2:]
    pad = [0, 0, 0, 0, 0, 0]
    for axis in range(3):  # F.pad lists the last axis first
        pad[2 * (2 - axis) + 1] = (-size[axis]) % multiple
    return F.pad(image, pad)


def chunk_bounds(depth: int, chunks: int) -> list[tuple[int, int]]:
    """Split ``depth`` slices into ``chunks`` contiguous, non-empty chunks of near-equal size.

    Chunk t covers slices ``floor(t*depth/chunks) .. floor((t+1)*depth/chunks) - 1``: equal chunks when
    ``chunks`` divides ``depth`` (120 / 10 = 12 on the paper grid), otherwise sizes differ by one slice
    (no padding, so no chunk is partly or wholly artificial). Requires ``depth >= chunks``.
    """
    if depth < chunks:
        raise ValueError(f"depth {depth} is smaller than the number of depth chunks {chunks}")
    return [(t * depth // chunks, (t + 1) * depth // chunks) for t in range(chunks)]


def chunk_matrix(
    depth: int, chunks: int, device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(depth, chunks) averaging matrix: column t is 1/size_t on chunk t's slices, 0 elsewhere.

    ``x @ chunk_matrix(D, T)`` turns a (..., D) tensor into its per-chunk means (..., T).
    """
    mat = torch.zeros(depth, chunks, device=device, dtype=dtype)
    for t, (start, stop) in enumerate(chunk_bounds(depth, chunks)):
        mat[start:stop, t] = 1.0 / (stop - start)
    return mat


def _averaging_matrix(n_in: int, n_out: int, like: torch.Tensor) -> torch.Tensor:
    """(n_in, n_out) matrix whose column j averages the bins of adaptive average pooling:
    indices floor(j*n_in/n_out) .. ceil((j+1)*n_in/n_out) - 1 (PyTorch's definition).
    Built from ``arange`` so that ``torch.export`` records it as operations, not as a lifted constant."""
    j = torch.arange(n_out, device=like.device)
    start, stop = (j * n_in) // n_out, ((j + 1) * n_in + n_out - 1) // n_out
    i = torch.arange(n_in, device=like.device)[:, None]
    return ((i >= start) & (i < stop)).to(like.dtype) / (stop - start).to(like.dtype)


def adaptive_avg_pool3d_as_matmul(x: torch.Tensor, output_size) -> torch.Tensor:
    """``F.adaptive_avg_pool3d`` (N, C, H, W, D) -> (N, C, *output_size) as three matrix products.

    Hand-written: the ONNX exporter has no translation for adaptive 3-D pooling with non-integer
    ratios (used by the compact LSTM refiner); at a fixed grid the pooling is separable and linear. The refiner
    uses it while an ONNX export runs (MONAI's ``onnx_export`` included), the library op otherwise.
    """
    for axis, n_out in enumerate(output_size):
        dim = x.ndim - 3 + axis
        x = torch.movedim(torch.movedim(x, dim, -1) @ _averaging_matrix(x.shape[dim], int(n_out), x), -1, dim)
    return x


class MSFA(nn.Module):
    """Multi-scale feature aggregation (one modality): (N, C, H, W, D) -> (N, C, H, W, D).

    Parallel C -> C convolutions, one per kernel size k; each branch gets one scalar score per sample,
    s_k = GAP + GMP over all channels and voxels; softmax over the branches gives the weights of the sum.
    ``mode="paper"`` uses k^3 kernels; ``mode="dilated"`` uses 3^3 kernels with dilation (k-1)/2, which
    covers the same field of view at a fraction of the cost.
    """

    def __init__(self, channels: int, kernels: Sequence[int] = (3, 5, 7), mode: str = "paper"):
        super().__init__()
        if mode not in ("paper", "dilated"):
            raise ValueError(f"msfa_mode must be 'paper' or 'dilated', got {mode!r}")
        if any(k % 2 == 0 for k in kernels):
            raise ValueError(f"MSFA kernel sizes must be odd, got {tuple(kernels)}")
        branches = []
        for k in kernels:
            size, dilation = (k, 1) if mode == "paper" else (3, (k - 1) // 2)
            branches.append(Convolution(3, channels, channels, kernel_size=size, dilation=dilation, conv_only=True))
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs: List[torch.Tensor] = []
        if not torch.jit.is_scripting():  # eager: the bf16 guard of _branch
            outs = [self._branch(branch, x) for branch in self.branches]
        else:
            for branch in self.branches:
                outs.append(branch(x))
        feats = torch.stack(outs, dim=1)  # (N, K, C, H, W, D)
        flat = feats.flatten(2)
        weights = torch.softmax(flat.mean(dim=2) + flat.amax(dim=2), dim=1)  # (N, K)
        return (feats * weights[:, :, None, None, None, None]).sum(dim=1)

    @staticmethod
    @torch.jit.ignore
    def _branch(branch: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One branch; in fp32 where torch's CPU bf16 backward corrupts the heap.

        torch 2.13 on CPU aborts ("double free or corruption") in the bf16-autocast backward of a Conv3d
        whose kernel is larger than its input (a 7^3 kernel on a 4^3 bottleneck, paper MSFA at grids near
        32^3); such a branch runs outside autocast, in fp32, and is cast back to the others' dtype.
        """
        conv = branch.conv if hasattr(branch, "conv") else branch
        if (
            x.device.type == "cpu"
            and torch.is_autocast_enabled("cpu")
            and any(k > n for k, n in zip(conv.kernel_size, x.shape[2:]))
        ):
            with torch.autocast("cpu", enabled=False):
                return branch(x.float()).to(x.dtype)
        return branch(x)


class DCA(nn.Module):
    """Dynamic channel attention: GAP -> 1-D conv along channels -> sigmoid -> channel scaling.

    (N, C, H, W, D) -> (N, C, H, W, D); ``kernel_size`` is the (odd) width of the 1-D channel conv.
    """

    def __init__(self, kernel_size: int = 3):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"dca_kernel must be odd, got {kernel_size}")
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3, 4)).unsqueeze(1)  # (N, 1, C)
        weights = torch.sigmoid(self.conv(pooled)).squeeze(1)  # (N, C)
        return x * weights[:, :, None, None, None]


class CrossModalGate(nn.Module):
    """Cross-modal spatial gate: att = sigmoid(W3 relu(W1 x + W2 other + b12) + b3); returns att * x.

    x, other: (N, C, H, W, D) -> (N, C, H, W, D); W1, W2 are 1x1x1 convs C -> C/reduction, W3 -> 1 channel.
    """

    def __init__(self, channels: int, reduction: int = 2):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.w_self = nn.Conv3d(channels, hidden, 1, bias=False)
        self.w_other = nn.Conv3d(channels, hidden, 1, bias=True)  # its bias is b12
        self.w_out = nn.Conv3d(hidden, 1, 1, bias=True)  # its bias is b3

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        att = torch.sigmoid(self.w_out(torch.relu(self.w_self(x) + self.w_other(other))))
        return x * att


class ECMCA(nn.Module):
    """Enhanced cross-modal channel attention at one encoder level, symmetric in the two modalities.

    (moving, fixed) each (N, C, H, W, D) -> (moving', fixed'), same shapes. Per modality MSFA then DCA
    (each switchable, own weights), then two cross-modal gates, each fed by both modalities:
    moving' = gate_m(moving, fixed), fixed' = gate_f(fixed, moving). With everything off it is the identity.
    """

    def __init__(
        self,
        channels: int,
        msfa: bool = True,
        msfa_kernels: Sequence[int] = (3, 5, 7),
        msfa_mode: str = "paper",
        dca: bool = True,
        dca_kernel: int = 3,
        attention: bool = True,
        attention_reduction: int = 2,
    ):
        super().__init__()

        def per_modality(enabled: bool, make):
            return nn.ModuleList([make() if enabled else nn.Identity() for _ in range(2)])

        self.msfa = per_modality(msfa, lambda: MSFA(channels, msfa_kernels, msfa_mode))
        self.dca = per_modality(dca, lambda: DCA(dca_kernel))
        self.attention = attention
        self.gates = nn.ModuleList(
            [CrossModalGate(channels, attention_reduction) for _ in range(2)] if attention else []
        )

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        moving = self.dca[0](self.msfa[0](moving))
        fixed = self.dca[1](self.msfa[1](fixed))
        if self.attention:  # gate_m(moving, fixed), gate_f(fixed, moving); a loop so that TorchScript compiles
            streams, gated = [moving, fixed], []  # the variant without gates too
            for i, gate in enumerate(self.gates):
                gated.append(gate(streams[i], streams[1 - i]))
            moving, fixed = gated[0], gated[1]
        return moving, fixed


class FuseConv(nn.Module):
    """1x1x1 conv + LeakyReLU on the concatenated streams: (N, C_m + C_f, ...) -> (N, out, ...)."""

    def __init__(self, in_channels: int, out_channels: int, negative_slope: float = 0.2):
        super().__init__()
        self.conv = conv_block(in_channels, out_channels, kernel_size=1, negative_slope=negative_slope)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([moving, fixed], dim=1))


class PaperLSTMRefiner(nn.Module):
    """The paper's LSTM over depth chunks, exact sizes: v (N, 3, H, W, D) -> v + delta, same shape.

    Each of the T chunks (D/T slices) is flattened (3*H*W*D/T values, 589,824 on 128x128x120), a
    ``layers``-layer LSTM with ``hidden`` units runs over the T chunks, and a linear layer maps each hidden
    state back to a chunk. Tied to one grid: ``spatial_size`` is fixed at construction and D must be a
    multiple of T. The output layer starts at zero, so delta = 0 at initialisation.
    """

    def __init__(self, spatial_size: Sequence[int], chunks: int = 10, hidden: int = 128, layers: int = 2):
        super().__init__()
        h, w, d = (int(s) for s in spatial_size)
        if d % chunks:
            raise ValueError(f"lstm='paper' needs the depth {d} to be a multiple of chunks={chunks}")
        self.spatial_size = (h, w, d)
        self.chunks = chunks
        self.chunk_depth = d // chunks
        features = 3 * h * w * self.chunk_depth
        self.lstm = nn.LSTM(features, hidden, num_layers=layers, batch_first=True)
        self.fc = nn.Linear(hidden, features)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if list(v.shape[2:]) != [self.spatial_size[0], self.spatial_size[1], self.spatial_size[2]]:
            raise ValueError(f"lstm='paper' is built for grid {self.spatial_size}, got {list(v.shape[2:])}")
        n, h, w = v.shape[0], self.spatial_size[0], self.spatial_size[1]
        # (N, 3, H, W, T, d) -> (N, T, 3, H, W, d) -> (N, T, 3*H*W*d)
        seq = v.reshape(n, 3, h, w, self.chunks, self.chunk_depth).permute(0, 4, 1, 2, 3, 5).reshape(n, self.chunks, -1)
        out, _ = self.lstm(seq)
        delta = self.fc(out).reshape(n, self.chunks, 3, h, w, self.chunk_depth).permute(0, 2, 3, 4, 1, 5)
        return v + delta.reshape(v.shape)


class CompactLSTMRefiner(nn.Module):
    """LSTM over a small per-chunk code of the velocity, any grid: v (N, 3, H, W, D) -> v + delta.

    v is average-pooled to a (gx, gy, T*gz) grid (``code`` = (gx, gy, gz) cells per depth chunk; the
    depth bins start at the chunk boundaries of :func:`chunk_bounds`), each chunk's 3*gx*gy*gz code is one
    LSTM step, a linear layer maps each hidden state back to a code, and the codes are upsampled
    trilinearly to (H, W, D), so delta is smooth across chunk borders. The output layer starts at zero.
    """

    def __init__(self, chunks: int = 10, code: Sequence[int] = (16, 16, 2), hidden: int = 128, layers: int = 2):
        super().__init__()
        self.chunks = chunks
        self.code = tuple(int(c) for c in code)
        features = 3 * self.code[0] * self.code[1] * self.code[2]
        self.lstm = nn.LSTM(features, hidden, num_layers=layers, batch_first=True)
        self.fc = nn.Linear(hidden, features)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        n = v.shape[0]
        gx, gy, gz = self.code
        size = [gx, gy, self.chunks * gz]
        if not torch.jit.is_scripting():  # an ONNX export cannot translate adaptive pooling with uneven bins
            pool = adaptive_avg_pool3d_as_matmul if torch.onnx.is_in_onnx_export() else F.adaptive_avg_pool3d
            pooled = pool(v, size)  # (N, 3, gx, gy, T*gz)
        else:
            pooled = F.adaptive_avg_pool3d(v, size)
        seq = pooled.reshape(n, 3, gx, gy, self.chunks, gz).permute(0, 4, 1, 2, 3, 5).reshape(n, self.chunks, -1)
        out, _ = self.lstm(seq)
        code = self.fc(out).reshape(n, self.chunks, 3, gx, gy, gz).permute(0, 2, 3, 4, 1, 5)
        code = code.reshape(n, 3, gx, gy, self.chunks * gz)
        return v + F.interpolate(code, size=v.shape[2:], mode="trilinear", align_corners=False)


# hand-written: Warp fails jit.script; its grid cache misses: https://github.com/Project-MONAI/MONAI/pull/9082
class GridCachedWarp(Warp):
    """MONAI ``Warp`` (its native ``grid_sample`` path) that TorchScript can compile, optionally keeping its grid.

    Hand-written ``forward``: MONAI 1.6.1's ``Warp.forward`` does not compile with ``torch.jit.script`` (it builds
    a shape tuple of unknown length), which the model zoo's TorchScript check needs. This is the same arithmetic
    for 3-D fields, op for op (identity grid + ddf, each axis scaled to [-1, 1] by ``2 / (n - 1)``, axes reversed,
    ``grid_sample`` with ``align_corners=True``): the same output (``tests/test_network.py``).
    ``cache``: the identity grid is built on the field's device and reused while its shape holds; MONAI 1.6.1's
    ``get_reference_grid`` compares the cached grid's shape (N, 3, H, W, D)[1:] with the field's (H, W, D), so
    its cache never hits and every call rebuilds the grid on the host (on an H100 at 128 x 128 x 120 most of
    VecInt's time). No jitter.
    """

    def __init__(self, mode: str = "bilinear", padding_mode: str = "border", cache: bool = True):
        super().__init__(mode=mode, padding_mode=padding_mode)
        self.cache = cache

    def get_reference_grid(self, ddf: torch.Tensor, jitter: bool = False, seed: int = 0) -> torch.Tensor:
        """(N, 3, H, W, D) voxel indices of the field's grid (the cached one when ``cache``; compiled: a new one)."""
        if jitter:
            raise ValueError("GridCachedWarp does not jitter its grid")
        if not torch.jit.is_scripting():
            return self._cached_grid(ddf)
        return _identity_grid(ddf).expand(ddf.shape[0], -1, -1, -1, -1)

    @torch.jit.ignore
    def _cached_grid(self, ddf: torch.Tensor) -> torch.Tensor:
        grid = self.ref_grid
        if grid is None or not self.cache or grid.shape[2:] != ddf.shape[2:] or grid.device != ddf.device:
            with torch.inference_mode(False):  # a normal tensor, usable later with autograd too
                grid = _identity_grid(ddf)
            if self.cache:
                self.ref_grid = grid
        return grid.to(ddf.dtype).expand(ddf.shape[0], *grid.shape[1:])

    def forward(self, image: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
        """image (N, C, H, W, D), ddf (N, 3, H, W, D) in voxels -> image sampled at x + ddf(x)."""
        grid = (self.get_reference_grid(ddf) + ddf).permute(0, 2, 3, 4, 1)  # (N, H, W, D, 3)
        sizes = grid.shape[1:-1]
        scaled = [grid[..., i] * 2 / max(sizes[i] - 1, 1) - 1 for i in range(3)]
        return F.grid_sample(
            image,
            torch.stack([scaled[2], scaled[1], scaled[0]], dim=-1),  # (i, j, k) -> grid_sample's (x, y, z)
            mode=self._interp_mode_native,
            padding_mode=self._padding_mode_native,
            align_corners=True,
        )


def _identity_grid(ddf: torch.Tensor) -> torch.Tensor:
    """(1, 3, H, W, D) voxel indices of the field's grid, on its device and in its dtype."""
    axes = [torch.arange(n, device=ddf.device, dtype=ddf.dtype) for n in ddf.shape[2:]]
    return torch.stack(torch.meshgrid(axes, indexing="ij"))[None]
