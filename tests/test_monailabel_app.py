"""The MONAI Label app (apps/monailabel) served by the real ``monailabel`` server on localhost.

The app's own environment (``.venv-monailabel``) is created by ``apps/monailabel/setup_env.sh`` when it is
missing or out of date (several minutes the first time). The datastore holds two phantom cases under the app's
naming rule; the registration uses the bundle's pipeline with rigid (mutual information, no gland masks) plus an
untrained registration network (near-identity field) on a 32^3 box, so no trained weights are needed. Phantom case
1 (seed 0) starts clearly misaligned, so a working registration must raise the gland Dice above the
no-registration value, which is computed here independently with nibabel (MR labels resampled onto the TRUS
grid through the two affines).
"""

import email
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from nibabel.processing import resample_from_to

from scripts.phantom.synth import synth

pytestmark = pytest.mark.full  # the MONAI Label server in its own environment

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-monailabel"
TASK = "mr_labels_on_trus"
CASE = "case000001"  # phantom seed 0, index 1: no-registration gland Dice about 0.58
SERVER_START_S = 240  # the server imports torch and MONAI and builds the network on 2 shared cores
INFER_TIMEOUT_S = 300
LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "[%(asctime)s] [%(levelname)s] (%(name)s) - %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stdout"}},
    "root": {"level": "INFO", "handlers": ["console"]},
}


def _ensure_env():
    """Create or update .venv-monailabel (a no-op when its stamp matches the requirements)."""
    start = time.time()
    subprocess.run(["bash", str(ROOT / "apps/monailabel/setup_env.sh")], check=True, cwd=ROOT)
    print(f"MONAI Label environment ready in {time.time() - start:.1f} s")
    assert (VENV / "bin" / "monailabel").is_file()


def _datastore(tmp_path) -> Path:
    """Two phantom cases laid out by the naming rule: <case>.nii.gz (TRUS), mr_images/, mr_labels/."""
    phantom = Path(synth(str(tmp_path / "phantom"), cases=2, seed=0, size="small", preview=False))
    store = tmp_path / "datastore"
    for sub in ("mr_images", "mr_labels"):
        (store / sub).mkdir(parents=True)
    for us in sorted(phantom.glob("*/us_images/*.nii.gz")):
        split = us.parent.parent
        (store / us.name).symlink_to(us)
        for sub in ("mr_images", "mr_labels"):
            (store / sub / us.name).symlink_to(split / sub / us.name)
    return store


def _override(tmp_path) -> Path:
    """An override of configs/inference.json: no gland segmenter, a 32^3 box, untrained weights written here."""
    weights = tmp_path / "untrained.pt"
    override = {
        "use_seg": False,
        "roi_mask": False,
        "seg_checkpoint": "",
        "spatial_size": [32, 32, 32],
        "checkpoint": str(weights),
        "device": "cpu",
    }
    path = tmp_path / "override.json"
    path.write_text(json.dumps(override))
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs/inference.json"), str(path)])
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), weights)
    return path


def _phantom_file(tmp_path, folder) -> Path:
    return next((tmp_path / "phantom").glob(f"*/{folder}/{CASE}.nii.gz"))


def _multipart(content_type: str, body: bytes) -> dict:
    """The named parts of a multipart/form-data answer (``output=all``: ``params`` JSON and the ``image`` file)."""
    message = email.message_from_bytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    return {
        part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
        for part in message.get_payload()
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url, data=None, timeout=10):
    with urllib.request.urlopen(
        urllib.request.Request(url, data=data, method="POST" if data is not None else "GET"), timeout=timeout
    ) as response:
        return response.read()


def _wait_for_info(url, proc, log) -> dict:
    deadline = time.time() + SERVER_START_S
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            return json.loads(_request(f"{url}/info/"))
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(2)
    raise AssertionError(f"server did not answer /info/ within {SERVER_START_S} s:\n{log.read_text()[-4000:]}")


