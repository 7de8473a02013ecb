"""MONAI VoxelMorph / LocalNet behind the registration interface (scripts/networks/baselines.py, configs/baselines/).

* The adapter keeps the network grid (padding an odd grid internally), returns VoxelMorph's field as the
  integral of its velocity, and LocalNet's directly.
* The config files: train.json + a baseline builds that network with no task-mask optimiser and a 10-chunk
  loss; inference.json + the same file builds a network with the same weights layout (so a trained
  checkpoint loads); the native-loss files change only the loss.
* End to end: LocalNet with its native (weakly supervised) loss trains one epoch through the bundle runner,
  and the pipeline registers a phantom pair with it (numerical inverse), VoxelMorph with the exact one.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, register_pair
from monai.bundle import ConfigParser

from scripts.inference.registrar import OUTPUTS
from scripts.networks.baselines import BaselineNet
from scripts.weights.trained_model import load_weights

GRID = (20, 24, 18)  # not a multiple of the networks' pooling


@pytest.mark.parametrize("kind", ["voxelmorph", "localnet"])
def test_adapter_keeps_the_grid(kind):
    torch.manual_seed(0)
    net = BaselineNet(
        kind, channels=(4, 8, 8, 8, 8, 8), unet_out_channels=4, final_conv_channels=(4, 4), num_channel_initial=4
    )
    image = torch.rand(1, 2, *GRID)
    out = net.forward_train(image)
    assert out["ddf"].shape == (1, 3, *GRID) and out["features"] is None
    torch.testing.assert_close(net(image), out["ddf"])
    torch.testing.assert_close(net(image, train=True)["ddf"], out["ddf"])  # the training dict (network contract)
    if kind == "voxelmorph":  # the field is exp(v): integrating the returned velocity gives it back
        assert out["velocity"].shape == (1, 3, *GRID)
        torch.testing.assert_close(net.integrate(out["velocity"]), out["ddf"])
    else:
        assert out["velocity"] is None and net.integrate is None


def _parser(*files):
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / f) for f in files])
    parser["bundle_root"] = str(ROOT)
    parser["spatial_size"] = [24, 24, 20]
    return parser


@pytest.mark.parametrize("kind", ["voxelmorph", "localnet"])
def test_config_files_train_and_infer_the_same_network(kind):
    train = _parser("train.json", f"baselines/{kind}.json", "baselines/training.json")
    net = train.get_parsed_content("network_def")
    assert isinstance(net, BaselineNet) and net.kind == kind
    assert train.get_parsed_content("task_mask") is None and train.get_parsed_content("mask_optimizer") is None
    assert train.get_parsed_content("loss").chunks == 10
    infer = _parser("inference.json", f"baselines/{kind}.json").get_parsed_content("network_def")
    assert {k: v.shape for k, v in infer.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}


def test_native_loss_files_change_only_the_loss():
    for name, expected in (
        ("loss_unsupervised", {"dice_weight": 0.0, "mi_region": "image"}),
        ("loss_weakly_supervised", {"mi_weight": 0.0, "regulariser": "bending"}),
    ):
        overrides = json.loads((ROOT / "configs" / "baselines" / f"{name}.json").read_text())
        assert all(k.startswith("loss#") for k in overrides)
        loss = _parser(
            "train.json", "baselines/localnet.json", "baselines/training.json", f"baselines/{name}.json"
        ).get_parsed_content("loss")
        assert {k: getattr(loss, k) for k in expected} == expected


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from scripts.phantom.synth import synth

    root = tmp_path_factory.mktemp("baselines") / "data"
    synth(str(root), cases=3, seed=1, size="small", preview=False)
    return root


@pytest.mark.full
def test_localnet_native_trains_and_registers(phantom, tmp_path):
    configs = (
        "['configs/train.json','configs/baselines/localnet.json','configs/baselines/training.json',"
        "'configs/baselines/loss_weakly_supervised.json']"
    )
    small = ["--network_def#num_channel_initial", "4"]
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        configs,
        "--dataset_dir",
        str(phantom),
        "--run_dir",
        str(tmp_path / "run"),
        "--max_epochs",
        "1",
        "--spatial_size",
        "[24,24,20]",
        "--progress_bar",
        "False",
        *small,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    last = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)
    assert "mask_optimizer" not in last and "task_mask" not in last and all(k.startswith("net.") for k in last["model"])

    case = sorted((phantom / "holdout" / "mr_images").iterdir())[0].name
    pair = {k: phantom / "holdout" / f"{k}s" / case for k in ("mr_image", "us_image", "mr_label")}
    nets = {
        "localnet": BaselineNet("localnet", num_channel_initial=4),
        "voxelmorph": BaselineNet(
            "voxelmorph", channels=(4, 8, 8, 8, 8, 8), unet_out_channels=4, final_conv_channels=(4, 4)
        ),
    }
    load_weights(nets["localnet"], tmp_path / "run" / "best.pt", required=True)
    expected = {"localnet": "numerical (ITK fixed point)", "voxelmorph": "integrated -velocity"}
    for kind, net in nets.items():
        out = tmp_path / kind
        result = register_pair(
            pair["mr_image"],
            pair["us_image"],
            out,
            pair["mr_label"],
            network=net.eval(),
            spatial_size=(24, 24, 20),
            depth_crop=0,
            rigid=np.eye(4),
        )
        assert result["inverse"] == expected[kind] and result["deformable"] == "network"
        assert all((out / OUTPUTS[k]).is_file() for k in ("warped_label", "forward_field", "inverse_field"))
