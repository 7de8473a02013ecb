"""Tests of scripts/tools/export.py: TorchScript, torch.export and ONNX exports agree with the eager networks.

Tiny random-weight networks on a 32^3 grid, built here directly from their classes (not through the
bundle config), so a wrong config, wrong weights or a wrong conversion in the export shows up as a mismatch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import register_pair
from monai.networks.nets import UNet

from scripts.data.nifti import InputError
from scripts.inference.registrar import OUTPUTS
from scripts.networks.onnx_runtime import OnnxRegistrationNet
from scripts.networks.registration import RegistrationNet
from scripts.tools.export import adaptive_avg_pool3d_as_matmul, export

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")

GRID = (32, 32, 32)
TOL = 1e-4  # max abs difference allowed: voxels for the field, logits for the segmentation
REG = dict(
    encoder_channels=[4, 8, 8, 8],
    decoder_channels=[8, 8, 8, 4],
    head_channels=[8, 4, 4],
    compact_code=[4, 4, 1],
    lstm_hidden=8,
    int_steps=5,
    int_padding="zeros",
    msfa_mode="paper",
)  # int_*: not the defaults, the ONNX file must carry them
SEG = dict(channels=[4, 8], strides=[2], num_res_units=1)


def randomise(net: torch.nn.Module, seed: int, std: float) -> torch.nn.Module:
    """Replace every parameter by seeded noise (the real initialisation gives a near-zero field)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return net.eval()


def synthetic_pair(seed: int = 0) -> torch.Tensor:
    """(1, 2, 32, 32, 32) [moving, fixed]: two offset Gaussian blobs plus seeded noise, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    axes = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in GRID], indexing="ij")

    def blob(centre):
        return torch.exp(-sum((a - c) ** 2 for a, c in zip(axes, centre)) / 50.0)

    pair = torch.stack([blob((14, 16, 17)), blob((17, 15, 15))]) + 0.05 * torch.rand((2, *GRID), generator=g)
    return (pair / pair.max())[None]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Export both tiny networks once: returns (export result, eager registration net, eager seg net)."""
    tmp = tmp_path_factory.mktemp("export")
    reg = randomise(RegistrationNet(**REG), seed=1, std=0.15)
    seg = randomise(UNet(spatial_dims=3, in_channels=1, out_channels=2, norm="instance", **SEG), seed=2, std=0.2)
    torch.save(reg.state_dict(), tmp / "model.pt")  # bare state dict
    torch.save({"model": seg.state_dict(), "trainer": {"epoch": 3}}, tmp / "seg_model.pt")  # training checkpoint
    override = {
        "registration": {"spatial_size": list(GRID), **{f"network_def#{k}": v for k, v in REG.items()}},
        "segmentation": {"seg_spatial_size": list(GRID), **{f"seg_network_def#{k}": v for k, v in SEG.items()}},
    }
    result = export(
        bundle_root=".",
        out_dir=str(tmp / "out"),
        override=override,
        checkpoints={"registration": str(tmp / "model.pt"), "segmentation": str(tmp / "seg_model.pt")},
    )
    return result, reg, seg, override, tmp


def run_all(files: dict, x: torch.Tensor) -> dict:
    """Outputs of the TorchScript, torch.export and ONNX Runtime models on ``x``, as numpy arrays."""
    with torch.no_grad():
        out = {"ts": torch.jit.load(files["ts"])(x).numpy(), "pt2": torch.export.load(files["pt2"]).module()(x).numpy()}
    session = ort.InferenceSession(files["onnx"], providers=["CPUExecutionProvider"])
    out["onnx"] = session.run(["pred"], {"image": x.numpy()})[0]
    return out


def test_registration_exports_match_eager(exported):
    result, reg, _, _, _ = exported
    x = synthetic_pair()
    with torch.no_grad():
        ddf = reg(x).numpy()
    assert ddf.shape == (1, 3, *GRID)
    assert np.abs(ddf).max() > 1.0  # a real deformation (voxels), so agreement is not trivial
    print(f"registration: max |ddf| {np.abs(ddf).max():.3g} voxels")
    for fmt, out in run_all(result["registration"], x).items():
        assert out.shape == ddf.shape, fmt
        assert np.abs(out - ddf).max() <= TOL, (fmt, np.abs(out - ddf).max())
        print(f"registration {fmt}: max |difference| {np.abs(out - ddf).max():.2g}")


def test_segmentation_exports_match_eager(exported):
    result, _, seg, _, _ = exported
    x = synthetic_pair()[:, :1]
    with torch.no_grad():
        logits = seg(x).numpy()
    assert np.abs(logits).max() > 0.5
    print(f"segmentation: max |logit| {np.abs(logits).max():.3g}")
    for fmt, out in run_all(result["segmentation"], x).items():
        assert out.shape == (1, 2, *GRID), fmt
        assert np.abs(out - logits).max() <= TOL, (fmt, np.abs(out - logits).max())
        print(f"segmentation {fmt}: max |difference| {np.abs(out - logits).max():.2g}")


