"""The registrar end to end on a phantom case with an oblique fixed (TRUS) grid.

The ground-truth field goes through the same post-stage as a network's output; ANTs and ITK, given
the written files, must reproduce the bundle's own warped image and labels.
"""

import ants
import itk
import nibabel as nib
import numpy as np
import pytest
import torch
from _oblique import dice
from conftest import CASE, CROP, SIZE, ContentNet, register_pair

from scripts.inference.registrar import OUTPUTS
from scripts.spatial.composed import FieldNetwork
from scripts.spatial.geometry import network_box, sample


def _load(path):
    return nib.load(str(path)).get_fdata()


def test_ground_truth_field_through_pipeline_matches_fixed_labels_and_ants_itk_agree(case, tmp_path):
    fixed = nib.load(str(case["us_image"]))
    direction = fixed.affine[:3, :3] / np.linalg.norm(fixed.affine[:3, :3], axis=0)
    assert np.abs(direction - np.round(direction)).max() > 0.05  # oblique, not a permutation
    truth = _load(case["ddf"])[..., 0, :]
    assert all(truth[..., k].std() > 0.5 for k in range(3))  # distinct x, y, z components
    box = network_box(fixed.affine, fixed.shape, SIZE, CROP)
    out = tmp_path / "gt"
    result = register_pair(
        case["mr_image"],
        case["us_image"],
        out,
        case["mr_label"],
        network=FieldNetwork(case["ddf"], box),
        spatial_size=SIZE,
        depth_crop=CROP,
        use_rigid=False,
    )
    assert result["direction"] == "mr2us" and result["deformable"] == "network"
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS.values())
    warped_label = _load(out / OUTPUTS["warped_label"])
    warped_image = _load(out / OUTPUTS["warped_image"])
    assert warped_label.shape == fixed.shape + (6,)
    np.testing.assert_allclose(nib.load(str(out / OUTPUTS["warped_image"])).affine, fixed.affine, atol=1e-5)
    assert dice(warped_label[..., 0], _load(case["us_label"])[..., 0]) >= 0.95

    span = np.ptp(_load(case["mr_image"]))
    fixed_ants = ants.image_read(str(case["us_image"]))
    moving_ants = ants.image_read(str(case["mr_image"]))
    gland_ants = ants.from_numpy(
        _load(case["mr_label"])[..., 0].astype(np.float32),
        origin=moving_ants.origin,
        spacing=moving_ants.spacing,
        direction=moving_ants.direction,
    )
    for files in ([out / OUTPUTS["ants_warp"], out / OUTPUTS["ants_rigid"]], [out / OUTPUTS["forward_field"]]):
        files = [str(f) for f in files]
        image = ants.apply_transforms(fixed_ants, moving_ants, files).numpy()
        gland = ants.apply_transforms(fixed_ants, gland_ants, files).numpy()
        assert np.abs(image - warped_image).max() <= 1e-3 * span, files
        assert dice(gland, warped_label[..., 0]) >= 0.99, files
    transform = itk.transformread(str(out / OUTPUTS["forward_h5"]))[0]
    res = itk.resample_image_filter(
        itk.imread(str(case["mr_image"]), itk.F),
        transform=transform,
        use_reference_image=True,
        reference_image=itk.imread(str(case["us_image"]), itk.F),
    )
    assert np.abs(itk.array_from_image(res).transpose(2, 1, 0) - warped_image).max() <= 1e-3 * span


def _flipped_copy(src, dst, axis):
    """Write ``src`` with its voxel order reversed along ``axis`` and the affine adjusted (same physical image)."""
    img = nib.load(str(src))
    flip = np.eye(4)
    flip[axis, axis], flip[axis, 3] = -1, img.shape[axis] - 1
    nib.save(nib.Nifti1Image(np.flip(np.asanyarray(img.dataobj), axis).copy(), img.affine @ flip), str(dst))


