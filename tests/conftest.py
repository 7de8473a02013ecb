"""Shared test fixtures and helpers, and the test tiers.

Test files share code only through this file (fixtures, and ``from conftest import ...`` for constants and
functions) and the helper module ``_oblique.py``; no test file imports another.

Tiers: tests marked ``full`` start processes (bundle runs, the CLI, trainings, torchrun, the MONAI Label server,
the Deploy app) and are left out unless pytest gets ``--full`` (``bash run_tests.sh --full``, what ``.ci/run``
runs) or a ``-m`` expression of its own (``-m full``: that tier alone).
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
import torch.nn.functional as F
from monai.networks.blocks import DVF2DDF

from scripts.inference.pair import PairStage
from scripts.inference.registrar import Registrar
from scripts.networks.registration import RegistrationNet

ROOT = Path(__file__).resolve().parents[1]


def pytest_addoption(parser):
    parser.addoption(
        "--full",
        action="store_true",
        help="run the full tier too: tests marked full (bundle and CLI processes, trainings, torchrun, "
        "MONAI Label, Deploy)",
    )


def pytest_report_header(config):
    if config.getoption("--full") or config.option.markexpr:
        return None
    return "tier: fast (tests marked full deselected; --full runs them)"


def pytest_collection_modifyitems(config, items):
    if config.getoption("--full") or config.option.markexpr:
        return
    full = [item for item in items if item.get_closest_marker("full")]
    if full:
        config.hook.pytest_deselected(items=full)
        items[:] = [item for item in items if not item.get_closest_marker("full")]


# ---------------------------------------------------------------- tiny μ-RegPro-layout folders written with nibabel

MR_AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
US_AFFINE = np.array([[0.0, -2.5, 0.0, 40.0], [2.5, 0.0, 0.0, -10.0], [0.0, 0.0, 2.5, 5.0], [0, 0, 0, 1.0]])


# a small registration network (RegistrationNet arguments) for tests that train or run the pipeline
SMALL = dict(
    encoder_channels=[4, 4, 4, 4],
    decoder_channels=[4, 4, 4, 4],
    head_channels=[4, 4, 4],
    chunks=2,
    lstm_hidden=8,
    lstm_layers=1,
    compact_code=[4, 4, 2],
    msfa_mode="paper",
)


def write_case(root, split, case, channels=6, mr_shape=(12, 14, 10), us_shape=(10, 12, 9), seed=0):
    """Write one case (two images, two channel-last labels with a non-empty gland) and return its MR/TRUS paths."""
    rng = np.random.default_rng(seed)
    paths = {}
    for mod, shape, affine in (("mr", mr_shape, MR_AFFINE), ("us", us_shape, US_AFFINE)):
        image = rng.random(shape).astype(np.float32)
        label = np.zeros((*shape, channels), np.uint8)
        label[2:-2, 2:-2, 2:-2, 0] = 1
        for kind, data in (("images", image), ("labels", label)):
            path = Path(root) / split / f"{mod}_{kind}" / f"{case}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data, affine), str(path))
            paths[f"{mod}_{kind[:-1]}"] = path
    return paths


@pytest.fixture
def tiny_dataset(tmp_path):
    """A factory: ``tiny_dataset(n_cases=2, channels=6, split="train")`` -> dataset root with that many cases."""

    def make(n_cases=2, channels=6, split="train"):
        for i in range(n_cases):
            write_case(tmp_path, split, f"case{i:06d}", channels=channels, seed=i)
        return tmp_path

    return make


def initial_weights(path, **overrides) -> Path:
    """The inference config's network (``overrides``: config ids -> values) with its seeded initial weights, saved
    as a plain state dict: for runs that need a checkpoint file (a missing one is an error) but no training."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(Path(__file__).resolve().parents[1] / "configs" / "inference.json"))
    for key, value in overrides.items():
        parser[key] = value
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    return Path(path)


# ---------------------------------------------------------------- training through the bundle runner (sphere data)

SPHERE_MR_AFFINE = np.array([[2.0, 0, 0, -28.0], [0, 2.0, 0, -28.0], [0, 0, 2.0, -28.0], [0, 0, 0, 1]])
# TRUS grid: axes permuted and two of them flipped, 2.5 mm voxels, about the same field of view
SPHERE_US_AFFINE = np.array([[0, -2.5, 0, 30.0], [2.5, 0, 0, -30.0], [0, 0, -2.5, 30.0], [0, 0, 0, 1]])
SPHERE_SHIFT_MM = np.array([7.0, -5.0, 4.0])  # TRUS gland centre = MR gland centre + SPHERE_SHIFT_MM
SPHERE_LANDMARKS_MM = np.array([[3, 0, 0], [-3, 0, 0], [0, 3, 0], [0, -3, 0], [0, 0, 3]], float)


