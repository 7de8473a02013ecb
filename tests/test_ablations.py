"""configs/ablations/*.json and configs/train_paper_lstm.json: override files on top of configs/train.json.

* In-process: ``monai.bundle.ConfigParser`` merges train.json with each override; the network it builds
  lacks exactly the modules the ablation removes (the full config has them all).
* End to end: each ablation trains one epoch on small phantom data through ``python -m monai.bundle``
  (ANTs rigid + ROI preprocessing, a tiny network), and its checkpoint holds no weights of the removed modules.
* The paper-sized LSTM config builds (on the meta device: no 1.5 GB allocated) a refiner with exactly the
  parameter count worked out by hand in docs/model.md, and its metadata fixes the grid to 128 x 128 x 120.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SMALL_NET
from monai.bundle import ConfigParser
from torch import nn

from scripts.networks.blocks import DCA, MSFA, CrossModalGate, FuseConv, PaperLSTMRefiner
from scripts.networks.task_mask import TaskMaskNet

ABLATIONS = {  # config name -> module types its network must not contain
    "cmca": (MSFA, DCA),
    "no_lstm": (nn.LSTM,),
    "no_task_mask": (TaskMaskNet,),
    "plain_unet": (MSFA, DCA, CrossModalGate, nn.LSTM, TaskMaskNet),
}
MODULES = (MSFA, DCA, CrossModalGate, nn.LSTM, TaskMaskNet)
# checkpoint key fragments of the network's module types (state_dict names in scripts/networks/registration.py and
# scripts/networks/blocks.py); the task-mask subnet is a component of its own, checkpointed as "task_mask"
KEYS = {MSFA: ".msfa.", DCA: ".dca.", CrossModalGate: ".gates.", nn.LSTM: "refiner.lstm."}


def parser_for(*overrides, meta=None):
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / "train.json"), *(str(ROOT / "configs" / f) for f in overrides)])
    if meta:
        parser.read_meta([str(ROOT / "configs" / m) for m in meta])
    parser["bundle_root"] = str(ROOT)
    return parser


def types_in(parser):
    """Module types of the config's network and task-mask component (None when disabled)."""
    modules = list(parser.get_parsed_content("network_def").modules())
    task_mask = parser.get_parsed_content("task_mask")
    modules += [] if task_mask is None else list(task_mask.modules())
    return {t for t in MODULES if any(isinstance(m, t) for m in modules)}


def test_full_config_has_every_module():
    assert types_in(parser_for()) == set(MODULES)


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_ablation_network_lacks_the_removed_modules(name):
    overrides = json.loads((ROOT / "configs" / "ablations" / f"{name}.json").read_text())
    # an override, not a copy: network switches, and the task-mask component disabled
    assert overrides and all(k.startswith("network_def#") or k == "task_mask#_disabled_" for k in overrides)
    parser = parser_for(f"ablations/{name}.json")
    network = parser.get_parsed_content("network_def")
    assert types_in(parser) == set(MODULES) - set(ABLATIONS[name])
    assert any(isinstance(m, FuseConv) for m in network.modules())  # the dual-encoder U-Net itself stays
    if TaskMaskNet in ABLATIONS[name]:  # fixed weights: no subnet, no mask optimiser
        assert parser.get_parsed_content("task_mask") is None and parser.get_parsed_content("mask_optimizer") is None


def test_paper_lstm_config_exact_sizes_on_meta_device():
    parser = parser_for("train_paper_lstm.json", meta=("metadata.json", "metadata_paper_lstm.json"))
    assert parser.get_parsed_content("spatial_size") == [128, 128, 120]
    with torch.device("meta"):  # parameters without storage
        network = parser.get_parsed_content("network_def")
    assert isinstance(network.refiner, PaperLSTMRefiner)
    # by hand: LSTM layer 1 4*128*(589,824+128) + 2*4*128, layer 2 4*128*(128+128) + 2*4*128, FC 128*589,824 + 589,824
    assert sum(p.numel() for p in network.refiner.parameters()) == 378_275_840
    formats = parser["_meta_#network_data_format"]
    assert formats["inputs"]["image"]["spatial_shape"] == [128, 128, 120]
    assert formats["outputs"]["pred"]["spatial_shape"] == [128, 128, 120]
    assert formats["inputs"]["image"]["num_channels"] == 2  # the rest of metadata.json is kept


# ---------------------------------------------------------------- one epoch each, through the bundle runner


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """Small phantom data shared by the runs: 3 training, 1 validation, 1 hold-out case."""
    from scripts.phantom.synth import synth

    root = tmp_path_factory.mktemp("ablations") / "data"
    synth(str(root), cases=5, seed=0, size="small", preview=False)
    return root


@pytest.mark.full
@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_ablation_trains_one_epoch(name, phantom, tmp_path):
    configs = f"['configs/train.json','configs/ablations/{name}.json']"
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", configs]
    command += ["--dataset_dir", str(phantom), "--run_dir", str(tmp_path / "run"), "--max_epochs", "1"]
    command += ["--spatial_size", "[24,24,24]", "--progress_bar", "False", *SMALL_NET]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]

    last = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)
    n_train = len(list((phantom / "train" / "mr_images").iterdir()))
    assert last["trainer"]["iteration"] == n_train  # one epoch, batch size 1
    keys = list(last["model"])
    for module in KEYS:
        present = any(KEYS[module] in k for k in keys)
        assert present == (module not in ABLATIONS[name]), (module.__name__, present)
    assert ("task_mask" in last) == ("mask_optimizer" in last) == (TaskMaskNet not in ABLATIONS[name])
    assert all(torch.isfinite(v).all() for v in last["model"].values())
