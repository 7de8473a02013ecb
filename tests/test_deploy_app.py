"""The MONAI Deploy app (apps/deploy) writes the same files as the bundle's own inference on the same pair.

The app runs in its own environment ``.venv-deploy`` (created here by ``apps/deploy/setup_env.sh`` when
absent: a few minutes once, seconds afterwards); the bundle runs with this interpreter through
``python -m monai.bundle run``. Both get the same config override file and the same random-weight checkpoint.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import SMALL, write_case

from scripts.inference.registrar import OUTPUTS
from scripts.networks.registration import RegistrationNet

pytestmark = pytest.mark.full  # the Deploy app in its own environment

ROOT = Path(__file__).resolve().parents[1]
DEPLOY_PYTHON = ROOT / ".venv-deploy" / "bin" / "python"
GRID = [16, 16, 16]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


@pytest.fixture(scope="module")
def deploy_env():
    """Create or update .venv-deploy (idempotent), printing what the helper script does."""
    done = subprocess.run(
        ["bash", str(ROOT / "apps" / "deploy" / "setup_env.sh")], capture_output=True, text=True, timeout=1800
    )
    print(done.stdout)
    assert done.returncode == 0, done.stderr[-3000:]
    return DEPLOY_PYTHON


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A synthetic pair in the app's input layout, a random-weight checkpoint and the override config beside it."""
    root = tmp_path_factory.mktemp("deploy")
    case = write_case(root / "data", "train", "case000000", channels=2, mr_shape=(20, 22, 18), us_shape=(18, 20, 16))
    inputs = root / "input"
    inputs.mkdir()
    for name, key in (("moving", "mr_image"), ("fixed", "us_image"), ("moving_labels", "mr_label")):
        (inputs / f"{name}.nii.gz").symlink_to(case[key])
    model = root / "model"
    model.mkdir()
    torch.manual_seed(0)
    # a large flow initialisation: random weights that deform visibly, so equal outputs mean something
    net = RegistrationNet(**SMALL, spatial_size=tuple(GRID), flow_init_std=1.0)
    torch.save(net.state_dict(), model / "model.pt")
    overrides = {f"network_def#{k}": v for k, v in SMALL.items()}
    overrides.update(
        {
            "spatial_size": GRID,
            "use_rigid": False,
            "roi_mask": False,
            "use_seg": False,
            "seg_checkpoint": str(root / "no_seg_weights.pt"),
            "device": "$torch.device('cpu')",
        }
    )
    (model / "inference_overrides.json").write_text(json.dumps(overrides))
    return {"root": root, "inputs": inputs, "model": model}


def _run(cmd, what):
    done = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{what} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


def _load(path):
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


def test_app_matches_bundle_inference(deploy_env, pair):
    app_out, bundle_out = pair["root"] / "app_out", pair["root"] / "bundle_out"
    inputs, model = pair["inputs"], pair["model"]
    _run([deploy_env, ROOT / "apps" / "deploy" / "app.py", "-i", inputs, "-o", app_out, "-m", model], "the app")
    configs = f"['configs/inference.json','{model / 'inference_overrides.json'}']"
    _run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            configs,
            "--checkpoint",
            model / "model.pt",
            "--moving",
            inputs / "moving.nii.gz",
            "--fixed",
            inputs / "fixed.nii.gz",
            "--moving_label",
            inputs / "moving_labels.nii.gz",
            "--output_dir",
            bundle_out,
        ],
        "bundle inference",
    )

    names = sorted(p.name for p in app_out.iterdir())
    assert names == sorted(OUTPUTS.values()) == sorted(p.name for p in bundle_out.iterdir())
    app_result = json.loads((app_out / "result.json").read_text())
    assert app_result["deformable"] == "network" and app_result["network_box"]["shape"] == GRID
    bundle_result = json.loads((bundle_out / "result.json").read_text())
    assert app_result.pop("seconds").keys() == bundle_result.pop("seconds").keys()  # times differ, stages do not
    assert app_result == bundle_result

    field, _ = _load(app_out / OUTPUTS["forward_field"])
    print(f"largest displacement {np.abs(field).max():.3f} mm")
    assert np.abs(field).max() > 0.1  # mm, 10^4 x the tolerance: the network deforms, the comparison is not of zeros
    worst = {}
    for key in ("warped_image", "warped_label", "forward_field", "inverse_field", "ants_warp", "ants_inverse_warp"):
        (a, a_affine), (b, b_affine) = _load(app_out / OUTPUTS[key]), _load(bundle_out / OUTPUTS[key])
        assert a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a_affine, b_affine), key
        worst[key] = float(np.abs(a.astype(np.float64) - b).max())
    print("max |app - bundle|:", worst)
    assert worst["warped_label"] == 0.0
    assert max(worst.values()) <= 1e-5, worst
    for key in ("ants_rigid", "ants_rigid_inverse"):
        assert (app_out / OUTPUTS[key]).read_bytes() == (bundle_out / OUTPUTS[key]).read_bytes()


def test_app_reports_a_missing_input(deploy_env, tmp_path):
    (tmp_path / "input").mkdir()
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), str(tmp_path / "input" / "moving.nii.gz"))
    done = subprocess.run(
        [
            str(deploy_env),
            str(ROOT / "apps" / "deploy" / "app.py"),
            "-i",
            str(tmp_path / "input"),
            "-o",
            str(tmp_path / "out"),
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode != 0
    assert f"{tmp_path / 'input' / 'fixed.nii.gz'}: required input is missing" in done.stdout + done.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_app_checks_the_weights_against_the_manifest_of_its_model_folder(deploy_env, pair, tmp_path):
    """The MAP layout of docs/deploy.md (``<model>/models/model.pt`` beside ``<model>/large_files.yml``): weights
    that differ from the manifest are refused before they are read, and nothing is written."""
    from scripts.weights.manifest import write_manifest

    model = tmp_path / "model"
    (model / "models").mkdir(parents=True)
    for name in ("model.pt", "inference_overrides.json"):
        (model / "models" / name).write_bytes((pair["model"] / name).read_bytes())
    write_manifest(model)
    state = torch.load(model / "models" / "model.pt", weights_only=True)
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = state[first] + 1.0  # replaced weights: still loadable, of the right architecture
    torch.save(state, model / "models" / "model.pt")
    done = subprocess.run(
        [
            str(deploy_env),
            str(ROOT / "apps" / "deploy" / "app.py"),
            "-i",
            str(pair["inputs"]),
            "-o",
            str(tmp_path / "out"),
            "-m",
            str(model),
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode != 0
    assert (
        f"{model / 'models' / 'model.pt'}: sha256 differs from large_files.yml; the file is corrupt or replaced"
        in done.stdout + done.stderr
    )
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
