"""A training killed with SIGKILL in the middle of an epoch and restarted with the same command ends with
exactly the weights of an uninterrupted run (CPU, ``num_workers=0``, same seed).

The training is ``configs/train.json`` with a tiny network on the sphere data of ``conftest.make_dataset``
(4 training cases, 4 epochs). Iteration logging is switched on so the test can see the second epoch
start: it kills the process after the first iteration of epoch 2, when ``last.pt`` holds epoch 1.
"""

import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import NO_RIGID, ROOT, SMALL_NET, load, make_dataset, tensors

pytestmark = pytest.mark.full  # trainings through the bundle runner

EPOCHS, CASES = 4, 4
MARK = f"Epoch: 2/{EPOCHS}, Iter: 1/{CASES}"  # StatsHandler's line after the first iteration of epoch 2


def command(data, run_dir):
    return [
        sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.json",
        "--dataset_dir", str(data), "--run_dir", str(run_dir), "--spatial_size", "[24,24,24]",
        "--learning_rate", "0.005", "--progress_bar", "False", "--max_epochs", str(EPOCHS), "--seed", "0",
        *SMALL_NET, *NO_RIGID,
        "--train#handlers#4#iteration_log", "true", "--train#handlers#4#output_transform", "$lambda out: out['loss']",
    ]  # fmt: skip


ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run(data, run_dir):
    proc = subprocess.run(command(data, run_dir), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout + proc.stderr


def run_and_kill(data, run_dir):
    """Start the training, SIGKILL it as soon as the first iteration of epoch 2 is logged; return the log."""
    proc = subprocess.Popen(
        command(data, run_dir), cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if MARK in line:
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.stdout.close()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(lines)[-3000:]
    return "".join(lines)


def test_sigkill_mid_epoch_then_same_command_matches_an_uninterrupted_run(tmp_path):
    make_dataset(tmp_path / "data", counts=(("train", CASES), ("val", 1)))
    reference = tmp_path / "reference"
    run(tmp_path / "data", reference)

    killed = tmp_path / "killed"
    log = run_and_kill(tmp_path / "data", killed)
    assert "saved checkpoint" in log and MARK in log
    # killed inside epoch 2: the checkpoint on disk is the complete epoch-1 one, and no temporary file is left
    assert load(killed / "last.pt")["trainer"]["iteration"] == CASES
    assert sorted(p.name for p in killed.iterdir()) == ["best.pt", "last.pt", "run_config.json", "tensorboard"]

    log = run(tmp_path / "data", killed)  # the very same command
    assert f"resuming from {killed / 'last.pt'} at epoch 1" in log

    final, expected = load(killed / "last.pt"), load(reference / "last.pt")
    assert final["trainer"]["iteration"] == expected["trainer"]["iteration"] == EPOCHS * CASES
    assert final["lr_scheduler"] == expected["lr_scheduler"]  # plain numbers only
    for part in ("model", "optimizer", "mask_optimizer", "rng"):
        got, want = tensors(final[part]), tensors(expected[part])
        assert sorted(got) == sorted(want) and got, part
        different = [k for k in want if not torch.equal(got[k], want[k])]
        assert not different, f"{part}: {different[:5]}"
    assert final["optimizer"]["state"][0]["step"] == EPOCHS * CASES  # Adam stepped once per iteration, no repeats
