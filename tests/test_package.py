"""Tests of scripts/tools/package.py and scripts/weights/manifest.py: the zoo-ready package, its manifest, and that the
packaged bundle, copied elsewhere, passes MONAI's bundle checks and runs inference through MONAI's bundle API."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import US_AFFINE, write_case
from monai.bundle import ConfigParser

from scripts.data.nifti import InputError
from scripts.networks.registration import RegistrationNet
from scripts.tools.package import package
from scripts.weights.manifest import verify_weights, write_manifest
from scripts.weights.trained_model import settings_of

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "tests" / "data" / "meta_schema_20240725.json"
GRID = [32, 32, 32]
TINY = dict(
    encoder_channels=[4, 8, 8, 8],
    decoder_channels=[8, 8, 8, 4],
    head_channels=[8, 4, 4],
    compact_code=[4, 4, 1],
    lstm_hidden=8,
    msfa_mode="paper",
)
URL = "https://example.org/weights"
# keys the model zoo and MONAI Label look up in an inference config (docs of the bundle format)
INFERENCE_KEYS = (
    "bundle_root",
    "device",
    "network_def",
    "inferer",
    "preprocessing",
    "postprocessing",
    "output_dir",
    "initialize",
    "run",
)


def run_python(code: str, args: list, cwd, bundle) -> dict:
    """Run ``code`` in a new Python with ``bundle`` importable (None: nothing added); its last stdout line, as JSON."""
    env = {**os.environ, "PYTHONPATH": str(bundle or ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A copy of this bundle with a tiny network config, a tiny seeded checkpoint and a 3 MB stand-in weight."""
    src = tmp_path_factory.mktemp("src")
    for item in ("configs", "scripts", "docs"):
        shutil.copytree(REPO / item, src / item, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "LICENSE", src / "LICENSE")
    config = json.loads((src / "configs" / "inference.json").read_text())
    config["spatial_size"] = GRID
    config["network_def"].update(TINY)
    (src / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    (src / "models").mkdir()
    torch.manual_seed(0)
    net = RegistrationNet(**TINY, spatial_size=tuple(GRID))
    net.trained_settings = settings_of(config)  # as make-model writes it: a plain state dict, settings inside
    torch.save(net.state_dict(), src / "models" / "model.pt")
    (src / "models" / "model.onnx").write_bytes(np.random.default_rng(0).bytes(3 * 2**20))  # "large" file
    (src / "scripts" / "__pycache__").mkdir()
    (src / "scripts" / "__pycache__" / "junk.pyc").write_bytes(b"0")
    return src


@pytest.fixture(scope="module")
def packaged(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    return Path(package(out=str(out), bundle_root=str(source), name="reg_bundle", url_base=URL, max_file_mb=2))


@pytest.mark.full
def test_layout_and_manifest(source, packaged):
    assert packaged.name == "reg_bundle"
    for rel in (
        "configs/metadata.json",
        "configs/inference.json",
        "scripts/networks/registration.py",
        "docs/README.md",
        "docs/data_license.txt",
        "LICENSE",
        "large_files.yml",
        "models/model.pt",
    ):
        assert (packaged / rel).is_file(), rel
    assert not (packaged / "models" / "model.onnx").exists()  # 3 MB > max_file_mb=2: listed, not copied
    assert not (packaged / "scripts" / "__pycache__").exists()
    assert not (packaged / "tests").exists()
    assert (packaged / "scripts" / "inference" / "registrar.py").is_file()
    assert not (packaged / "scripts" / "tools").exists()  # the CLI, demo, packager and exporter stay in the repo
    tool = subprocess.run(
        [sys.executable, "-m", "scripts", "register", "--help"], cwd=packaged, capture_output=True, text=True
    )
    assert tool.returncode == 1 and "repository tool, not shipped in the packaged bundle" in tool.stderr
    entries = {e["path"]: e for e in ConfigParser.load_config_file(str(packaged / "large_files.yml"))["large_files"]}
    assert set(entries) == {"models/model.pt", "models/model.onnx"}
    for rel, entry in entries.items():
        assert entry["hash_type"] == "sha256"
        assert entry["hash_val"] == digest(source / rel)
        assert entry["url"] == f"{URL}/{rel}"
    config = json.loads((packaged / "configs" / "inference.json").read_text())
    assert [k for k in INFERENCE_KEYS if k not in config] == []


def test_refusals(source, packaged, tmp_path):
    with pytest.raises(FileExistsError):
        package(out=str(packaged.parent), bundle_root=str(source), name="reg_bundle")
    bare = tmp_path / "bare"
    shutil.copytree(source, bare, ignore=shutil.ignore_patterns("models"))
    with pytest.raises(InputError, match="no trained weights"):
        package(out=str(tmp_path / "out"), bundle_root=str(bare))
    marked = Path(package(out=str(tmp_path / "out"), bundle_root=str(bare), untrained=True))
    assert "NO trained weights" in (marked / "models" / "UNTRAINED.txt").read_text()
    assert not list((tmp_path / "out").glob(".*"))  # no staging folder left behind


def test_verify_weights(packaged, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(packaged, copy)
    assert verify_weights(copy, "models/model.pt") == ["models/model.pt"]
    with pytest.raises(InputError, match="model.onnx: listed in large_files.yml but missing"):
        verify_weights(copy)  # the large file was not copied
    data = bytearray((copy / "models" / "model.pt").read_bytes())
    data[-1] ^= 1  # flip one bit
    (copy / "models" / "model.pt").write_bytes(bytes(data))
    with pytest.raises(InputError, match="model.pt: sha256 differs"):
        verify_weights(copy, copy / "models" / "model.pt")


CHECKS = """
import json, sys, torch
from monai.bundle import ConfigWorkflow, verify_metadata, verify_net_in_out
import scripts
verify_metadata(meta_file="configs/metadata.json", filepath=sys.argv[1])
verify_net_in_out(net_id="network_def", meta_file="configs/metadata.json", config_file="configs/inference.json",
                  n=4, device="cpu")
workflow = ConfigWorkflow(config_file="configs/inference.json", meta_file="configs/metadata.json",
                          **json.loads(sys.argv[2]))
workflow.initialize()
workflow.run()
loaded = workflow.parser.get_parsed_content("network").state_dict()
saved = torch.load("models/model.pt", weights_only=True)
print(json.dumps({"scripts": scripts.__file__, "weights_loaded": all(torch.equal(loaded[k], saved[k]) for k in saved)}))
"""


@pytest.mark.full
def test_packaged_bundle_runs_elsewhere(packaged, tmp_path):
    copy = tmp_path / "copied_bundle"
    shutil.copytree(packaged, copy)
    case = write_case(tmp_path / "data", "holdout", "case000000", mr_shape=(20, 22, 18), us_shape=(18, 20, 16))
    out_dir = tmp_path / "inference"
    overrides = {
        "bundle_root": str(copy),
        "moving": str(case["mr_image"]),
        "fixed": str(case["us_image"]),
        "moving_label": str(case["mr_label"]),
        "output_dir": str(out_dir),
        "use_rigid": False,
        # gland masks given, so the default ROI step runs without the segmenter's weights
        "moving_mask": str(case["mr_label"]),
        "fixed_mask": str(case["us_label"]),
    }
    summary = run_python(CHECKS, [str(SCHEMA), json.dumps(overrides)], cwd=copy, bundle=copy)
    assert Path(summary["scripts"]).resolve().parent == copy / "scripts"  # the packaged code ran, not the repo's
    assert summary["weights_loaded"]
    warped = nib.load(str(out_dir / "warped_image.nii.gz"))
    assert warped.shape == (18, 20, 16) and np.allclose(warped.affine, US_AFFINE)  # the fixed (TRUS) grid
    assert nib.load(str(out_dir / "warped_label.nii.gz")).shape == (18, 20, 16, 6)
    assert json.loads((out_dir / "result.json").read_text())["deformable"] == "network"


ZOO_TOOLS = """
import json, sys, torch
from monai.bundle import load
from monai.networks.utils import copy_model_state
bundle_dir, name = sys.argv[1], sys.argv[2]
net = load(name, bundle_dir=bundle_dir, workflow_type="inference", device="cpu", source="github")
saved = torch.load(f"{bundle_dir}/{name}/models/model.pt", weights_only=True)
out = {"equal": all(torch.equal(net.state_dict()[k], v) for k, v in saved.items()), "settings": net.trained_settings}
try:
    load(name, bundle_dir=bundle_dir, workflow_type="train", device="cpu", source="github")
except ValueError as err:
    out["train"] = str(err)
trained = load(name, bundle_dir=bundle_dir, workflow_type="train", device="cpu", source="github",
               net_override=json.loads(sys.argv[3]))  # train.json's network made the trained one
out["train_equal"] = all(torch.equal(trained.state_dict()[k], v) for k, v in saved.items())
# the model zoo's TorchScript check (ci/verify_bundle.py, mode full): ckpt_export scripts the network
from monai.bundle import ckpt_export
root = f"{bundle_dir}/{name}"
ckpt_export(net_id="network_def", filepath="verify_model.ts", ckpt_file=f"{root}/models/model.pt",
            meta_file=f"{root}/configs/metadata.json", config_file=f"{root}/configs/inference.json", bundle_root=root)
x = torch.rand(1, 2, 32, 32, 32, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    out["ts_equal"] = torch.equal(torch.jit.load("verify_model.ts")(x), net.eval()(x))
print(json.dumps(out))
"""


@pytest.mark.full
def test_monai_load_and_ckpt_export_work_on_the_packaged_bundle(packaged, tmp_path):
    """The zoo's format: ``models/model.pt`` is a plain state dict, so ``monai.bundle.load`` (no ``key_in_ckpt``,
    run from another folder, no data anywhere) returns the trained network with its stored settings; the train
    workflow builds ``train.json``'s network, which these weights were not trained with: a clear refusal, not
    the silently partial copy MONAI's ``copy_model_state`` makes of mismatched shapes."""
    override = json.dumps({**TINY, "spatial_size": GRID})
    out = run_python(ZOO_TOOLS, [str(packaged.parent), packaged.name, override], cwd=tmp_path, bundle=packaged)
    assert out["equal"] and out["settings"]["spatial_size"] == GRID
    assert "trained with another network_def" in out["train"] and "encoder_channels" in out["train"]
    assert out["train_equal"]  # with the trained network's definition as net_override
    assert out["ts_equal"]  # scripted, no exclusion needed: the same field as the loaded network


TS_LOAD = """
import json, sys, torch
from monai.bundle import load
net, meta, extra = load(sys.argv[2], bundle_dir=sys.argv[1], load_ts_module=True, source="github", device="cpu")
x = torch.rand(1, 2, 24, 28, 20, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    ddf = net(x)
print(json.dumps({"shape": list(ddf.shape), "max": float(ddf.abs().max()), "version": meta["version"],
                  "bundle_code": [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]}))
"""


@pytest.mark.full
def test_monai_load_of_the_exported_torchscript_needs_no_bundle_code(packaged, tmp_path):
    """With ``models/model.ts`` (``python -m scripts export``), ``monai.bundle.load(..., load_ts_module=True)``
    gives the compiled network with none of the bundle's code on ``sys.path``; scripted, it takes any grid."""
    from scripts.tools.export import export

    copy = tmp_path / "hub" / packaged.name
    shutil.copytree(packaged, copy)
    assert export(bundle_root=str(copy), networks="registration", formats="ts")["registration"]["ts_mode"] == "scripted"
    out = run_python(TS_LOAD, [str(copy.parent), copy.name], cwd=tmp_path, bundle=None)
    assert out["shape"] == [1, 3, 24, 28, 20] and out["bundle_code"] == []
    assert out["version"] == json.loads((copy / "configs" / "metadata.json").read_text())["version"]


def test_package_refuses_a_wrapped_checkpoint(source, tmp_path):
    copy = tmp_path / "wrapped"
    shutil.copytree(source, copy)
    state = torch.load(copy / "models" / "model.pt", weights_only=True)
    torch.save({"model": state, "trainer": {"epoch": 3}}, copy / "models" / "model.pt")  # best.pt copied by hand
    with pytest.raises(InputError, match="not a plain state dict.*make-model"):
        package(out=str(tmp_path / "out"), bundle_root=str(copy))


def test_every_consumer_refuses_a_replaced_listed_weight_file(source, tmp_path):
    """export and package check large_files.yml before reading the weights (package used to hash the replaced
    file into the new manifest), and so does load_weights for a checkpoint inside another bundle."""
    from scripts.tools.export import export
    from scripts.weights.trained_model import load_weights

    copy = tmp_path / "bundle"
    shutil.copytree(source, copy)
    write_manifest(copy)
    weights = copy / "models" / "model.pt"
    state = torch.load(weights, weights_only=True)
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = state[first] + 1.0  # still a valid state dict of the right architecture
    torch.save(state, weights)
    message = f"{weights}: sha256 differs from large_files.yml; the file is corrupt or replaced"
    with pytest.raises(InputError, match=message):
        export(bundle_root=str(copy), networks="registration", formats="ts", out_dir=str(tmp_path / "exported"))
    assert not (tmp_path / "exported").exists()
    with pytest.raises(InputError, match=message):
        package(out=str(tmp_path / "out"), bundle_root=str(copy))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    with pytest.raises(InputError, match=message):  # the manifest of the bundle that holds the file
        load_weights(RegistrationNet(**TINY, spatial_size=tuple(GRID)), weights, bundle_root=REPO)


def test_make_model_into_a_bundle_updates_only_its_own_manifest_entry(source, tmp_path):
    """make-model writing models/model.pt of a bundle sets that file's entry to the new hash (so the new weights
    load); the other entries are kept as they were, so a file replaced behind the manifest stays refused."""
    from scripts.weights.trained_model import load_weights, make_model

    copy = tmp_path / "bundle"
    shutil.copytree(source, copy)
    write_manifest(copy)
    before = ConfigParser.load_config_file(str(copy / "large_files.yml"))["large_files"]
    run = tmp_path / "run"
    run.mkdir()
    config = ConfigParser.load_config_file(str(copy / "configs" / "inference.json"))
    (run / "run_config.json").write_text(json.dumps({"config": config}))
    torch.manual_seed(3)
    torch.save({"model": RegistrationNet(**TINY, spatial_size=tuple(GRID)).state_dict()}, run / "best.pt")
    make_model(str(run), out=str(copy / "models" / "model.pt"), overwrite=True)
    after = {e["path"]: e for e in ConfigParser.load_config_file(str(copy / "large_files.yml"))["large_files"]}
    assert after["models/model.pt"]["hash_val"] == digest(copy / "models" / "model.pt")
    assert after["models/model.pt"]["hash_val"] != {e["path"]: e for e in before}["models/model.pt"]["hash_val"]
    assert [after[e["path"]] for e in before if e["path"] != "models/model.pt"] == [
        e for e in before if e["path"] != "models/model.pt"
    ]
    net = load_weights(
        RegistrationNet(**TINY, spatial_size=tuple(GRID)), copy / "models" / "model.pt", bundle_root=copy
    )
    saved = torch.load(run / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(net.state_dict()[k], saved[k]) for k in saved if k != "_extra_state")  # the settings differ
