"""Tests of scripts/networks/registration.py and scripts/networks/blocks.py (tiny grids and reduced channels, CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.engines import SupervisedTrainer
from monai.networks.blocks import Warp
from scipy.ndimage import gaussian_filter

from scripts.evaluation.metrics import jacobian_determinant
from scripts.networks.blocks import MSFA, CrossModalGate, chunk_bounds
from scripts.networks.registration import RegistrationNet
from scripts.networks.task_mask import TaskMaskNet
from scripts.training.iteration import RegistrationIteration
from scripts.training.losses import RegistrationLoss

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TINY = dict(encoder_channels=(4, 8, 8, 8), decoder_channels=(8, 8, 8, 4), head_channels=(8, 4, 4))


def tiny_net(**kwargs) -> RegistrationNet:
    torch.manual_seed(0)
    return RegistrationNet(**{**TINY, "compact_code": (4, 4, 1), **kwargs})


def tiny_mask(net: RegistrationNet, chunks: int = 10) -> TaskMaskNet:
    """The task-mask subnet for ``net``'s features (head[-1] = 4 channels), hidden width 16."""
    return TaskMaskNet(net.flow.in_channels, chunks, hidden=16)


def ellipsoid(shape, centre, radii) -> torch.Tensor:
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij")
    r = sum(((g - c) / a) ** 2 for g, c, a in zip(grids, centre, radii))
    return torch.sigmoid((1 - r) * 8)


def phantom_pair(shape, seed=0) -> dict:
    """A moving/fixed pair (no batch axis): shifted ellipsoid glands, different contrasts, 2 label channels."""
    g = torch.Generator().manual_seed(seed)
    c = [s / 2 for s in shape]
    fixed_gland = ellipsoid(shape, c, [s / 3.5 for s in shape])
    moving_gland = ellipsoid(shape, [c[0] + 1.5, c[1] - 1, c[2] + 1], [s / 4 for s in shape])
    spot_f = ellipsoid(shape, [c[0], c[1] + 2, c[2] - 1], (2, 2, 2))
    spot_m = ellipsoid(shape, [c[0] + 1, c[1] + 1, c[2]], (2, 2, 2))
    texture = torch.rand(shape, generator=g) * 0.1
    moving = (0.2 + 0.6 * moving_gland + texture).clamp(0, 1)
    fixed = (0.9 - 0.5 * fixed_gland - texture).clamp(0, 1)
    return {
        "image": torch.stack([moving, fixed]),
        "moving_label": torch.stack([moving_gland, spot_m]),
        "fixed_label": torch.stack([fixed_gland, spot_f]),
    }


def train(net, steps, shape, mask_objective="difficulty", mask_lr=1e-3, record=None, task_mask=None):
    """Run ``steps`` iterations of SupervisedTrainer + RegistrationIteration (with ``task_mask``, default a new
    :func:`tiny_mask`) on phantom pairs."""
    data = [phantom_pair(shape, seed) for seed in range(steps)]
    loader = torch.utils.data.DataLoader(data, batch_size=1)
    loss = RegistrationLoss()
    task_mask = tiny_mask(net) if task_mask is None else task_mask
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=loader,
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), lr=1e-3),
        loss_function=loss,
        iteration_update=RegistrationIteration(
            loss,
            task_mask=task_mask,
            mask_optimizer=torch.optim.Adam(task_mask.parameters(), lr=mask_lr),
            mask_objective=mask_objective,
        ),
    )
    if record is not None:
        from ignite.engine import Events

        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: record.append(e.state.output[0]["task_mask"]))
    trainer.run()
    return trainer


@pytest.mark.parametrize("shape", [(32, 32, 32), (16, 24, 32), (20, 28, 36), (13, 17, 11)])
def test_output_shapes_any_grid(shape):
    net = tiny_net()
    image = torch.rand(2, 2, *shape)
    with torch.no_grad():
        ddf = net(image)
        out = net.forward_train(image)
        mask = tiny_mask(net)(out["features"])
    assert ddf.shape == (2, 3, *shape) and torch.equal(out["ddf"], ddf)
    assert out["ddf"].shape == out["velocity"].shape == (2, 3, *shape)
    assert out["features"].shape == (2, 4, *shape)
    assert mask.shape == (2, 10, 2) and mask.dtype == torch.float32
    torch.testing.assert_close(mask.sum(-1), torch.ones(2, 10))