def test_torchscript_mode_and_embedded_metadata(exported):
    result, reg, *_ = exported
    # both networks compile with torch.jit.script (the registration network's warp is scriptable), so the
    # registration TorchScript is not tied to the export grid: on another grid it gives the eager field
    assert result["registration"]["ts_mode"] == "scripted" and result["segmentation"]["ts_mode"] == "scripted"
    x = torch.rand(1, 2, 24, 28, 20, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        np.testing.assert_allclose(torch.jit.load(result["registration"]["ts"])(x).numpy(), reg(x).numpy(), atol=TOL)
    extra = {"metadata.json": "", "inference.json": ""}
    torch.jit.load(result["registration"]["ts"], _extra_files=extra)
    assert b'"network_data_format"' in extra["metadata.json"] and b'"network_def"' in extra["inference.json"]


def test_onnx_opset_and_size(exported):
    result, *_ = exported
    model = onnx.load(result["registration"]["onnx"])
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 20
    assert "GridSample" in {n.op_type for n in model.graph.node}
    # no grid-sized constant folded into the file (only weights, the largest a 7^3 8->8 kernel)
    assert max(int(np.prod(i.dims)) for i in model.graph.initializer) < np.prod(GRID)


def test_refuses_to_overwrite(exported):
    result, _, _, override, tmp = exported
    before = open(result["registration"]["onnx"], "rb").read()
    with pytest.raises(FileExistsError):
        export(
            bundle_root=".",
            out_dir=str(tmp / "out"),
            override=override,
            formats=["onnx"],
            checkpoints={"registration": str(tmp / "model.pt"), "segmentation": str(tmp / "seg_model.pt")},
        )
    assert open(result["registration"]["onnx"], "rb").read() == before


def test_bad_requests(tmp_path):
    with pytest.raises(InputError, match="nothing to export"):
        export(bundle_root=".", networks=["registration"], checkpoints={"registration": str(tmp_path / "none.pt")})
    with pytest.raises(InputError, match="opset"):
        export(bundle_root=".", opset=19)
    with pytest.raises(InputError, match="unknown"):
        export(bundle_root=".", formats=["tflite"])


def test_adaptive_pool_as_matmul_by_hand():
    # 5 -> 2 bins: PyTorch's bins are {0, 1, 2} and {2, 3, 4}; 4 -> 4 is the identity; 3 -> 1 is the mean
    x = torch.zeros(1, 1, 5, 4, 3)
    x += torch.arange(5.0)[:, None, None] * 100 + torch.arange(4.0)[None, :, None] * 10 + torch.arange(3.0)
    out = adaptive_avg_pool3d_as_matmul(x, (2, 4, 1))
    expected = torch.tensor([[101.0, 111.0, 121.0, 131.0], [301.0, 311.0, 321.0, 331.0]])[None, None, :, :, None]
    assert torch.allclose(out, expected)


def test_onnx_runtime_network_gives_the_eager_field_and_velocity(exported):
    result, reg, *_ = exported
    x = synthetic_pair(seed=3)
    with torch.no_grad():
        eager = reg.forward_train(x)
    ort_net = OnnxRegistrationNet(result["registration"]["onnx"], threads=1)
    assert ort_net.outputs == ["pred", "velocity"]
    assert ort_net.integrate.num_steps == 5 and ort_net.integrate.warp_layer._padding_mode_native == "zeros"
    out = ort_net.forward_train(x)
    assert np.abs(eager["velocity"].numpy()).max() > 0.5  # not a trivial agreement
    for key in ("ddf", "velocity"):
        assert out[key].shape == (1, 3, *GRID)
        assert (out[key] - eager[key]).abs().max() <= TOL, (key, (out[key] - eager[key]).abs().max())
    assert (ort_net(x) - eager["ddf"]).abs().max() <= TOL


def test_onnx_runtime_network_refuses_another_grid_and_missing_or_bad_files(exported, tmp_path):
    result, *_ = exported
    ort_net = OnnxRegistrationNet(result["registration"]["onnx"])
    with pytest.raises(InputError, match=r"exported for input shape \[1, 2, 32, 32, 32\], got \[1, 2, 32, 32, 24\]"):
        ort_net(torch.zeros(1, 2, 32, 32, 24))
    with pytest.raises(InputError, match="none.onnx: ONNX file does not exist"):
        OnnxRegistrationNet(tmp_path / "none.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(InputError, match="bad.onnx: ONNX Runtime cannot load it"):
        OnnxRegistrationNet(tmp_path / "bad.onnx")


def _pair_files(root: Path) -> tuple[Path, Path]:
    """A moving and a fixed NIfTI (40 x 36 x 34, 1.5 mm) holding the two blobs, the fixed one shifted by 3 mm."""
    x = synthetic_pair(seed=4)[0].numpy()
    paths = []
    for name, image in (("moving", x[0]), ("fixed", x[1])):
        padded = np.pad(image, ((4, 4), (2, 2), (1, 1)), mode="edge")
        affine = np.diag([1.5, 1.5, 1.5, 1.0])
        affine[:3, 3] = (0.0, 0.0, 3.0) if name == "fixed" else (0.0, 0.0, 0.0)
        paths.append(root / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(padded.astype(np.float32), affine), str(paths[-1]))
    return paths[0], paths[1]


@pytest.mark.full
def test_pipeline_and_bundle_runner_on_onnx_runtime_match_pytorch(exported, tmp_path):
    """register_pair with the eager network vs. the ONNX file (Python API, then configs/inference_onnx.json
    through ``python -m monai.bundle run``): the same fields, the inverse integrated from the velocity."""
    result, reg, *_ = exported
    moving, fixed = _pair_files(tmp_path)
    common = dict(spatial_size=GRID, depth_crop=0, use_rigid=False, roi_mask=False)
    eager = register_pair(moving, fixed, tmp_path / "eager", network=reg, **common)
    onnx_file = result["registration"]["onnx"]
    api = register_pair(moving, fixed, tmp_path / "api", network=OnnxRegistrationNet(onnx_file), **common)
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "['configs/inference.json','configs/inference_onnx.json']",
        "--onnx_file",
        onnx_file,
        "--moving",
        str(moving),
        "--fixed",
        str(fixed),
        "--output_dir",
        str(tmp_path / "runner"),
        "--spatial_size",
        str(list(GRID)),
        "--pair_overrides",
        '{"depth_crop": 0}',
        "--use_rigid",
        "False",
        "--roi_mask",
        "False",
        "--use_seg",
        "False",
    ]
    done = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    runner = json.loads((tmp_path / "runner" / OUTPUTS["result"]).read_text())
    assert eager["inverse"] == api["inverse"] == runner["inverse"] == "integrated -velocity"

    def field(folder, key):
        return nib.load(str(tmp_path / folder / OUTPUTS[key])).get_fdata()

    for key in ("forward_field", "inverse_field"):
        reference = field("eager", key)
        assert np.abs(reference).max() > 1.0  # mm: the random network deforms
        for folder in ("api", "runner"):
            np.testing.assert_allclose(field(folder, key), reference, atol=1e-3, err_msg=f"{folder} {key}")


def test_cli_loader_gives_the_onnx_network_of_inference_onnx_json(exported, tmp_path):
    """scripts.inference.registrar.load_registrar (CLI, MONAI Label, Deploy) honours configs/inference_onnx.json."""
    from scripts.inference.registrar import load_registrar

    result, reg, *_ = exported
    root = Path(__file__).resolve().parents[1]
    override = tmp_path / "onnx_here.json"
    override.write_text(
        json.dumps(
            {
                "onnx_file": result["registration"]["onnx"],
                "spatial_size": list(GRID),
                "use_seg": False,
                "roi_mask": False,
            }
        )
    )
    files = [str(root / "configs/inference.json"), str(root / "configs/inference_onnx.json"), str(override)]
    registrar = load_registrar(files)
    network = registrar.network
    assert isinstance(network, OnnxRegistrationNet) and registrar.pair.spatial_size == GRID
    x = synthetic_pair(seed=5)
    with torch.no_grad():
        assert (network(x) - reg(x)).abs().max() <= TOL
    with pytest.raises(InputError, match="does not load PyTorch checkpoints"):
        load_registrar(files, {"checkpoint": str(tmp_path / "model.pt")})


def test_monais_own_onnx_export_gives_the_eager_field(exported, tmp_path):
    """``monai.bundle.onnx_export`` on configs/inference.json (the refiner's adaptive pooling is written as matrix
    products while an ONNX export runs): ONNX Runtime gives the eager network's DDF."""
    import onnxruntime as ort
    from monai.bundle import onnx_export

    _, reg, _, override, tmp = exported
    onnx_export(
        net_id="network_def",
        filepath=str(tmp_path / "monai.onnx"),
        config_file="configs/inference.json",
        ckpt_file=str(tmp / "model.pt"),
        key_in_ckpt="",
        input_shape=[1, 2, *GRID],
        **override["registration"],
    )
    x = synthetic_pair(3)
    session = ort.InferenceSession(str(tmp_path / "monai.onnx"), providers=["CPUExecutionProvider"])
    (ddf,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})[:1]
    with torch.no_grad():
        eager = reg(x).numpy()
    assert np.abs(eager).max() > 0.1  # a field worth comparing
    assert np.abs(ddf - eager).max() <= TOL