def _transposed_copy(src, dst):
    """Write ``src`` with voxel axes (0, 1, 2) -> (2, 0, 1) (same physical image)."""
    img = nib.load(str(src))
    data = np.asanyarray(img.dataobj)
    order = (2, 0, 1) + tuple(range(3, data.ndim))
    perm = np.eye(4)[[2, 0, 1, 3]].T  # new index (a, b, c) holds old index (b, c, a)
    nib.save(nib.Nifti1Image(np.transpose(data, order).copy(), img.affine @ perm), str(dst))


def test_reoriented_copies_give_the_same_physical_result(case, tmp_path):
    net = ContentNet()
    rigid = np.eye(4)
    rigid[:3, 3] = [1.5, -1.0, 2.0]
    common = dict(network=net, spatial_size=SIZE, depth_crop=CROP, rigid=rigid)
    ref = register_pair(case["mr_image"], case["us_image"], tmp_path / "ref", case["mr_label"], **common)
    _flipped_copy(case["us_image"], tmp_path / "us_flip.nii.gz", 1)
    _transposed_copy(case["mr_image"], tmp_path / "mr_t.nii.gz")
    _transposed_copy(case["mr_label"], tmp_path / "mr_label_t.nii.gz")
    register_pair(
        tmp_path / "mr_t.nii.gz",
        tmp_path / "us_flip.nii.gz",
        tmp_path / "other",
        tmp_path / "mr_label_t.nii.gz",
        **common,
    )
    a = _load(tmp_path / "ref" / OUTPUTS["warped_label"])[..., 0]
    b = np.flip(_load(tmp_path / "other" / OUTPUTS["warped_label"])[..., 0], 1)
    assert dice(a, b) >= 0.99
    # the deformable part is not negligible, so agreement is not trivial
    field_ref, affine_ref = (
        _load(tmp_path / "ref" / OUTPUTS["forward_field"])[..., 0, :],
        nib.load(str(tmp_path / "ref" / OUTPUTS["forward_field"])).affine,
    )
    assert np.linalg.norm(field_ref - rigid[:3, 3], axis=-1).max() > 1.0
    field_other = _load(tmp_path / "other" / OUTPUTS["forward_field"])[..., 0, :]
    affine_other = nib.load(str(tmp_path / "other" / OUTPUTS["forward_field"])).affine
    # landmark centres of the fixed labels (LPS mm), mapped by both results
    us_label = _load(case["us_label"])
    fixed_affine = nib.load(str(case["us_image"])).affine
    centres = []
    for c in range(us_label.shape[-1]):
        idx = np.argwhere(us_label[..., c] > 0.5)
        if len(idx):
            ras = fixed_affine[:3, :3] @ idx.mean(0) + fixed_affine[:3, 3]
            centres.append(ras * [-1, -1, 1])
    centres = np.array(centres)
    tre_diff = np.linalg.norm(
        sample(field_ref, affine_ref, centres) - sample(field_other, affine_other, centres), axis=-1
    )
    assert tre_diff.max() <= 0.1
    assert ref["network_box"]["affine_ras"] is not None


