"""The same seed and config give identical results on CPU: a tiny training (``configs/train.json``, num_workers=0)
run twice ends with bit-identical checkpoints, and the registration pipeline (ANTs rigid + a network) run twice
writes identical arrays."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import NO_RIGID, ROOT, load, make_dataset, run_bundle, tensors

from scripts.inference.registrar import OUTPUTS

pytestmark = pytest.mark.full  # trainings through the bundle runner, the pipeline in a process


def test_two_trainings_with_the_same_seed_give_identical_checkpoints(tmp_path):
    make_dataset(tmp_path / "data", counts=(("train", 2), ("val", 1)))
    checkpoints = []
    for name in ("first", "second"):
        rc, log = run_bundle(
            "training", tmp_path / "data", tmp_path / name, "--max_epochs", "2", "--seed", "3", *NO_RIGID
        )
        assert rc == 0, log[-3000:]
        checkpoints.append(load(tmp_path / name / "last.pt"))
    first, second = checkpoints
    assert first["trainer"]["iteration"] == second["trainer"]["iteration"] == 4
    for part in ("model", "optimizer", "mask_optimizer", "rng"):
        a, b = tensors(first[part]), tensors(second[part])
        assert sorted(a) == sorted(b) and a
        assert all(torch.equal(a[k], b[k]) for k in a), part
    # a different seed changes the result: the comparison above can fail
    rc, log = run_bundle(
        "training", tmp_path / "data", tmp_path / "other", "--max_epochs", "2", "--seed", "4", *NO_RIGID
    )
    assert rc == 0, log[-3000:]
    other = tensors(load(tmp_path / "other" / "last.pt")["model"])
    assert any(not torch.equal(other[k], tensors(first["model"])[k]) for k in other)


# registers the holdout case of a data folder twice (ANTs rigid on the images + a seeded tiny network)
PIPELINE_TWICE = """
import sys, torch
from pathlib import Path
sys.path.insert(0, "tests")
from conftest import SMALL
from scripts.networks.registration import RegistrationNet
from conftest import register_pair
d, out = Path(sys.argv[1]) / "holdout", Path(sys.argv[2])
for name in ("first", "second"):
    torch.manual_seed(0)
    network = RegistrationNet(**SMALL, spatial_size=(16, 16, 16)).eval()
    register_pair(d / "mr_images/case000000.nii.gz", d / "us_images/case000000.nii.gz", out / name,
                  d / "mr_labels/case000000.nii.gz", network=network, spatial_size=(16, 16, 16), depth_crop=0)
"""


def test_two_pipeline_runs_write_identical_outputs(tmp_path):
    """Determinism of the rigid step needs single-threaded ANTs (docs/reliability.md): the documented setting."""
    make_dataset(tmp_path / "data", counts=(("holdout", 1),))
    env = {**os.environ, "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", PIPELINE_TWICE, str(tmp_path / "data"), str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = (json.loads((tmp_path / name / "result.json").read_text()) for name in ("first", "second"))
    assert first["rigid"]["method"] == "mutual_information" and first["deformable"] == "network"
    assert first["rigid"] == second["rigid"]
    assert not np.allclose(first["rigid"]["matrix_lps_fixed_to_moving"], np.eye(4), atol=0.5)  # the rigid did work
    for key in ("warped_image", "warped_label", "forward_field", "inverse_field", "ants_warp"):
        a, b = (np.asarray(nib.load(tmp_path / name / OUTPUTS[key]).dataobj) for name in ("first", "second"))
        assert np.array_equal(a, b), key
    assert {k: v for k, v in first.items() if k not in ("masks", "seconds")} == {
        k: v for k, v in second.items() if k not in ("masks", "seconds")
    }