@pytest.mark.parametrize(
    "switches",
    [
        dict(msfa=False, dca=False),  # CMCA
        dict(lstm="none"),
        dict(msfa=False, dca=False, attention=False, lstm="none"),  # plain U-Net
        dict(msfa_mode="dilated"),
    ],
)
def test_ablations_run(switches):
    net = tiny_net(**switches)
    with torch.no_grad():
        out = net.forward_train(torch.rand(1, 2, 16, 16, 16))
    assert out["ddf"].shape == (1, 3, 16, 16, 16) and sorted(out) == ["ddf", "features", "velocity"]


def test_msfa_parameter_counts():
    # per level and modality, one conv C -> C per kernel: C*C*k^3 weights + C biases.
    # paper kernels 3,5,7: sum k^3 = 27 + 125 + 343 = 495; dilated: three 3^3 kernels, 81.
    # levels (4, 8, 8, 8), two modalities: paper 2*(16*495 + 3*4) + 3*2*(64*495 + 3*8) = 15,864 + 190,224
    def count(net):
        return sum(p.numel() for p in net.parameters())

    plain = count(tiny_net(msfa=False))
    assert count(tiny_net()) - plain == 206_088
    # dilated: 2*(16*81 + 12) + 3*2*(64*81 + 24) = 2,616 + 31,248
    assert count(tiny_net(msfa_mode="dilated")) - plain == 33_864