def _world(affine, shape):
    idx = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), -1)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def _render(points, centre, radius, inside, outside, rng):
    """Image and (X, Y, Z, 6) label: channel 0 a ball (the gland), 1-5 small balls inside it."""
    gland = (np.linalg.norm(points - centre, axis=-1) <= radius).astype(np.float32)
    image = np.where(gland > 0, inside, outside) + 0.05 * rng.standard_normal(gland.shape)
    marks = [(np.linalg.norm(points - centre - m, axis=-1) <= 2.5).astype(np.float32) for m in SPHERE_LANDMARKS_MM]
    return image.astype(np.float32), np.stack([gland] + marks, -1)


def make_dataset(root, counts=(("train", 4), ("val", 2)), seed=0):
    """The sphere data set in the μ-RegPro layout: a spherical gland whose TRUS copy is the MR copy shifted by
    SPHERE_SHIFT_MM, on differently oriented MR and TRUS grids; returns {case: gland radius in mm}."""
    rng = np.random.default_rng(seed)
    radii, index = {}, 0
    for split, n in counts:
        for _ in range(n):
            centre, radius = rng.uniform(-3, 3, 3), rng.uniform(11, 13)
            for mod, affine, shape, c, values in (
                ("mr", SPHERE_MR_AFFINE, (28, 28, 28), centre, (0.8, 0.3)),
                ("us", SPHERE_US_AFFINE, (24, 24, 24), centre + SPHERE_SHIFT_MM, (0.25, 0.7)),
            ):
                image, label = _render(_world(affine, shape), c, radius, *values, rng)
                for kind, data in (("images", image), ("labels", label)):
                    path = Path(root) / split / f"{mod}_{kind}" / f"case{index:06d}.nii.gz"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    nib.save(nib.Nifti1Image(data, affine), str(path))
            radii[f"case{index:06d}"] = radius
            index += 1
    return radii


# a small network for configs/train.json, as command-line overrides
SMALL_NET = [
    "--network_def#encoder_channels", "[4,8,8,8]",
    "--network_def#decoder_channels", "[8,8,8,4]",
    "--network_def#head_channels", "[8,4,4]",
    "--network_def#compact_code", "[4,4,2]",
    "--network_def#lstm_hidden", "8",
    "--task_mask#hidden", "8",
    "--network_def#chunks", "4",
]  # fmt: skip


# the sphere data tests the network alone: a rigid step on the masks would already remove the whole shift,
# and the box keeps the whole (small) field of view
NO_RIGID = ["--use_rigid", "False", "--roi_mask", "False", "--pair_overrides", '{"depth_crop": 0}']


def run_bundle(run_id, dataset, run_dir, *extra, grid="[24,24,24]"):
    """``python -m monai.bundle run [run_id] --config_file configs/train.json ...`` from the bundle root."""
    command = [sys.executable, "-m", "monai.bundle", "run", *([run_id] if run_id else [])]
    command += ["--config_file", "configs/train.json", "--dataset_dir", str(dataset), "--run_dir", str(run_dir)]
    command += ["--spatial_size", grid, "--learning_rate", "0.005", "--progress_bar", "False", *SMALL_NET]
    command += list(extra)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def load(path):
    """A checkpoint or state dict, on the CPU, weights only."""
    return torch.load(path, map_location="cpu", weights_only=True)


