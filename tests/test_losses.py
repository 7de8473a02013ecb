"""Tests of scripts/training/losses.py and the task-mask objectives of scripts/training/iteration.py (expected values by hand)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scripts.training.iteration import difficulty_targets, mask_objective
from scripts.training.losses import RegistrationLoss, composite_loss, masked_mutual_information

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
    labels = dict(
        moving_label=torch.cat([moving_gland, torch.zeros_like(moving_gland)], 1),
        fixed_label=torch.cat([torch.ones_like(moving_gland), torch.zeros_like(moving_gland)], 1),
    )
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
    torch.testing.assert_close(
        loss(linear, image, image, label, label)["smooth"], torch.zeros(1, 10), atol=1e-9, rtol=0
    )
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


def _box(shape, x, y, z) -> torch.Tensor:
    """(1, 1, *shape) 0/1 volume, ones on the index ranges x, y, z (slices)."""
    out = torch.zeros(1, 1, *shape)
    out[..., x, y, z] = 1
    return out


def test_all_channel_dice_counts_present_channels_only():
    shape = (8, 8, 10)  # chunks=2: depth slices 0-4 and 5-9
    gland = _box(shape, slice(1, 7), slice(1, 7), slice(0, 10))
    # landmark in chunk 0 only: 2x2x3 = 12 voxels, the moving copy shifted by one voxel along x (6 overlap)
    fixed_mark = _box(shape, slice(2, 4), slice(2, 4), slice(1, 4))
    moving_mark = _box(shape, slice(3, 5), slice(2, 4), slice(1, 4))
    fixed, moving = torch.cat([gland, fixed_mark], 1), torch.cat([gland, moving_mark], 1)
    image = torch.full((1, 1, *shape), 0.5)  # constant: MI = 0
    ddf = torch.zeros(1, 3, *shape)
    gland_only = RegistrationLoss(chunks=2)(ddf, image, image, moving, fixed)
    every = RegistrationLoss(chunks=2, dice_channels="all")(ddf, image, image, moving, fixed)
    torch.testing.assert_close(gland_only["reg"], torch.zeros(1, 2), atol=1e-4, rtol=0)
    # chunk 0: mean of gland (0) and landmark (1 - 2*6/24 = 0.5); chunk 1: the landmark is absent, gland only
    torch.testing.assert_close(every["reg"], torch.tensor([[0.25, 0.0]]), atol=1e-4, rtol=0)
    assert every["dice"] > gland_only["dice"] + 0.2

    # a channel empty in the fixed label changes nothing, whether the moving one is empty or not
    spill = _box(shape, slice(0, 8), slice(0, 8), slice(0, 10))
    empty = torch.zeros_like(gland)
    more = RegistrationLoss(chunks=2, dice_channels="all")(
        ddf, image, image, torch.cat([moving, spill, empty], 1), torch.cat([fixed, empty, empty], 1)
    )
    torch.testing.assert_close(more["reg"], every["reg"], atol=1e-6, rtol=0)
    torch.testing.assert_close(more["dice"], every["dice"], atol=1e-6, rtol=0)


def test_all_channel_dice_falls_back_to_the_gland_where_nothing_is_present():
    shape = (6, 6, 4)
    fixed = torch.cat([_box(shape, slice(1, 5), slice(1, 5), slice(0, 2)), torch.zeros(1, 1, *shape)], 1)
    moving = torch.cat([_box(shape, slice(1, 5), slice(1, 5), slice(0, 4)), torch.zeros(1, 1, *shape)], 1)
    image = torch.full((1, 1, *shape), 0.5)
    terms = RegistrationLoss(chunks=2, dice_channels="all")(torch.zeros(1, 3, *shape), image, image, moving, fixed)
    # chunk 1: no fixed channel present, the moving gland spills there: the gland's Dice loss 1 (as "gland")
    torch.testing.assert_close(terms["reg"], torch.tensor([[0.0, 1.0]]), atol=1e-4, rtol=0)


def test_true_field_term_is_the_squared_error_over_the_dilated_fixed_gland():
    shape = (8, 8, 8)
    gland = _box(shape, slice(3, 5), slice(3, 5), slice(3, 5))
    label = gland.clone()
    image = torch.full((1, 1, *shape), 0.5)
    true_ddf = torch.full((1, 3, *shape), 10.0)  # far off outside the region ...
    true_ddf[..., 2:6, 2:6, 2:6] = 1.0  # ... 1 voxel per component inside the gland dilated by 1
    ddf = torch.zeros(1, 3, *shape, requires_grad=True)
    loss = RegistrationLoss(chunks=2, mask_dilation=1, field_weight=0.5)
    terms = loss(ddf, image, image, label, label, true_ddf=true_ddf)
    torch.testing.assert_close(terms["field"], torch.tensor([0.5 * 3.0]))  # weight * (1^2 + 1^2 + 1^2)
    torch.testing.assert_close(terms["field_error"], torch.tensor(3.0))
    plain = {k: v for k, v in terms.items() if k != "field"}
    torch.testing.assert_close(composite_loss(terms) - composite_loss(plain), torch.tensor(1.5))
    mask = torch.full((1, 2, 2), 0.5)
    torch.testing.assert_close(composite_loss(terms, mask) - composite_loss(plain, mask), torch.tensor(1.5))
    composite_loss(terms).backward()
    assert ddf.grad[..., 3, 3, 3].abs().sum() > 0 and ddf.grad[..., 0, 0, 0].abs().sum() < 1e-6
    # off by default: no term; on without a true field: a clear error
    assert "field" not in RegistrationLoss(chunks=2)(ddf.detach(), image, image, label, label, true_ddf=true_ddf)
    with pytest.raises(ValueError, match="TrueFieldToBoxd"):
        loss(ddf.detach(), image, image, label, label)
    with pytest.raises(ValueError, match="dice_channels"):
        RegistrationLoss(dice_channels="landmarks")