def test_msfa_softmax_scale_weights():
    # branch k outputs a_k * x for a constant input x = c: score s_k = mean + max = 2 a_k c,
    # output = sum_k softmax(s)_k a_k c
    msfa = MSFA(1, (3, 5, 7))
    gains = (0.5, 1.0, 2.0)
    with torch.no_grad():
        for branch, a in zip(msfa.branches, gains):
            conv = branch.conv
            conv.weight.zero_()
            conv.bias.zero_()
            k = conv.weight.shape[-1]
            conv.weight[0, 0, k // 2, k // 2, k // 2] = a
        c = 0.3
        out = msfa(torch.full((1, 1, 8, 8, 8), c))
    scores = np.array([2 * a * c for a in gains])
    weights = np.exp(scores) / np.exp(scores).sum()
    expected = float((weights * np.array(gains) * c).sum())
    torch.testing.assert_close(out, torch.full_like(out, expected))


def test_cross_modal_gate_uses_both_modalities():
    gate = CrossModalGate(4)
    with torch.no_grad():
        for conv in (gate.w_self, gate.w_other, gate.w_out):
            conv.weight.zero_()
        gate.w_other.bias.zero_()
        gate.w_out.bias.zero_()
        x = torch.rand(1, 4, 4, 4, 4)
        # all weights zero: att = sigmoid(0) = 0.5 everywhere
        torch.testing.assert_close(gate(x, torch.rand_like(x)), 0.5 * x)
        # W2 = 1 on channel 0 of the other modality, W3 = 1: att = sigmoid(relu(other[0]))
        gate.w_other.weight[:, 0] = 1.0
        gate.w_out.weight.fill_(1.0)
        other = torch.rand_like(x)
        att = torch.sigmoid(2 * other[:, :1])  # hidden = C/2 = 2 units, each relu(other[0])
        torch.testing.assert_close(gate(x, other), x * att)


def test_chunk_bounds():
    assert chunk_bounds(120, 10) == [(12 * t, 12 * t + 12) for t in range(10)]
    sizes = [b - a for a, b in chunk_bounds(32, 10)]
    assert sizes == [3, 3, 3, 3, 4, 3, 3, 3, 3, 4]
    with pytest.raises(ValueError):
        chunk_bounds(8, 10)


def test_identity_at_initialisation():
    # paper channel widths (the flow init is calibrated for them), 32^3 grid
    torch.manual_seed(0)
    net = RegistrationNet()
    pair = phantom_pair((32, 32, 32))
    with torch.no_grad():
        ddf = net(pair["image"][None])
        warped = Warp()(pair["image"][None, :1], ddf)
    assert (warped - pair["image"][None, :1]).abs().max() < 1e-3


@pytest.mark.parametrize("lstm", ["compact", "paper"])
def test_two_steps_every_parameter_has_gradient(lstm):
    net = tiny_net(lstm=lstm, spatial_size=(16, 16, 20))
    task_mask = tiny_mask(net)
    train(net, steps=2, shape=(16, 16, 20), task_mask=task_mask)
    no_grad = [
        n for n, p in [*net.named_parameters(), *task_mask.named_parameters()] if p.grad is None or p.grad.norm() == 0
    ]
    assert no_grad == []


def test_the_task_mask_is_its_own_module_and_forward_gives_the_training_dict_on_request():
    """The subnet is not part of the network (its 8 tensors: two branches x two Linear x (weight, bias));
    ``forward(image, train=True)`` gives the training dict (what DDP runs), ``forward(image)`` the field."""
    net = tiny_net()
    assert not any("task_mask" in name for name in net.state_dict())
    assert len(list(tiny_mask(net).parameters())) == 8
    image = torch.rand(1, 2, 16, 16, 16)
    with torch.no_grad():
        out = net(image, train=True)
        ddf = net(image)
    assert isinstance(out, dict) and sorted(out) == ["ddf", "features", "velocity"]
    assert torch.equal(out["ddf"], ddf)


def test_every_network_states_the_contract():
    """Each network class follows :class:`scripts.networks.contract.RegistrationNetwork`: ``integrate`` is stated
    (a module for a velocity network, None for a direct DDF) and ``forward_train`` gives every key."""
    from conftest import ContentNet

    from scripts.networks.baselines import BaselineNet
    from scripts.networks.contract import TRAIN_KEYS, RegistrationNetwork
    from scripts.spatial.composed import FieldNetwork

    image = torch.rand(1, 2, 16, 16, 16)
    for net, velocity in [
        (tiny_net(), True),
        (BaselineNet("voxelmorph", channels=(4, 8, 8, 8), unet_out_channels=4, final_conv_channels=(4,)), True),
        (BaselineNet("localnet", num_channel_initial=4), False),
        (ContentNet(), True),
    ]:
        assert isinstance(net, RegistrationNetwork) and (net.integrate is not None) == velocity
        with torch.no_grad():
            out = net.forward_train(image)
        assert set(TRAIN_KEYS) <= set(out) and (out["velocity"] is not None) == velocity
    assert FieldNetwork.integrate is None and isinstance(FieldNetwork.__new__(FieldNetwork), RegistrationNetwork)


def interior_jacobian(u: torch.Tensor) -> np.ndarray:
    """det(I + du/dx) by central differences for u (3, H, W, D) in voxels, interior voxels only."""
    return jacobian_determinant(u.numpy())[1:-1, 1:-1, 1:-1]


def test_vecint_of_smooth_velocity_does_not_fold():
    rng = np.random.default_rng(0)
    v = torch.tensor(np.stack([gaussian_filter(rng.standard_normal((32, 32, 32)), 3) for _ in range(3)]))
    v = v.float()
    v = v * 1.5 / max(g.abs().max() for i in range(3) for g in torch.gradient(v[i], dim=(0, 1, 2)))
    assert interior_jacobian(v).min() < 0  # used directly as a displacement, this field folds
    with torch.no_grad():
        ddf = tiny_net().integrate(v[None])[0]
    assert ddf.abs().max() > 1.0  # a real deformation, not a vanishing one
    assert interior_jacobian(ddf).min() > 0


def test_paper_lstm_parameter_count_on_meta_device():
    # per chunk: 3 * 128 * 128 * (120 / 10) = 589,824 inputs; torch LSTM layer l: 4h*(in_l + h) + 2*4h
    # layer 1: 512 * (589,824 + 128) + 1,024 = 302,056,448; layer 2: 512 * 256 + 1,024 = 132,096
    # FC 128 -> 589,824: 128 * 589,824 + 589,824 = 76,087,296; total 378,275,840
    with torch.device("meta"):
        net = RegistrationNet(lstm="paper", spatial_size=(128, 128, 120))
    params = list(net.refiner.lstm.parameters()) + list(net.refiner.fc.parameters())
    assert all(p.device.type == "meta" for p in net.parameters())
    assert sum(p.numel() for p in params) == 378_275_840


def test_paper_lstm_is_tied_to_its_grid():
    with pytest.raises(ValueError):
        RegistrationNet(**TINY, lstm="paper")  # no spatial_size
    with pytest.raises(ValueError):
        RegistrationNet(**TINY, lstm="paper", spatial_size=(16, 16, 25))  # depth not a multiple of 10
    net = tiny_net(lstm="paper", spatial_size=(16, 16, 20))
    with torch.no_grad():
        assert net(torch.rand(1, 2, 16, 16, 20)).shape == (1, 3, 16, 16, 20)
        with pytest.raises(ValueError):
            net(torch.rand(1, 2, 16, 16, 30))


@pytest.mark.parametrize("objective", ["difficulty", "joint"])
def test_task_mask_stays_inside_while_joint_objective_collapses(objective):
    # same network, data and optimisers (subnet lr 1e-2 to make a collapse show within 50 steps);
    # only the subnet's objective differs
    net = tiny_net(msfa=False, dca=False)
    masks = []
    train(net, steps=50, shape=(16, 16, 16), mask_objective=objective, mask_lr=1e-2, record=masks)
    masks = torch.stack(masks)  # (steps, T, 2): the trainer decollates its output per sample
    assert masks.shape == (50, 10, 2)
    if objective == "difficulty":
        assert ((masks >= 0.05) & (masks <= 0.95)).all()  # at every step, every chunk
        assert (masks[-1] - 0.5).abs().max() > 0.02  # and it did learn a non-uniform weighting
    else:  # the negative control: the paper-literal objective drives chunks towards a one-hot
        assert not ((masks[-1] >= 0.05) & (masks[-1] <= 0.95)).all()


def test_grad_clip_bounds_the_registration_step():
    """With SGD (lr 1) one step moves the registration parameters by exactly the gradient; with
    ``grad_clip`` c that move's L2 norm is at most c, while the unclipped move is larger."""
    from types import SimpleNamespace

    from test_multi_gpu import TINY_NET, _batch

    def step_norm(grad_clip):
        torch.manual_seed(0)
        net = RegistrationNet(**TINY_NET)
        task_mask = TaskMaskNet(net.flow.in_channels, TINY_NET["chunks"], 8)
        before = [p.detach().clone() for p in net.parameters()]
        engine = SimpleNamespace(
            state=SimpleNamespace(device=torch.device("cpu")), non_blocking=False, network=net,
            optimizer=torch.optim.SGD(net.parameters(), lr=1.0), fire_event=lambda event: None,
        )  # fmt: skip
        mask_optimizer = torch.optim.SGD(task_mask.parameters(), lr=0.0)
        RegistrationIteration(
            RegistrationLoss(chunks=TINY_NET["chunks"]), task_mask, mask_optimizer, grad_clip=grad_clip
        )(engine, _batch(0))
        return torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(net.parameters(), before)))

    clip = 1e-3
    assert step_norm(None) > 10 * clip
    assert 0 < step_norm(clip) <= clip * (1 + 1e-4)
    with pytest.raises(ValueError, match="grad_clip"):
        RegistrationIteration(RegistrationLoss(), grad_clip=0)