def _stop(proc) -> None:
    """Terminate the server's process group (the one this test started), then kill it if it lingers."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


def _dice(a, b) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_monailabel_server_registers_mr_labels_onto_trus(tmp_path):
    _ensure_env()
    store, override = _datastore(tmp_path), _override(tmp_path)
    log_config = tmp_path / "logging.json"
    log_config.write_text(json.dumps(LOG_CONFIG))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        str(VENV / "bin/monailabel"),
        "start_server",
        "--app",
        str(ROOT / "apps/monailabel"),
        "--studies",
        str(store),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log_config",
        str(log_config),
        "--conf",
        "config_files",
        f"configs/inference.json,{override}",
    ]
    # bin/monailabel is a shell script running `$MONAILABEL_PYEXE -m monailabel.main` (default: `python` on PATH)
    env = {
        **os.environ,
        "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        "VIRTUAL_ENV": str(VENV),
        "MONAILABEL_PYEXE": str(VENV / "bin/python"),
        "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1",
        "OMP_NUM_THREADS": "1",
    }
    log = tmp_path / "server.log"
    start = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env=env, start_new_session=True
        )
    try:
        info = _wait_for_info(url, proc, log)
        print(f"server up in {time.time() - start:.1f} s")
        labels = info["models"][TASK]["labels"]
        assert labels == {
            "prostate": 1,
            "landmark_1": 2,
            "landmark_2": 3,
            "landmark_3": 4,
            "landmark_4": 5,
            "landmark_5": 6,
        }
        datastore = json.loads(_request(f"{url}/datastore/?output=all"))
        assert sorted(datastore["objects"]) == ["case000000", "case000001"]  # the MR files are not listed

        start = time.time()
        body = _request(f"{url}/infer/{TASK}?image={CASE}&output=image", data=b"", timeout=INFER_TIMEOUT_S)
        print(f"inference answered in {time.time() - start:.1f} s")
        # what 3D Slicer's module asks: NRRD, answered as multipart with the response JSON
        form = urllib.parse.urlencode({"params": json.dumps({"result_extension": ".nrrd"})}).encode()
        with urllib.request.urlopen(
            urllib.request.Request(f"{url}/infer/{TASK}?image={CASE}&output=all", data=form), timeout=INFER_TIMEOUT_S
        ) as response:
            parts = _multipart(response.headers["Content-Type"], response.read())
        # failures reach the client with their reason (3D Slicer shows it), not as a bare HTTP 500
        (store / "mr_images" / "case000001.nii.gz").unlink()
        for image, code, reason in (("case000009", 404, "unknown image id"), ("case000001", 400, "mr_images")):
            with pytest.raises(urllib.error.HTTPError) as err:
                _request(f"{url}/infer/{TASK}?image={image}&output=image", data=b"", timeout=INFER_TIMEOUT_S)
            assert err.value.code == code and reason in json.loads(err.value.read())["detail"], image
    except Exception:
        print(log.read_text()[-6000:])
        raise
    finally:
        _stop(proc)
    result = tmp_path / "result.nii.gz"
    result.write_bytes(body)
    params = json.loads(parts["params"])
    assert params["label_names"] == labels and params["case"] == CASE
    assert params["rigid"] == "mutual_information" and params["deformable"] == "network"
    nrrd = tmp_path / "result.nrrd"
    nrrd.write_bytes(parts["image"])

    trus = nib.load(str(store / f"{CASE}.nii.gz"))
    label = nib.load(str(result))
    assert label.shape == trus.shape
    np.testing.assert_allclose(label.affine, trus.affine, atol=1e-4)
    values = np.asarray(label.dataobj)
    assert set(np.unique(values)) <= set(range(7)) and (values == 1).any()
    # the NRRD holds the same map on the same physical grid (ITK reads both in LPS)
    as_nrrd, as_nifti = itk.imread(str(nrrd)), itk.imread(str(result))
    np.testing.assert_array_equal(itk.array_view_from_image(as_nrrd), itk.array_view_from_image(as_nifti))
    for attribute in ("GetOrigin", "GetSpacing"):
        np.testing.assert_allclose(getattr(as_nrrd, attribute)(), getattr(as_nifti, attribute)(), atol=1e-4)
    np.testing.assert_allclose(
        itk.array_from_matrix(as_nrrd.GetDirection()), itk.array_from_matrix(as_nifti.GetDirection()), atol=1e-6
    )

    # gland Dice against the TRUS gland; both sides take the union of the label channels (landmarks lie in the gland)
    trus_gland = np.asarray(nib.load(str(_phantom_file(tmp_path, "us_labels"))).dataobj)[..., 0] > 0
    mr_labels = nib.load(str(_phantom_file(tmp_path, "mr_labels")))
    mr_union = nib.Nifti1Image((np.asarray(mr_labels.dataobj) > 0).any(-1).astype(np.uint8), mr_labels.affine)
    unregistered = np.asarray(resample_from_to(mr_union, trus, order=0).dataobj) > 0
    before, after = _dice(unregistered, trus_gland), _dice(values > 0, trus_gland)
    print(f"gland Dice: no registration {before:.3f}, served registration {after:.3f}")
    assert after > before + 0.05
