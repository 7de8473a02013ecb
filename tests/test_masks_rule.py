"""One rule for a pair without gland masks, at every entry point (docs/pipeline.md, "Masks").

The inference config declares the segmenter (``use_seg``) and the network takes gland-masked images (``roi_mask``),
but the segmenter's weights file is missing: the bundle run, the CLI, the MONAI Deploy app and the MONAI Label task
all stop with the same error, naming the weights file and what to pass instead, and write no outputs.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SMALL, write_case

from scripts.networks.registration import RegistrationNet

pytestmark = pytest.mark.full  # the bundle runner, the CLI, Deploy and MONAI Label in processes

ROOT = Path(__file__).resolve().parents[1]
GRID = [16, 16, 16]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A pair, random registration weights, and an inference override with a missing segmenter weights file."""
    root = tmp_path_factory.mktemp("masks_rule")
    case = write_case(root / "data", "train", "case000000", mr_shape=(20, 22, 18), us_shape=(18, 20, 16))
    model = root / "model"
    model.mkdir()
    torch.manual_seed(0)
    torch.save(RegistrationNet(**SMALL, spatial_size=tuple(GRID)).state_dict(), model / "model.pt")
    missing = root / "no_seg_weights.pt"
    overrides = {f"network_def#{k}": v for k, v in SMALL.items()}
    overrides.update(
        spatial_size=GRID,
        use_rigid=False,
        use_seg=True,
        roi_mask=True,
        seg_checkpoint=str(missing),
        checkpoint=str(model / "model.pt"),
        device="cpu",
    )
    (model / "inference_overrides.json").write_text(json.dumps(overrides))
    expected = f"{missing}: no gland segmenter weights"
    return {
        "root": root,
        "case": case,
        "model": model,
        "overrides": model / "inference_overrides.json",
        "expected": expected,
    }


def _refused(done, expected, out: Path):
    text = done.stdout + done.stderr
    assert done.returncode != 0, text[-3000:]
    assert expected in text and "pass moving_mask and fixed_mask" in text, text[-3000:]
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())  # nothing written


def _run(cmd, **kw):
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600, **kw)


def test_bundle_run_refuses(setup):
    out = setup["root"] / "bundle_out"
    configs = f"['configs/inference.json','{setup['overrides']}']"
    case = setup["case"]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, "--output_dir", out]
    done = _run(cmd + ["--moving", case["mr_image"], "--fixed", case["us_image"]])
    _refused(done, setup["expected"], out)


def test_cli_refuses(setup):
    out = setup["root"] / "cli_out"
    configs = f"['configs/inference.json','{setup['overrides']}']"
    case = setup["case"]
    cmd = [sys.executable, "-m", "scripts", "register", "--moving", case["mr_image"], "--fixed", case["us_image"]]
    done = _run(cmd + ["--out", out, "--config-file", configs, "--pictures", "false"])
    _refused(done, setup["expected"], out)
    assert done.returncode == 2 and "Traceback" not in done.stderr  # a user error: one line


def test_deploy_app_refuses(setup):
    python = ROOT / ".venv-deploy" / "bin" / "python"
    setup_env = subprocess.run(["bash", str(ROOT / "apps/deploy/setup_env.sh")], capture_output=True, text=True)
    assert setup_env.returncode == 0, setup_env.stderr[-3000:]
    inputs, out = setup["root"] / "deploy_in", setup["root"] / "deploy_out"
    inputs.mkdir()
    for name, key in (("moving", "mr_image"), ("fixed", "us_image")):
        (inputs / f"{name}.nii.gz").symlink_to(setup["case"][key])
    done = _run([python, ROOT / "apps/deploy/app.py", "-i", inputs, "-o", out, "-m", setup["model"]])
    _refused(done, setup["expected"], out)


MONAILABEL_TASK = """
import json, sys
sys.path.insert(0, sys.argv[1])
from fastapi import HTTPException
from lib.registration import MRLabelsOnTRUS
task = MRLabelsOnTRUS(sys.argv[2], config_files=[sys.argv[3], sys.argv[4]])
try:
    task({"image": sys.argv[5]})
    print(json.dumps({"status": None}))
except HTTPException as err:
    print(json.dumps({"status": err.status_code, "detail": err.detail}))
"""


def test_monailabel_task_refuses(setup, tmp_path):
    python = ROOT / ".venv-monailabel" / "bin" / "python"
    setup_env = subprocess.run(["bash", str(ROOT / "apps/monailabel/setup_env.sh")], capture_output=True, text=True)
    assert setup_env.returncode == 0, setup_env.stderr[-3000:]
    store = tmp_path / "datastore"
    for sub, key in (("mr_images", "mr_image"), ("mr_labels", "mr_label")):
        (store / sub).mkdir(parents=True)
        (store / sub / "case.nii.gz").symlink_to(setup["case"][key])
    (store / "case.nii.gz").symlink_to(setup["case"]["us_image"])
    args = [ROOT / "apps/monailabel", store, ROOT / "configs/inference.json", setup["overrides"], store / "case.nii.gz"]
    done = _run([python, "-c", MONAILABEL_TASK, *args])
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["status"] == 400 and setup["expected"] in answer["detail"]
    assert "pass moving_mask and fixed_mask" in answer["detail"]