BF16_BACKWARD = """
import torch
from scripts.networks.blocks import MSFA
torch.manual_seed(0)
msfa = MSFA(16, (3, 5, 7), "paper")
x = torch.randn(1, 16, 4, 4, 4, requires_grad=True)
grads = []
for amp in (False, True, True, True):
    x.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        y = msfa(x)
    y.float().square().mean().backward()
    grads.append(x.grad.clone())
print(float((grads[-1] - grads[0]).norm() / grads[0].norm()))
"""


def test_paper_msfa_bf16_backward_on_a_bottleneck_smaller_than_its_kernel_does_not_crash():
    """torch 2.13's CPU bf16 backward of a 7^3 conv on a 4^3 map aborts the process (heap corruption);
    MSFA runs such a branch in fp32, so the step completes and its gradient matches fp32's."""
    run = subprocess.run(
        [sys.executable, "-c", BF16_BACKWARD],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert float(run.stdout.split()[-1]) < 0.05


def test_iteration_passes_the_true_field_to_the_field_term():
    """With loss field_weight > 0 the iteration feeds the batch's ``true_ddf`` to the loss: a target 2 voxels
    away on each axis raises the loss by about field_weight * 12 (squared voxels) over a zero target; none is an error.
    """
    from types import SimpleNamespace

    from test_multi_gpu import TINY_NET, _batch

    torch.manual_seed(0)
    net = RegistrationNet(**TINY_NET)
    engine = SimpleNamespace(
        state=SimpleNamespace(device=torch.device("cpu")),
        non_blocking=False,
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.0),
        fire_event=lambda e: None,
    )
    task_mask = TaskMaskNet(net.flow.in_channels, TINY_NET["chunks"], 8)
    iteration = RegistrationIteration(
        RegistrationLoss(chunks=TINY_NET["chunks"], field_weight=0.5),
        task_mask=task_mask,
        mask_optimizer=torch.optim.SGD(task_mask.parameters(), lr=0.0),
    )
    batch = _batch(0)
    shape = (batch["image"].shape[0], 3, *batch["image"].shape[2:])
    losses = [float(iteration(engine, {**batch, "true_ddf": torch.full(shape, value)})["loss"]) for value in (0.0, 2.0)]
    assert losses[1] - losses[0] == pytest.approx(0.5 * 3 * 2.0**2, rel=0.05)  # squared norm of (2, 2, 2)
    with pytest.raises(ValueError, match="TrueFieldToBoxd"):
        iteration(engine, batch)