def test_forward_then_inverse_maps_landmarks_back(case, tmp_path):
    rigid = np.eye(4)
    c, s = np.cos(np.deg2rad(6)), np.sin(np.deg2rad(6))
    rigid[:3, :3] = [[c, -s, 0], [s, c, 0], [0, 0, 1]]
    rigid[:3, 3] = [2.0, 1.0, -1.0]
    out = tmp_path / "inv"
    result = register_pair(
        case["mr_image"],
        case["us_image"],
        out,
        None,
        network=ContentNet(),
        spatial_size=SIZE,
        depth_crop=CROP,
        rigid=rigid,
    )
    assert result["inverse"] == "integrated -velocity"
    fwd, fwd_affine = (
        _load(out / OUTPUTS["forward_field"])[..., 0, :],
        nib.load(str(out / OUTPUTS["forward_field"])).affine,
    )
    inv, inv_affine = (
        _load(out / OUTPUTS["inverse_field"])[..., 0, :],
        nib.load(str(out / OUTPUTS["inverse_field"])).affine,
    )
    us_label = _load(case["us_label"])
    landmarks = np.array(
        [
            (fwd_affine[:3, :3] @ np.argwhere(us_label[..., k] > 0.5).mean(0) + fwd_affine[:3, 3]) * [-1, -1, 1]
            for k in range(us_label.shape[-1])
            if us_label[..., k].any()
        ]
    )
    moved = landmarks + sample(fwd, fwd_affine, landmarks)
    assert np.linalg.norm(moved - landmarks, axis=-1).max() > 1.0
    back = moved + sample(inv, inv_affine, moved)
    assert np.linalg.norm(back - landmarks, axis=-1).max() <= 0.5
    # the ANTs inverse of result.json / docs/pipeline.md, with antspyx's defaults and with the listed
    # whichtoinvert, equals the composed inverse field; R^-1 first with the defaults (inverted twice) does not
    moving_ants, fixed_ants = ants.image_read(str(case["mr_image"])), ants.image_read(str(case["us_image"]))
    reference = ants.apply_transforms(moving_ants, fixed_ants, [str(out / OUTPUTS["inverse_field"])]).numpy()
    span, files = np.ptp(reference), [str(out / name) for name in result["ants_inverse"]]
    for kwargs in ({}, {"whichtoinvert": result["ants_inverse_whichtoinvert"]}):
        assert (
            np.abs(ants.apply_transforms(moving_ants, fixed_ants, files, **kwargs).numpy() - reference).mean()
            <= 0.01 * span
        )
    twice = [str(out / OUTPUTS["ants_rigid_inverse"]), str(out / OUTPUTS["ants_inverse_warp"])]
    assert np.abs(ants.apply_transforms(moving_ants, fixed_ants, twice).numpy() - reference).mean() > 0.03 * span


def test_rigid_only_and_no_silent_overwrite(case, tmp_path):
    rigid = np.eye(4)
    rigid[:3, 3] = [3.0, -2.0, 1.0]
    out = tmp_path / "rigid"
    result = register_pair(case["mr_image"], case["us_image"], out, case["mr_label"], rigid=rigid)
    assert result["deformable"].startswith("none")
    field = _load(out / OUTPUTS["forward_field"])[..., 0, :]
    np.testing.assert_allclose(field, np.broadcast_to([3.0, -2.0, 1.0], field.shape), atol=1e-5)
    before = (out / OUTPUTS["warped_image"]).stat().st_mtime_ns
    with pytest.raises(FileExistsError):
        register_pair(case["mr_image"], case["us_image"], out, case["mr_label"], rigid=rigid)
    assert (out / OUTPUTS["warped_image"]).stat().st_mtime_ns == before
    register_pair(case["mr_image"], case["us_image"], out, case["mr_label"], rigid=np.eye(4), overwrite=True)
    np.testing.assert_allclose(_load(out / OUTPUTS["forward_field"]), 0.0, atol=1e-6)


@pytest.mark.full
def test_inference_config_runs_on_a_phantom_folder(case, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "inference"
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "configs/inference.json",
        "--dataset_dir",
        str(case["root"]),
        "--split",
        "train",
        "--output_dir",
        str(out),
        "--spatial_size",
        "[32,40,24]",
        "--use_rigid",
        "False",
        "--roi_mask",
        "False",
        "--use_seg",
        "False",  # no segmenter here: whole images, no ROI
        "--checkpoint",
        str(tmp_path / "untrained.pt"),
    ]
    # a checkpoint that does not exist (a typo) stops the run before any output, naming the file
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "untrained.pt: checkpoint does not exist" in done.stderr
    assert not out.exists() or not any(out.iterdir())
    # the shipped weights are for another grid: the network's initial weights, saved as a checkpoint
    from conftest import initial_weights

    initial_weights(tmp_path / "untrained.pt", spatial_size=[32, 40, 24])
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / CASE / "result.json").read_text())
    assert result["direction"] == "mr2us" and result["network_box"]["shape"] == [32, 40, 24]
    assert sorted(p.name for p in (out / CASE).iterdir()) == sorted(OUTPUTS.values())