def tensors(tree, prefix=""):
    """{dotted key: tensor} of every tensor in a nested checkpoint (dicts and lists)."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else []
    out = {}
    for key, value in items:
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update({name: value} if isinstance(value, torch.Tensor) else tensors(value, name))
    return out


# ---------------------------------------------------------------- the CLI on a good case with tiny weights

GRID = [16, 16, 16]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1"}


def small_net():
    """A seeded RegistrationNet of SMALL on GRID."""
    torch.manual_seed(0)
    return RegistrationNet(**SMALL, spatial_size=tuple(GRID))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A good case, tiny weights and an inference config using them (no segmenter, whole images)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    case = write_case(root / "good", "holdout", "case000000")
    torch.save(small_net().state_dict(), root / "weights.pt")
    config = json.loads((ROOT / "configs" / "inference.json").read_text())
    config["network_def"].update(SMALL)
    config.update(spatial_size=GRID, checkpoint=str(root / "weights.pt"), use_seg=False, roi_mask=False)
    (root / "small.json").write_text(json.dumps(config))
    return {"root": root, "config": str(root / "small.json"), **{k: str(v) for k, v in case.items()}}


def register(b, out, moving=None, fixed=None, labels=None, *extra):
    """``register`` arguments of the CLI for the case and config of ``base`` (``b``), rigid step and pictures off."""
    argv = [
        "register",
        "--moving",
        moving or b["mr_image"],
        "--fixed",
        fixed or b["us_image"],
        "--out",
        str(out),
        "--config-file",
        b["config"],
        "--use-rigid",
        "False",
        "--pictures",
        "False",
    ]
    return argv + (["--moving-labels", labels] if labels else []) + list(extra)


# ---------------------------------------------------------------- a phantom case on an oblique TRUS grid

SIZE, CROP = (32, 40, 24), 2
CASE = "case000002"  # index % 3 == 2: the phantom's oblique TRUS grid


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The small phantom's oblique case: {"mr_image", "us_image", "mr_label", "us_label", "ddf", "root": paths}."""
    from scripts.phantom.synth import generate_case
    from scripts.phantom.synth import write_case as write_phantom_case

    root = tmp_path_factory.mktemp("phantom")
    data = generate_case(0, 2, "small")
    write_phantom_case(data, root, "train", CASE, preview=False)
    d = root / "train"
    paths = {k: d / f"{k}s" / f"{CASE}.nii.gz" for k in ("mr_image", "us_image", "mr_label", "us_label")}
    paths["ddf"] = d / "ddf_mr2us" / f"{CASE}.nii.gz"
    paths["root"] = root
    return paths


class ContentNet(torch.nn.Module):
    """A deterministic stand-in network whose smooth velocity depends on the box images' content.

    Channel c of v is ``scale[c] * blur(fixed - moving)`` (box voxels); ``forward_train`` and ``integrate``
    follow :class:`scripts.networks.contract.RegistrationNetwork`, so the pipeline takes the exact inverse exp(-v).
    """

    def __init__(self, scale=(3.0, -2.0, 1.5), steps=7):
        super().__init__()
        self.scale = torch.tensor(scale).view(1, 3, 1, 1, 1)
        self.integrate = DVF2DDF(num_steps=steps, mode="bilinear", padding_mode="border")

    def forward_train(self, image):
        diff = image[:, 1:2] - image[:, 0:1]
        for _ in range(3):
            diff = F.avg_pool3d(diff, 5, stride=1, padding=2, count_include_pad=False)
        v = self.scale * diff
        return {"ddf": self.integrate(v), "velocity": v, "features": None}

    def forward(self, image):
        return self.forward_train(image)["ddf"]


# a Registrar from keyword settings, and one registration (tests of the registrar's outputs)
PAIR_KEYS = ("spatial_size", "depth_crop", "axcodes", "use_rigid", "rigid_args", "roi_mask", "intensity")
REGISTRAR_KEYS = ("segmenter", "inferer", "postprocessing", "label_threshold", "device", "amp", "direction")
CALL_KEYS = ("moving_mask", "fixed_mask", "rigid", "overwrite", "publish")


def make_registrar(network=None, spatial_size=(128, 128, 120), **settings) -> Registrar:
    """A registrar whose pair stage and other settings come from ``settings`` (names as in the configs)."""
    pair = PairStage(spatial_size, **{k: v for k, v in settings.items() if k in PAIR_KEYS})
    return Registrar(network, pair, **{k: v for k, v in settings.items() if k in REGISTRAR_KEYS})


def register_pair(moving, fixed, out_dir, moving_labels=None, network=None, **settings) -> dict:
    """Register one pair with a registrar made from ``settings``; call-time arguments passed through."""
    unknown = set(settings) - {"spatial_size", *PAIR_KEYS, *REGISTRAR_KEYS, *CALL_KEYS}
    assert not unknown, f"unknown settings {unknown}"
    registrar = make_registrar(network, **{k: v for k, v in settings.items() if k not in CALL_KEYS})
    call = {k: v for k, v in settings.items() if k in CALL_KEYS}
    return registrar.register(moving, fixed, out_dir, moving_labels, **call)