def test_state_dict_carries_the_trained_settings_and_refuses_another_network_def():
    from monai.networks.utils import copy_model_state

    from scripts.networks.registration import SETTINGS_BYTES, decode_settings, encode_settings

    settings = {"spatial_size": [16, 16, 16], "network_def": {"msfa_mode": "paper", "encoder_channels": [4, 8, 8, 8]}}
    assert decode_settings(encode_settings(settings)) == settings and decode_settings(encode_settings({})) == {}
    with pytest.raises(ValueError, match="more than the 4096 kept"):
        encode_settings({"x": "y" * SETTINGS_BYTES})
    net = RegistrationNet(**TINY)
    net.trained_settings = settings
    state = net.state_dict()  # a plain state dict: every entry a tensor, the settings a fixed-size one
    assert all(isinstance(v, torch.Tensor) for v in state.values()) and state["_extra_state"].shape == (SETTINGS_BYTES,)
    # MONAI's loader copies them with the weights (same shape), and the network takes them
    same = RegistrationNet(**TINY, grid_cache=True)  # a speed switch is not a setting
    copy_model_state(same, state)
    assert same.trained_settings == settings and torch.equal(same.flow.weight, net.flow.weight)
    other = RegistrationNet(**TINY, msfa_mode="dilated")  # same tensor shapes, another network
    with pytest.raises(ValueError, match='msfa_mode: trained with "paper", built with "dilated"'):
        copy_model_state(other, state)


@pytest.mark.parametrize(
    "variant",
    [
        dict(msfa_mode="paper"),
        dict(msfa_mode="dilated", grid_cache=True),
        dict(lstm="paper", spatial_size=(16, 16, 20), chunks=4),
        dict(lstm="none", msfa=False, dca=False, attention=False),
    ],
)
def test_torchscript_compiles_the_network_and_gives_the_eager_field(variant):
    """``torch.jit.script`` (the model zoo's TorchScript check) compiles every variant; the compiled network gives
    the eager field exactly, and, but for the paper LSTM (tied to its grid), on any grid."""
    torch.manual_seed(0)
    net = RegistrationNet(**{**TINY, **variant}).eval()
    with torch.no_grad():
        net.flow.weight.normal_(0, 0.3)  # a visible field
        scripted = torch.jit.script(net)
        for shape in [(16, 16, 20)] + ([] if variant.get("lstm") == "paper" else [(12, 18, 14)]):
            x = torch.rand(1, 2, *shape, generator=torch.Generator().manual_seed(1))
            ref = net(x)
            assert ref.abs().max() > 0.05 and torch.equal(scripted(x), ref), shape


@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_the_scriptable_warp_is_monais_warp(padding):
    from scripts.networks.blocks import GridCachedWarp

    g = torch.Generator().manual_seed(0)
    image, ddf = torch.rand(2, 3, 9, 11, 7, generator=g), 3 * torch.randn(2, 3, 9, 11, 7, generator=g)
    expected = Warp(mode="bilinear", padding_mode=padding)(image, ddf)
    for cache in (False, True):
        warp = GridCachedWarp(padding_mode=padding, cache=cache)
        assert torch.equal(warp(image, ddf), expected) and torch.equal(torch.jit.script(warp)(image, ddf), expected)