class AutocastProbe(torch.nn.Module):
    """Records whether it ran under bfloat16 autocast; returns a constant one-voxel shift along the first axis
    (a direct-DDF network of the contract: no velocity, no integrator)."""

    integrate = None

    def forward_train(self, image):
        self.autocast = torch.is_autocast_enabled(image.device.type)
        self.dtype = torch.get_autocast_dtype(image.device.type)
        ddf = torch.zeros(image.shape[0], 3, *image.shape[2:], device=image.device)
        ddf[:, 0] = 1.0
        return {"ddf": ddf, "velocity": None, "features": None}

    def forward(self, image):
        return self.forward_train(image)["ddf"]


@pytest.mark.parametrize("amp", [False, "true"])
def test_amp_runs_the_network_under_bf16_autocast(case, tmp_path, amp):
    probe = AutocastProbe()
    register_pair(
        case["mr_image"],
        case["us_image"],
        tmp_path / "amp",
        None,
        network=probe,
        spatial_size=SIZE,
        depth_crop=CROP,
        rigid=np.eye(4),
        amp=amp,
    )
    assert probe.autocast == (amp == "true")
    if probe.autocast:
        assert probe.dtype == torch.bfloat16
    # the network's shift reaches the written field (one box voxel = the box spacing, > 1 mm)
    assert np.abs(_load(tmp_path / "amp" / OUTPUTS["forward_field"])).max() > 1.0


def test_registrar_stages_work_alone(case, tmp_path):
    """Each stage of Registrar.register on its own: the pair stage's inputs, the network's field and its inverse
    (exp(-v) undoes exp(v) at the box points), the masks rule with given masks, the label binarisation."""
    from scipy.ndimage import map_coordinates

    from scripts.inference.pair import PairStage
    from scripts.inference.registrar import Registrar
    from scripts.inference.timing import StageTimer

    pair = PairStage(SIZE, depth_crop=CROP, use_rigid=False)
    moving, fixed = pair.read(case["mr_image"], "moving image"), pair.read(case["us_image"], "fixed image")
    rigid, info = pair.rigid(case["us_image"], case["mr_image"])
    assert np.array_equal(rigid, np.eye(4)) and info == {"method": "none"}
    box = pair.box(moving, fixed, rigid)
    inputs = pair.inputs(moving, fixed, rigid, box)
    assert inputs.shape == (2, *SIZE) and inputs.min() == 0 and inputs.max() == 1  # percentiles 1–99, clipped

    registrar = Registrar(ContentNet(), pair)
    ddf, inverse = registrar._predict(inputs[None])
    assert ddf.shape == inverse.shape == (3, *SIZE) and np.abs(ddf).max() > 0.5  # voxels: it deforms
    index = np.stack(np.meshgrid(*[np.arange(s) for s in SIZE], indexing="ij"), -1).reshape(-1, 3)
    there = index + ddf.reshape(3, -1).T  # p + u(p), box voxels
    inside = np.all((there >= 1) & (there <= np.asarray(SIZE) - 2), axis=1)
    w = np.stack([map_coordinates(inverse[c], there[inside].T, order=1) for c in range(3)], -1)  # w(p + u(p))
    assert np.percentile(np.linalg.norm(there[inside] + w - index[inside], axis=1), 95) < 0.1  # voxels

    called = []
    registrar.segmenter = lambda image: called.append(image)
    masks, sources = registrar._masks(
        tmp_path, "m.nii.gz", "f.nii.gz", case["mr_label"], case["us_label"], StageTimer()
    )
    assert called == [] and sources == {"moving": "given", "fixed": "given"} and masks["moving"] == case["mr_label"]
    soft = np.zeros((2, 2, 2, 2))
    soft[0, 0, 0] = [0.5, 0.49]
    assert registrar._binarise(soft)[0, 0, 0].tolist() == [True, False]
