"""configs/multi_gpu_train.json: stock DDP training under torchrun, on the CPU with gloo.

* End to end: ``torchrun --nproc_per_node 2`` runs the bundle on the tiny sphere data set of
  ``conftest.make_dataset``; both ranks must end with identical weights (every parameter of the network and
  of the task-mask subnet), and only rank 0 may write the run folder (one checkpoint of each kind, one TensorBoard
  event file, epoch logs on rank 0's console only).
* Gradients: two gloo processes give one training iteration different data, the network and the task-mask
  subnet each in a stock ``DistributedDataParallel``; after it, each rank's gradients must equal the mean of
  the gradients that plain (non-DDP) copies compute for the two batches, for the network (first backward)
  and for the task-mask subnet (its own, second backward).
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import NO_RIGID, ROOT, SMALL_NET, make_dataset
from torch.nn.parallel import DistributedDataParallel

from scripts.networks.registration import RegistrationNet
from scripts.networks.task_mask import TaskMaskNet
from scripts.training.iteration import RegistrationIteration
from scripts.training.losses import RegistrationLoss

pytestmark = pytest.mark.full  # DDP processes: torchrun and mp.spawn

TINY_NET = dict(
    encoder_channels=(4, 8, 8, 8), decoder_channels=(8, 8, 8, 4), head_channels=(8, 4, 4),
    compact_code=(4, 4, 2), lstm_hidden=8, chunks=4,
    flow_init_std=0.01,  # larger than the default 1e-5, so that gradients reach the encoders at a testable size
)  # fmt: skip


def _torchrun(tmp_path, *extra):
    """Two CPU ranks under torchrun; per-rank stdout/stderr go to tmp_path/logs. Returns (rc, torchrun's output)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["--log-dir", str(tmp_path / "logs"), "--redirects", "3", "-m", "monai.bundle", "run", "training"]
    command += ["--spatial_size", "[24,24,24]", "--learning_rate", "0.005", "--progress_bar", "False", *SMALL_NET]
    command += list(extra)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU / gloo path, also on a machine with GPUs
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def _rank_log(tmp_path, rank):
    """stdout + stderr of one rank, as torchrun's --log-dir wrote them."""
    (folder,) = (tmp_path / "logs").glob(f"*/attempt_0/{rank}")
    return (folder / "stdout.log").read_text() + (folder / "stderr.log").read_text()


def test_torchrun_two_ranks_identical_weights_and_one_writer(tmp_path):
    make_dataset(tmp_path / "data")  # 4 training cases (2 per rank), 2 validation cases
    dump = tmp_path / "weights"
    dump.mkdir()
    # a third override file, merged like any other: after finalize, each rank saves its weights
    extra = tmp_path / "dump_weights.json"
    extra.write_text(json.dumps({"+finalize": [
        f"$torch.save(@network_def.state_dict(), '{dump}/rank' + os.environ['RANK'] + '.pt')",
        f"$torch.save(@task_mask.state_dict(), '{dump}/mask' + os.environ['RANK'] + '.pt')",
    ]}))  # fmt: skip
    configs = f"['configs/train.json','configs/multi_gpu_train.json','{extra}']"
    run = tmp_path / "run"
    rc, out = _torchrun(
        tmp_path, "--config_file", configs, "--dataset_dir", str(tmp_path / "data"), "--run_dir", str(run),
        "--max_epochs", "2", "--seed", "0", *NO_RIGID,
    )  # fmt: skip
    logs = [_rank_log(tmp_path, r) for r in (0, 1)] if (tmp_path / "logs").is_dir() else ["", ""]
    assert rc == 0, (out + logs[0] + logs[1])[-4000:]

    rank0 = torch.load(dump / "rank0.pt", weights_only=True)
    rank1 = torch.load(dump / "rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    assert any(".lstm." in k for k in rank0)
    different = [k for k in rank0 if not torch.equal(rank0[k], rank1[k])]
    assert different == []
    mask0 = torch.load(dump / "mask0.pt", weights_only=True)
    mask1 = torch.load(dump / "mask1.pt", weights_only=True)
    assert mask0.keys() == mask1.keys() and all(torch.equal(mask0[k], mask1[k]) for k in mask0)
    # the subnet was trained (its output layers start at zero) and the weights are the checkpointed ones
    assert mask0["branches.0.2.weight"].abs().sum() > 0
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["model"].keys() == rank0.keys()  # plain network keys, no "module." prefix
    assert all(torch.equal(last["model"][k], rank0[k]) for k in rank0)
    assert last["task_mask"].keys() == mask0.keys() and all(torch.equal(last["task_mask"][k], mask0[k]) for k in mask0)
    # 2 epochs of 2 iterations per rank: the sampler split the 4 training cases
    assert last["trainer"]["iteration"] == 2 * 2

    # only rank 0 wrote: one checkpoint of each kind, one event file, one run config
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "last.pt", "run_config.json", "tensorboard"]
    assert len(list((run / "tensorboard").iterdir())) == 1
    assert "saved checkpoint" in logs[0] and "train_loss" in logs[0] and "starting a new training" in logs[0]
    for text in ("saved checkpoint", "train_loss", "val_gland_dice", "Engine run", "learning rate"):
        assert text not in logs[1]


# ---------------------------------------------------------------- gradient averaging (two gloo processes)


def _batch(rank):
    """A deterministic batch per rank: two offset balls as [moving, fixed] images and their labels."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(16.0)] * 3, indexing="ij"))
    centre = torch.tensor([7.5, 7.5, 7.5])[:, None, None, None]
    shift = torch.tensor([1.5 + rank, -1.0, 0.5 * rank])[:, None, None, None]
    moving = ((grid - centre).norm(dim=0) < 5).float()
    fixed = ((grid - centre - shift).norm(dim=0) < 5).float()
    image = torch.stack([0.2 + 0.6 * moving, 0.7 - 0.4 * fixed])[None]
    return {"image": image, "moving_label": moving[None, None], "fixed_label": fixed[None, None]}


def _iterate(batch, wrap=None):
    """One real RegistrationIteration of a seeded network and task mask, each wrapped by ``wrap`` (e.g. DDP) if
    given (SGD with lr 0: parameters stay, gradients remain); grads by name, the subnet's as "task_mask.*"."""
    torch.manual_seed(0)
    network = RegistrationNet(**TINY_NET)
    task_mask = TaskMaskNet(network.flow.in_channels, TINY_NET["chunks"], hidden=8)
    engine = SimpleNamespace(
        state=SimpleNamespace(device=torch.device("cpu")), non_blocking=False,
        network=network if wrap is None else wrap(network),
        optimizer=torch.optim.SGD(network.parameters(), lr=0.0), fire_event=lambda event: None,
    )  # fmt: skip
    RegistrationIteration(
        RegistrationLoss(chunks=TINY_NET["chunks"]),
        task_mask=task_mask if wrap is None else wrap(task_mask),
        mask_optimizer=torch.optim.SGD(task_mask.parameters(), lr=0.0),
    )(engine, batch)
    named = [*network.named_parameters(), *task_mask.named_parameters(prefix="task_mask")]
    return {name: p.grad.clone() for name, p in named}


def _grad_worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.save(_iterate(_batch(rank), DistributedDataParallel), Path(out_dir) / f"ddp{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_are_the_mean_over_ranks(tmp_path):
    mp.spawn(_grad_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    # independent reference: the plain network, one batch at a time, in this process
    local = []
    for rank in (0, 1):
        local.append(_iterate(_batch(rank)))
    expected = {k: (local[0][k] + local[1][k]) / 2 for k in local[0]}
    for rank in (0, 1):
        grads = torch.load(tmp_path / f"ddp{rank}.pt", weights_only=True)
        assert grads.keys() == expected.keys()
        for name in expected:
            scale = expected[name].abs().max().item()  # all-zero gradients (LSTM, output layer still 0) stay 0
            torch.testing.assert_close(grads[name], expected[name], rtol=1e-4, atol=1e-5 * scale, msg=name)
    # the two batches give different gradients, so the check above is not trivially true
    for name in ("encoder_moving.0.conv.weight", "flow.weight", "task_mask.branches.0.2.weight"):
        assert not torch.allclose(local[0][name], local[1][name], rtol=1e-3, atol=0)
