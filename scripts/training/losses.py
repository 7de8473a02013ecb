"""Registration loss: 0.4 * gradient + 1.0 * Dice + 1.0 * masked mutual information, per depth chunk.

``dice_channels="all"`` scores every label channel (gland, urethra, landmarks: μ-RegPro's weak supervision)
instead of the gland alone; ``field_weight`` > 0 adds a supervised term on a known true field (the phantom's).

Two switches give the baselines' native losses (configs/baselines/): ``mi_region="image"`` (MI over the
whole box, no label needed: unsupervised VoxelMorph) and ``regulariser="bending"`` (MONAI's bending
energy in place of the gradient term: LocalNet as Hu et al. 2018).

All terms are computed in fp32 on the network grid. Per-chunk values use the T depth chunks of
:func:`scripts.networks.blocks.chunk_bounds` (balanced, no padding) along the LAST spatial axis.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from monai.losses import BendingEnergyLoss, DiceLoss, DiffusionLoss
from monai.losses.deform import spatial_gradient
from monai.networks.blocks import Warp
from torch import nn

from scripts.networks.blocks import GridCachedWarp, chunk_bounds, chunk_matrix

__all__ = ["DICE_CHANNELS", "EMPTY_LABEL_VOXELS", "masked_mutual_information", "RegistrationLoss", "composite_loss"]

DICE_CHANNELS = ("gland", "all")
# a fixed label channel counts as present in a depth chunk when its (soft) voxel sum there reaches this
EMPTY_LABEL_VOXELS = 0.5


# hand-written: monai.losses.GlobalMutualInformationLoss has no mask (a masked voxel still fills the histograms)
def masked_mutual_information(
    a: torch.Tensor,
    b: torch.Tensor,
    mask: torch.Tensor,
    num_bins: int = 23,
    sigma_ratio: float = 0.5,
    eps: float = 1e-7,
) -> torch.Tensor:
    """Parzen-window mutual information of a and b over the voxels where ``mask`` > 0, per sample.

    Hand-written because MONAI's ``GlobalMutualInformationLoss`` takes no mask, and in ROI images the
    zeroed background would dominate its joint histogram.

    Args:
        a, b: intensities in [0, 1], shape (N, 1, ...) (any spatial shape).
        mask: voxel weights (N, 1, ...) (0/1; treated as constants).
        num_bins: Gaussian kernel centres, evenly spaced on [0, 1].
        sigma_ratio: kernel std as a fraction of the bin spacing.

    Returns:
        MI in nats, shape (N,), fp32; exactly 0 (with finite gradients) where the mask is empty.
    """
    a, b, mask = a.float().flatten(1), b.float().flatten(1), mask.float().detach().flatten(1)
    centres = torch.linspace(0.0, 1.0, num_bins, device=a.device)
    sigma = sigma_ratio / (num_bins - 1)

    def kernel(x):  # (N, V) -> (N, V, B), each voxel's weights sum to one
        w = torch.exp(-((x[..., None] - centres) ** 2) / (2 * sigma**2))
        return w / w.sum(dim=-1, keepdim=True).clamp_min(eps)

    ka, kb = kernel(a) * mask[..., None], kernel(b)
    count = mask.sum(dim=1)
    joint = torch.bmm(ka.transpose(1, 2), kb) / count.clamp_min(1.0)[:, None, None]  # (N, B, B)
    pa, pb = joint.sum(dim=2, keepdim=True), joint.sum(dim=1, keepdim=True)
    mi = (joint * (torch.log(joint + eps) - torch.log(pa * pb + eps))).sum(dim=(1, 2))
    return mi * (count > 0)


class RegistrationLoss(nn.Module):
    """Warp the moving image and labels with a ddf and score the result per depth chunk.

    Args:
        grad_weight, dice_weight, mi_weight: the paper's alpha = 0.4, beta = 1.0, gamma = 1.0.
        chunks: number T of depth chunks.
        num_bins, sigma_ratio: Parzen window of the masked MI.
        mask_dilation: the MI region is the union of the warped and fixed gland (channel 0, > 0.5),
            dilated by this many voxels (a (2r+1)^3 max filter).
        smooth: numerator/denominator smoothing of MONAI's Dice (an empty chunk in both labels scores 0).
        dice_channels: "gland" (channel 0 only, the default) or "all": per sample and chunk, the mean Dice
            loss over the channels present in the FIXED label there (soft voxel sum >= ``EMPTY_LABEL_VOXELS``);
            absent channels do not enter the mean. A chunk with no channel present scores the gland channel
            (as "gland" does, so a warped gland spilling into it is still penalised).
        field_weight: weight of the true-field term (0 = off). When > 0, ``forward`` needs ``true_ddf`` and adds
            ``field`` (N,) = field_weight * mean over the dilated fixed gland (see ``mask_dilation``) of
            |ddf - true_ddf|^2, the squared Euclidean error in box voxels (voxel^2).
        mi_region: "gland" (the dilated gland union above, the paper's) or "image" (every box voxel).
        regulariser: "gradient" (first-order, the paper's) or "bending" (second-order bending energy);
            ``grad_weight`` weighs either.
        grid_cache: speed option, warp with :class:`scripts.networks.blocks.GridCachedWarp` (identity grid kept on the
            device) instead of MONAI's ``Warp``; same output (the network's switch of the same name).
    """

    def __init__(
        self,
        grad_weight: float = 0.4,
        dice_weight: float = 1.0,
        mi_weight: float = 1.0,
        chunks: int = 10,
        num_bins: int = 23,
        sigma_ratio: float = 0.5,
        mask_dilation: int = 2,
        smooth: float = 1e-5,
        mi_region: str = "gland",
        regulariser: str = "gradient",
        grid_cache: bool = False,
        dice_channels: str = "gland",
        field_weight: float = 0.0,
    ):
        super().__init__()
        if dice_channels not in DICE_CHANNELS:
            raise ValueError(f"dice_channels must be one of {DICE_CHANNELS}, got {dice_channels!r}")
        if field_weight < 0:
            raise ValueError(f"field_weight must be >= 0, got {field_weight}")
        self.dice_channels, self.field_weight = dice_channels, float(field_weight)
        if mi_region not in ("gland", "image"):
            raise ValueError(f"mi_region must be 'gland' or 'image', got {mi_region!r}")
        if regulariser not in ("gradient", "bending"):
            raise ValueError(f"regulariser must be 'gradient' or 'bending', got {regulariser!r}")
        self.mi_region, self.regulariser = mi_region, regulariser
        self.grad_weight, self.dice_weight, self.mi_weight = grad_weight, dice_weight, mi_weight
        self.chunks, self.num_bins, self.sigma_ratio, self.mask_dilation = chunks, num_bins, sigma_ratio, mask_dilation
        self.warp = (GridCachedWarp if grid_cache else Warp)(mode="bilinear", padding_mode="border")
        self.dice = DiceLoss(smooth_nr=smooth, smooth_dr=smooth, reduction="none")
        self.diffusion = DiffusionLoss()
        self.bending = BendingEnergyLoss(reduction="none")

    def _dilate(self, binary: torch.Tensor) -> torch.Tensor:
        r = self.mask_dilation
        return F.max_pool3d(binary, 2 * r + 1, stride=1, padding=r) if r > 0 else binary

    def _mi_region(self, warped_gland: torch.Tensor, fixed_gland: torch.Tensor) -> torch.Tensor:
        """Dilated union of the two glands (N, 1, H, W, D), binary, no gradient (all ones for "image")."""
        if self.mi_region == "image":
            return torch.ones_like(fixed_gland)
        return self._dilate(((warped_gland.detach() > 0.5) | (fixed_gland > 0.5)).float())

    def _chunk_dice(self, warped_label: torch.Tensor, fixed_label: torch.Tensor) -> torch.Tensor:
        """Dice loss (N,) of one chunk (or the whole volume): the gland, or the mean over present channels."""
        if self.dice_channels == "gland":
            return self.dice(warped_label[:, :1], fixed_label[:, :1]).flatten()
        per_channel = self.dice(warped_label, fixed_label).flatten(1)  # (N, C)
        present = (fixed_label.flatten(2).sum(dim=2) >= EMPTY_LABEL_VOXELS).float()  # (N, C)
        count = present.sum(dim=1)
        mean = (per_channel * present).sum(dim=1) / count.clamp_min(1.0)
        return torch.where(count > 0, mean, per_channel[:, 0])

    def _field_error(self, ddf: torch.Tensor, true_ddf: torch.Tensor, fixed_gland: torch.Tensor) -> torch.Tensor:
        """Mean squared voxel error (N,) of ``ddf`` against ``true_ddf`` over the dilated fixed gland (0 if empty)."""
        if true_ddf.shape != ddf.shape:
            raise ValueError(f"true_ddf has shape {tuple(true_ddf.shape)}, the predicted ddf {tuple(ddf.shape)}")
        region = self._dilate((fixed_gland > 0.5).float()).flatten(1)
        squared = ((ddf - true_ddf.float()) ** 2).sum(dim=1).flatten(1)
        return (squared * region).sum(dim=1) / region.sum(dim=1).clamp_min(1.0)

    def _regulariser_map(self, ddf: torch.Tensor) -> torch.Tensor:
        """The regulariser per voxel, (N, 3, H, W, D).

        "gradient": squared first-order gradient summed over directions, the central differences of MONAI's
        ``DiffusionLoss``; "bending": MONAI's ``BendingEnergyLoss`` map. Both are defined on interior voxels
        and edge-padded back to the full grid so that every voxel, hence every chunk, has a value.
        """
        if self.regulariser == "bending":
            return F.pad(self.bending(ddf), (1, 1, 1, 1, 1, 1), mode="replicate")
        squared = sum(spatial_gradient(ddf, dim) ** 2 for dim in range(2, 5))
        return F.pad(squared, (1, 1, 1, 1, 1, 1), mode="replicate")

    def forward(
        self,
        ddf: torch.Tensor,
        moving_image: torch.Tensor,
        fixed_image: torch.Tensor,
        moving_label: torch.Tensor,
        fixed_label: torch.Tensor,
        true_ddf: Optional[torch.Tensor] = None,
    ) -> dict:
        """ddf (N, 3, H, W, D) voxels; images (N, 1, ...) in [0, 1]; labels (N, C, ...), channel 0 = gland;
        ``true_ddf`` (N, 3, H, W, D) voxels, same convention as ``ddf`` (needed when ``field_weight`` > 0).

        Returns ``reg`` (N, T) = dice_weight * Dice_t + mi_weight * (-MI_t), ``smooth`` (N, T) =
        grad_weight * regulariser_t, the whole-volume unweighted scalars ``dice`` (per ``dice_channels``),
        ``mi`` (the loss, -MI), ``grad`` (detached), ``warped_image`` (N, 1, ...), ``warped_label`` (N, C, ...),
        and with ``field_weight`` > 0 ``field`` (N,) (weighted) and ``field_error`` (detached scalar, voxel^2).
        """
        if self.field_weight > 0 and true_ddf is None:
            raise ValueError(
                "RegistrationLoss(field_weight > 0) needs true_ddf: train.json adds it with "
                "scripts.data.transforms.TrueFieldToBoxd when loss#field_weight > 0"
            )
        with torch.autocast(device_type=ddf.device.type, enabled=False):
            ddf = ddf.float()
            warped_image = self.warp(moving_image.float(), ddf)
            warped_label = self.warp(moving_label.float(), ddf)
            fixed_image, fixed_label = fixed_image.float(), fixed_label.float()
            warped_gland, fixed_gland = warped_label[:, :1], fixed_label[:, :1]
            region = self._mi_region(warped_gland, fixed_gland)

            depth = ddf.shape[-1]
            dice_t, mi_t = [], []
            for start, stop in chunk_bounds(depth, self.chunks):
                dice_t.append(self._chunk_dice(warped_label[..., start:stop], fixed_label[..., start:stop]))
                mi_t.append(
                    -masked_mutual_information(
                        warped_image[..., start:stop],
                        fixed_image[..., start:stop],
                        region[..., start:stop],
                        self.num_bins,
                        self.sigma_ratio,
                    )
                )
            dice_t, mi_t = torch.stack(dice_t, dim=1), torch.stack(mi_t, dim=1)  # (N, T)
            grad_t = self._regulariser_map(ddf).mean(dim=(1, 2, 3)) @ chunk_matrix(depth, self.chunks, ddf.device)

            with torch.no_grad():  # whole-volume diagnostics, no graph
                diagnostics = {
                    "dice": self._chunk_dice(warped_label, fixed_label).mean(),
                    "mi": -masked_mutual_information(
                        warped_image, fixed_image, region, self.num_bins, self.sigma_ratio
                    ).mean(),
                    "grad": self.diffusion(ddf),
                }
            terms = {
                "reg": self.dice_weight * dice_t + self.mi_weight * mi_t,
                "smooth": self.grad_weight * grad_t,
                **diagnostics,
                "warped_image": warped_image,
                "warped_label": warped_label,
            }
            if self.field_weight > 0:
                error = self._field_error(ddf, true_ddf.to(ddf.device), fixed_gland)
                terms.update(field=self.field_weight * error, field_error=error.detach().mean())
            return terms


def composite_loss(terms: dict, task_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Scalar training loss of the registration network from :class:`RegistrationLoss` terms.

    With ``task_mask`` (N, T, 2): mean over samples and chunks of M0 * reg + M1 * smooth, the mask
    DETACHED (the registration network never changes the mask; the subnet has its own objective).
    Without: mean of reg + smooth (fixed weights, the "no task mask" ablation). A true-field term
    ``field`` (N,) is added as its sample mean, outside the task mask (it is supervision, not a chunk weight).
    """
    field = terms["field"].mean() if "field" in terms else 0.0
    if task_mask is None:
        return (terms["reg"] + terms["smooth"]).mean() + field
    mask = task_mask.detach()
    return (mask[..., 0] * terms["reg"] + mask[..., 1] * terms["smooth"]).mean() + field
