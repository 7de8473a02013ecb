"""Tests of scripts/losses.py and the task-mask objectives of scripts/task_mask.py (expected values by hand)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scripts.losses import RegistrationLoss, composite_loss, masked_mutual_information
from scripts.task_mask import difficulty_targets, mask_objective

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def checker(shape, axes) -> torch.Tensor:
    """0/1 pattern: parity of the sum of the voxel indices along ``axes``, shape (1, 1, *shape)."""
    idx = torch.meshgrid(*[torch.arange(s) for s in shape], indexing="ij")
    return (sum(idx[a] for a in axes) % 2).float()[None, None]


def test_mi_of_identical_binary_images_is_ln2():
    # a = b, two equally likely levels at bin centres 0 and 1 (kernels with disjoint support): MI = ln 2
    a = checker((8, 8, 8), (0, 1, 2))
    mi = masked_mutual_information(a, a.clone(), torch.ones_like(a))
    torch.testing.assert_close(mi, torch.tensor([math.log(2)]), atol=1e-4, rtol=0)


def test_mi_of_independent_images_is_zero():
    # a alternates along x, b along y: the four level pairs are equally frequent, the joint factorises
    a, b = checker((8, 8, 8), (0,)), checker((8, 8, 8), (1,))
    mi = masked_mutual_information(a, b, torch.ones_like(a))
    torch.testing.assert_close(mi, torch.zeros(1), atol=1e-4, rtol=0)


def test_mi_counts_only_masked_voxels():
    # first half of depth: b = a; second half: b independent of a
    a = checker((8, 8, 8), (0, 1, 2))
    b = torch.cat([a[..., :4], checker((8, 8, 8), (0,))[..., 4:]], dim=-1)
    mask = torch.zeros_like(a)
    mask[..., :4] = 1
    torch.testing.assert_close(masked_mutual_information(a, b, mask), torch.tensor([math.log(2)]), atol=1e-4, rtol=0)
    # unmasked: p(0,0) = p(1,1) = 3/8, p(0,1) = p(1,0) = 1/8, marginals 1/2:
    # MI = 2 * 3/8 ln(3/2) + 2 * 1/8 ln(1/2) = 0.130812
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    torch.testing.assert_close(
        masked_mutual_information(a, b, torch.ones_like(a)), torch.tensor([expected]), atol=1e-4, rtol=0
    )


def test_mi_empty_mask_is_zero_with_finite_gradient():
    a = torch.rand(2, 1, 6, 6, 6, requires_grad=True)
    b = torch.rand(2, 1, 6, 6, 6)
    mask = torch.zeros_like(b)
    mask[1, :, :3] = 1  # sample 0 empty, sample 1 not
    mi = masked_mutual_information(a, b, mask)
    assert mi[0] == 0 and mi[1] > 0
    mi.sum().backward()
    assert torch.isfinite(a.grad).all()
    assert a.grad[0].abs().max() == 0 and a.grad[1].abs().max() > 0


def test_dice_per_chunk_along_the_last_axis():
    shape = (6, 6, 20)  # 10 chunks of 2 slices
    moving_gland = torch.zeros(1, 1, *shape)
    moving_gland[..., :10] = 1
    labels = dict(moving_label=torch.cat([moving_gland, torch.zeros_like(moving_gland)], 1),
                  fixed_label=torch.cat([torch.ones_like(moving_gland), torch.zeros_like(moving_gland)], 1))
    image = torch.full((1, 1, *shape), 0.5)  # constant images: MI = 0
    terms = RegistrationLoss()(torch.zeros(1, 3, *shape), image, image, **labels)
    # chunks 0-4 overlap perfectly (Dice loss 0); chunks 5-9 have no warped gland (Dice loss 1)
    expected = torch.tensor([[0.0] * 5 + [1.0] * 5])
    torch.testing.assert_close(terms["reg"], expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(terms["smooth"], torch.zeros(1, 10))
    # whole volume: 1 - 2 * 360 / (360 + 720) = 1/3
    torch.testing.assert_close(terms["dice"], torch.tensor(1 / 3), atol=1e-4, rtol=0)
    torch.testing.assert_close(terms["warped_label"], labels["moving_label"])


def test_gradient_term_per_chunk():
    # u_x = a z^2 / 2 (z = depth index): central difference du_x/dz = a z exactly, other derivatives 0.
    # Per voxel: sum over directions of squared derivatives, mean over the 3 components -> a^2 z^2 / 3.
    # The edge slices take their neighbour's value (z = 1 and z = D-2); chunks of 2 slices.
    a, shape = 0.01, (5, 5, 20)
    z = torch.arange(shape[2], dtype=torch.float32)
    ddf = torch.zeros(1, 3, *shape)
    ddf[0, 0] = a * z**2 / 2
    image = torch.full((1, 1, *shape), 0.5)
    label = torch.zeros(1, 1, *shape)
    terms = RegistrationLoss()(ddf, image, image, label, label)
    per_slice = a**2 * np.clip(np.arange(20), 1, 18) ** 2 / 3
    expected = 0.4 * per_slice.reshape(10, 2).mean(axis=1)
    torch.testing.assert_close(terms["smooth"], torch.tensor(expected, dtype=torch.float32)[None], rtol=1e-5, atol=0)
    # MONAI DiffusionLoss (unweighted, interior voxels): mean of a^2 z^2 / 3 over z = 1..18
    expected_grad = a**2 * np.mean(np.arange(1, 19) ** 2) / 3
    torch.testing.assert_close(terms["grad"], torch.tensor(expected_grad, dtype=torch.float32), rtol=1e-5, atol=0)
    torch.testing.assert_close(terms["reg"], torch.zeros(1, 10))  # empty glands, constant images


def test_warp_is_in_voxels_pulling_from_moving():
    moving = torch.rand(1, 1, 6, 7, 8)
    ddf = torch.zeros(1, 3, 6, 7, 8)
    ddf[:, 0] = 1.0  # warped(p) = moving(p + one voxel along the first axis)
    label = torch.zeros(1, 1, 6, 7, 8)
    terms = RegistrationLoss(chunks=4)(ddf, moving, moving, label, label)
    torch.testing.assert_close(terms["warped_image"][:, :, :-1], moving[:, :, 1:])


def test_loss_is_fp32_under_autocast():
    shape = (8, 8, 10)
    ddf = torch.zeros(1, 3, *shape, dtype=torch.bfloat16)
    image = torch.rand(1, 1, *shape)
    label = (torch.rand(1, 2, *shape) > 0.5).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = RegistrationLoss()(ddf, image, image, label, label)
    assert terms["reg"].dtype == terms["smooth"].dtype == torch.float32
    assert torch.isfinite(terms["reg"]).all()


def test_composite_loss_by_hand():
    terms = {"reg": torch.tensor([[1.0, 3.0]]), "smooth": torch.tensor([[2.0, 4.0]])}
    assert composite_loss(terms) == pytest.approx((1 + 2 + 3 + 4) / 2)
    mask = torch.tensor([[[0.25, 0.75], [0.5, 0.5]]], requires_grad=True)
    loss = composite_loss(terms, mask)
    assert loss.item() == pytest.approx((0.25 * 1 + 0.75 * 2 + 0.5 * 3 + 0.5 * 4) / 2)
    assert not loss.requires_grad  # the mask enters detached


def test_difficulty_targets_by_hand():
    # reg = [0, 2] -> z = [-1, 1]; smooth constant -> z = 0; q = 0.1 + 0.8 * sigmoid(z)
    reg, smooth = torch.tensor([[0.0, 2.0]]), torch.tensor([[5.0, 5.0]])
    sig = 1 / (1 + math.exp(-1))
    expected_q = torch.tensor([[0.1 + 0.8 * (1 - sig), 0.1 + 0.8 * sig]])
    targets = difficulty_targets(reg, smooth, floor=0.1, temperature=1.0)
    torch.testing.assert_close(targets[..., 0], expected_q)
    torch.testing.assert_close(targets.sum(-1), torch.ones(1, 2))
    # units and sign do not matter: scaling and shifting a term leaves the targets unchanged
    torch.testing.assert_close(difficulty_targets(100 * reg - 7, 1e-6 * smooth), targets)


def test_difficulty_objective_is_minimal_at_its_target_and_joint_is_not():
    torch.manual_seed(0)
    reg, smooth = torch.randn(2, 10), torch.rand(2, 10)
    target = difficulty_targets(reg, smooth)
    logits = torch.log(target).clone().requires_grad_(True)  # softmax(logits) = target
    mask_objective(torch.softmax(logits, -1), reg, smooth, "difficulty").backward()
    torch.testing.assert_close(logits.grad, torch.zeros_like(logits), atol=1e-6, rtol=0)
    # the joint objective's gradient at the same point is reg - smooth (up to the softmax Jacobian): non-zero
    logits.grad = None
    mask_objective(torch.softmax(logits, -1), reg, smooth, "joint").backward()
    assert logits.grad.abs().max() > 1e-3
    with pytest.raises(ValueError):
        mask_objective(torch.softmax(logits, -1), reg, smooth, "bogus")


def test_bending_regulariser_per_chunk():
    # u_x = a z^3 / 6: the second central difference along z is a z exactly, every other second derivative 0
    # -> bending energy a^2 z^2 on the first component, 0 on the others: a^2 z^2 / 3 per voxel. The edge
    # slices take their neighbour's value (z = 1 and z = D-2); chunks of 2 slices. A linear field has no
    # bending energy but a gradient.
    a, shape = 0.01, (6, 6, 20)
    z = torch.arange(shape[2], dtype=torch.float32)
    image, label = torch.full((1, 1, *shape), 0.5), torch.zeros(1, 1, *shape)
    cubic, linear = torch.zeros(1, 3, *shape), torch.zeros(1, 3, *shape)
    cubic[0, 0], linear[0, 0] = a * z**3 / 6, a * z
    loss = RegistrationLoss(regulariser="bending", grad_weight=0.5)
    per_slice = a**2 * np.clip(np.arange(20), 1, 18) ** 2 / 3
    expected = torch.tensor(0.5 * per_slice.reshape(10, 2).mean(axis=1), dtype=torch.float32)[None]
    torch.testing.assert_close(loss(cubic, image, image, label, label)["smooth"], expected, rtol=1e-4, atol=0)
    torch.testing.assert_close(loss(linear, image, image, label, label)["smooth"], torch.zeros(1, 10), atol=1e-9, rtol=0)
    assert RegistrationLoss()(linear, image, image, label, label)["smooth"].min() > 0


def test_mi_over_the_whole_image_needs_no_label():
    # Two identical half-dark, half-bright images: MI is close to ln 2 over the whole image; with empty
    # gland labels the paper's gland region is empty and MI is exactly 0.
    image = torch.zeros(1, 1, 8, 8, 10)
    image[:, :, :4] = 1.0
    label = torch.zeros(1, 1, 8, 8, 10)
    ddf = torch.zeros(1, 3, 8, 8, 10)
    whole = -RegistrationLoss(mi_region="image")(ddf, image, image, label, label)["mi"]
    gland = -RegistrationLoss()(ddf, image, image, label, label)["mi"]
    assert 0.5 < whole <= np.log(2) + 1e-6
    assert gland == 0


def test_loss_switches_reject_unknown_values():
    with pytest.raises(ValueError, match="mi_region"):
        RegistrationLoss(mi_region="box")
    with pytest.raises(ValueError, match="regulariser"):
        RegistrationLoss(regulariser="elastic")
