"""Tests of scripts/networks/sequence.py (tiny static networks on small grids, CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scripts.networks.registration import RegistrationNet
from scripts.networks.sequence import SequenceRegistrationNet

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TINY = dict(encoder_channels=(4, 8), decoder_channels=(8, 4), head_channels=(4,), lstm="none", int_steps=4)
SIZE = (16, 16, 12)
ODD = (15, 17, 11)


def make_model(randomise: bool = False, **kwargs) -> SequenceRegistrationNet:
    """A tiny sequence model; the static flow conv gives velocities of a few tenths of a voxel.

    ``randomise``: random head weights too, so that the state (hidden and previous velocity) matters.
    """
    torch.manual_seed(0)
    static = RegistrationNet(**TINY)
    with torch.no_grad():
        nn.init.normal_(static.flow.weight, std=0.3)
    model = SequenceRegistrationNet(static, hidden=4, **kwargs)
    if randomise:
        with torch.no_grad():
            nn.init.normal_(model.head.weight, std=0.3)
            nn.init.normal_(model.head.bias, std=0.3)
    return model.eval()


def frames(t: int, size=SIZE, n: int = 1, seed: int = 1) -> torch.Tensor:
    """(n, t, 2, H, W, D): one static moving image and t fixed frames."""
    generator = torch.Generator().manual_seed(seed)
    moving = torch.rand((n, 1, 1) + tuple(size), generator=generator).expand(n, t, 1, *size)
    fixed = torch.rand((n, t, 1) + tuple(size), generator=generator)
    return torch.cat([moving, fixed], dim=2)


@pytest.mark.parametrize("size", [SIZE, ODD])
def test_causal(size):
    """Frame t's output depends on frames 0..t only, and on the earlier ones through the state."""
    model = make_model(randomise=True)
    images = frames(4, size)
    with torch.no_grad():
        base, state = model.forward_sequence(images)
        later = images.clone()
        later[:, 3, 1] = torch.rand(later[:, 3, 1].shape)  # change the last fixed frame
        changed_later, _ = model.forward_sequence(later)
        earlier = images.clone()
        earlier[:, 0, 1] = torch.rand(earlier[:, 0, 1].shape)  # change the first fixed frame
        changed_earlier, _ = model.forward_sequence(earlier)
    assert base["ddf"].shape == (1, 4, 3) + size
    assert state[0].shape == (1, 4) + tuple((s + 1) // 2 for s in size) and state[1].shape == (1, 3) + size
    assert torch.equal(changed_later["ddf"][:, :3], base["ddf"][:, :3])
    assert not torch.equal(changed_later["ddf"][:, 3], base["ddf"][:, 3])
    for t in range(1, 4):  # every later frame remembers frame 0
        assert (changed_earlier["ddf"][:, t] - base["ddf"][:, t]).abs().max() > 1e-4


@pytest.mark.parametrize("size", [SIZE, ODD])
def test_streaming_equals_batch(size):
    model = make_model(randomise=True)
    images = frames(3, size, n=2)
    with torch.no_grad():
        batch, final = model.forward_sequence(images)
        state = None
        for t in range(3):
            output, state = model.step(images[:, t], state)
            torch.testing.assert_close(output["ddf"], batch["ddf"][:, t], atol=1e-6, rtol=0)
            torch.testing.assert_close(output["velocity"], batch["velocity"][:, t], atol=1e-6, rtol=0)
    for mine, theirs in zip(state, final):
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=0)


def test_initialisation_is_the_static_network():
    """Head zero: frame 0 is the static network (warm start); frame 1 keeps sigmoid(gate_bias) of frame 0."""
    model = make_model(gate_bias=-4.0)
    torch.manual_seed(2)
    images = torch.rand((1, 2, 2) + ODD) * torch.tensor([1.0, 10.0]).view(1, 2, 1, 1, 1, 1)  # velocities apart
    with torch.no_grad():
        out, _ = model.forward_sequence(images)
        static = [model.static.forward_train(images[:, t]) for t in range(2)]
        single = model(images[:, 0])
    assert static[0]["velocity"].abs().max() > 0.05  # a field worth comparing
    torch.testing.assert_close(out["ddf"][:, 0], static[0]["ddf"], atol=1e-6, rtol=0)
    torch.testing.assert_close(single, model.static(images[:, 0]), atol=1e-6, rtol=0)
    v0, v1 = static[0]["velocity"], static[1]["velocity"]
    expected = v1 + torch.sigmoid(torch.tensor(-4.0)) * (v0 - v1)
    torch.testing.assert_close(out["velocity"][:, 1], expected, atol=1e-6, rtol=0)
    assert (out["velocity"][:, 1] - v1).abs().max() > 1e-4  # a small blend, not zero


def test_freeze_static():
    model = make_model()
    model.train()
    assert model.training and model.cell.training and not model.static.training
    out, _ = model.forward_sequence(frames(3))
    out["ddf"].square().mean().backward()
    assert all(p.grad is None and not p.requires_grad for p in model.static.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.head.parameters())
    # the cell gets gradients, zero at initialisation (the head's weights are zero), not once the head is trained
    assert all(p.grad is not None for p in model.cell.parameters())
    trained = make_model(randomise=True).train()
    out, _ = trained.forward_sequence(frames(3))
    out["ddf"].square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained.cell.parameters())
    assert all(p.grad is None for p in trained.static.parameters())

    unfrozen = make_model(freeze_static=False).train()
    assert unfrozen.static.training
    out, _ = unfrozen.forward_sequence(frames(2))
    out["ddf"].square().mean().backward()
    assert unfrozen.static.flow.weight.grad is not None and unfrozen.static.flow.weight.grad.abs().sum() > 0


def test_burn_in_continues_the_sequence():
    model = make_model(randomise=True)
    images = frames(4)
    k = 3
    state = model.burn_in(images[:, :k])
    assert all(not s.requires_grad for s in state)
    output, _ = model.step(images[:, k], state)  # with gradients, as a training window
    assert output["ddf"].requires_grad
    with torch.no_grad():
        full, _ = model.forward_sequence(images[:, : k + 1])
    torch.testing.assert_close(output["ddf"].detach(), full["ddf"][:, k], atol=1e-6, rtol=0)
    with torch.no_grad():  # without the burnt-in state, or without either part of it, the frame differs
        fresh, _ = model.step(images[:, k])
        no_hidden, _ = model.step(images[:, k], (torch.zeros_like(state[0]), state[1]))
        no_velocity, _ = model.step(images[:, k], (state[0], model.static.forward_train(images[:, k])["velocity"]))
    for other in (fresh, no_hidden, no_velocity):
        assert (other["ddf"] - full["ddf"][:, k]).abs().max() > 1e-4
