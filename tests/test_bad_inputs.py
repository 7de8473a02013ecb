"""Bad-input matrix through the public entry points: each bad input gives one line naming the file and the
problem, exit status 2, no traceback, and no outputs (docs/reliability.md lists the rows and messages).

Most rows call the CLI's ``main`` in-process (``python -m scripts ...``); three rows run a real subprocess to
prove the exit status and the absence of a traceback: the CLI, and ``python -m scripts run`` (the bundle
runner wrapper) with ``configs/train.json`` and ``configs/inference.json``.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import ENV, GRID, MR_AFFINE, ROOT, SMALL, US_AFFINE, register, small_net, write_case
from monai.bundle import ConfigParser
from monai.networks.nets import UNet

from scripts.__main__ import main
from scripts.data.nifti import InputError, user_error
from scripts.networks.registration import RegistrationNet
from scripts.weights.manifest import write_manifest
from scripts.weights.trained_model import load_weights


def save(data, affine, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


def folder(t, change, split="holdout"):
    """A one-case μ-RegPro folder with ``change(paths)`` applied; returns its root."""
    paths = write_case(t / "data", split, "case000000")
    change({k: str(v) for k, v in paths.items()})
    return str(t / "data")


def image(path):
    img = nib.load(path)
    return np.asarray(img.dataobj), img.affine


# ---------------------------------------------------------------- the matrix: (argv, message regex) per row
# each builder gets (tmp folder, base) and returns (argv, regex of the message, output folder)


def _missing(t, b):
    return register(b, t / "out", moving=str(t / "nope.nii.gz")), r"nope\.nii\.gz: moving image file does not exist"


def _image_2d(t, b):
    flat = save(np.random.default_rng(0).random((12, 14), dtype=np.float32), MR_AFFINE, t / "flat.nii.gz")
    return register(b, t / "out", moving=flat), r"flat\.nii\.gz: moving image has 2 dimensions \(12, 14\), expected 3"


def _label_channels(t, b):
    def change(p):
        data, affine = image(p["us_label"])
        save(data[..., :5], affine, p["us_label"])

    argv = ["register-folder", folder(t, change), str(t / "out"), "--config-file", b["config"], "--use-rigid", "False"]
    return argv, r"us_labels/case000000\.nii\.gz: has 5 label channels but \S+mr_labels/case000000\.nii\.gz has 6"


def _label_grid(t, b):
    labels = save(np.ones((6, 6, 6, 6), np.uint8), MR_AFFINE, t / "labels.nii.gz")
    return (
        register(b, t / "out", labels=labels),
        r"labels\.nii\.gz: label grid differs from the moving image's \(\S+mr_images",
    )


def _case_lists(t, b):
    def change(p):
        save(image(p["mr_image"])[0], MR_AFFINE, Path(p["mr_image"]).with_name("case000001.nii.gz"))

    argv = ["register-folder", folder(t, change), str(t / "out"), "--config-file", b["config"], "--use-rigid", "False"]
    return argv, r"us_images/case000001\.nii\.gz: missing, but \S+mr_images/case000001\.nii\.gz exists"


def _case_lists_datalist(t, b):
    argv, _ = _case_lists(t, b)
    return ["datalist", argv[1], str(t / "out" / "datalist.json")], r"us_images/case000001\.nii\.gz: missing, but"


def _nan(t, b):
    data, affine = image(b["mr_image"])
    data = data.copy()
    data[3, 4, 5] = np.nan
    return (
        register(b, t / "out", moving=save(data, affine, t / "nan.nii.gz")),
        r"nan\.nii\.gz: moving image contains 1 NaN/Inf voxels",
    )


def _inf(t, b):
    data, affine = image(b["us_image"])
    data = data.copy()
    data[0, 0, 0], data[1, 1, 1] = np.inf, -np.inf
    return (
        register(b, t / "out", fixed=save(data, affine, t / "inf.nii.gz")),
        r"inf\.nii\.gz: fixed image contains 2 NaN/Inf voxels",
    )


def _empty_gland(t, b):
    def change(p):
        data, affine = image(p["mr_label"])
        data = data.copy()
        data[..., 0] = 0
        save(data, affine, p["mr_label"])

    argv = ["register-folder", folder(t, change), str(t / "out"), "--config-file", b["config"], "--use-rigid", "False"]
    return argv, r"mr_labels/case000000\.nii\.gz: gland label \(channel 0\) is empty"


def _constant(t, b):
    flat = save(np.full((10, 12, 9), 7.0, np.float32), US_AFFINE, t / "constant.nii.gz")
    return register(b, t / "out", fixed=flat), r"constant\.nii\.gz: fixed image is constant \(every voxel is 7\)"


def _truncated(t, b):
    whole = Path(b["mr_image"]).read_bytes()
    (t / "cut.nii.gz").write_bytes(whole[: len(whole) // 2])
    return (
        register(b, t / "out", moving=str(t / "cut.nii.gz")),
        r"cut\.nii\.gz: cannot read the voxel data of the moving image",
    )


def _not_nifti(t, b):
    (t / "notes.nii.gz").write_text("this is not an image\n")
    return register(b, t / "out", moving=str(t / "notes.nii.gz")), r"notes\.nii\.gz: cannot read moving image as NIfTI"


def _no_overlap(t, b):
    data, affine = image(b["us_image"])
    far = affine.copy()
    far[:3, 3] += [500.0, 0.0, 0.0]  # 500 mm away; no rigid step to bring it back
    fixed = save(data, far, t / "far.nii.gz")
    regex = r"mr_images/case000000\.nii\.gz: field of view does not overlap that of \S+far\.nii\.gz after the rigid"
    return register(b, t / "out", fixed=fixed), regex


def _corrupt_checkpoint(t, b):
    (t / "corrupt.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    argv = register(b, t / "out", None, None, None, "--checkpoint", str(t / "corrupt.pt"))
    return argv, r"corrupt\.pt: not a readable weights-only checkpoint"


def _mismatched_checkpoint(t, b):
    torch.save(UNet(3, 1, 2, (4, 8), (2,)).state_dict(), t / "unet.pt")
    argv = register(b, t / "out", None, None, None, "--checkpoint", str(t / "unet.pt"))
    return argv, r"unet\.pt: weights do not fit this RegistrationNet \(\d+ missing, \d+ unexpected, 0 wrong-shape"


def _qc_key(t, b):
    argv = register(b, t / "out", None, None, None, "--qc", "{min_glnd_dice: 0.8}")
    return argv, r"--qc: unknown threshold 'min_glnd_dice' \(did you mean 'min_gland_dice'\?\)"


def _qc_value(t, b):
    return (
        register(b, t / "out", None, None, None, "--qc", "{min_gland_dice: high}"),
        r"--qc: min_gland_dice must be a number",
    )


def _fixed_gland_grid(t, b):
    gland = save(np.ones((6, 6, 6), np.uint8), US_AFFINE, t / "gland.nii.gz")
    argv = register(b, t / "out", None, None, None, "--fixed-gland", gland)
    return argv, r"gland\.nii\.gz: fixed gland mask is not on the fixed image's grid \(\S+us_images"


def _points_without_frame(t, b):
    (t / "targets.csv").write_text("label,x,y,z\nlesion,1,2,3\n")
    argv = register(b, t / "out", None, None, None, "--points", str(t / "targets.csv"))
    return argv, r"targets\.csv: the coordinate frame of the points is not stated"


def _mistyped_flag(t, b):
    return register(b, t / "out", None, None, None, "--use-rigid", "flase"), r"use_rigid must be true or false"


def _uncreatable_output(t, b):
    (t / "file").write_text("a file, not a folder")
    return (
        register(b, t / "file" / "out"),
        r"file/out: cannot create the output folder \(\S+/file is a file, not a folder\)",
    )


def _gland_channel(t, b):
    argv = [
        "evaluate",
        str(b["root"] / "good"),
        "--split",
        "holdout",
        "--method",
        "identity",
        "--out",
        str(t / "out"),
        "--gland_channel",
        "9",
    ]
    return argv, r"holdout/us_labels/case000000\.nii\.gz: has 6 label channels, so there is no gland_channel 9"


def _no_orientation(t, b):
    img = nib.load(b["mr_image"])
    bare = nib.Nifti1Image(np.asarray(img.dataobj), None)  # no affine: qform_code = sform_code = 0
    bare.header.set_zooms(img.header.get_zooms())
    nib.save(bare, str(t / "bare.nii.gz"))
    return register(b, t / "out", moving=str(t / "bare.nii.gz")), r"bare\.nii\.gz: moving image has no orientation"


def _sform_qform_disagree(t, b):
    img = nib.load(b["us_image"])
    both = nib.Nifti1Image(np.asarray(img.dataobj), img.affine)
    shifted = img.affine.copy()
    shifted[:3, 3] += 5.0
    both.set_sform(img.affine, code=2)
    both.set_qform(shifted, code=1)
    nib.save(both, str(t / "both.nii.gz"))
    regex = r"both\.nii\.gz: fixed image's sform \(code 2\) and qform \(code 1\) disagree"
    return register(b, t / "out", fixed=str(t / "both.nii.gz")), regex


def _one_slice(t, b):
    data, affine = image(b["us_image"])
    thin = save(data[..., :1], affine, t / "thin.nii.gz")  # no rigid step: the pipeline's own read must refuse
    return register(b, t / "out", fixed=thin), r"thin\.nii\.gz: fixed image has 1 voxel along axis 2"


def _mistyped_flag_name(t, b):
    return (
        register(b, t / "out", None, None, None, "--overwirte"),
        r"--overwirte: not an argument of this command \(did you mean --overwrite\?\)",
    )


def _label_value(value, regex):
    def row(t, b):
        data, affine = image(b["mr_label"])
        labels = save(np.full(data.shape[:3], value, np.float32), affine, t / "odd.nii.gz")
        return register(b, t / "out", labels=labels), regex

    return row


def _out_is_a_file(t, b):
    (t / "afile").write_text("mine")
    return register(b, t / "afile", None, None, None, "--overwrite"), r"afile: is a file, not a folder"


def _out_is_a_symlink(t, b):
    (t / "real").mkdir()
    (t / "link").symlink_to(t / "real")
    return register(b, t / "link"), r"link: is a symbolic link \(to \S+real\)"


def _broken_config(t, b):
    (t / "broken.json").write_text(Path(b["config"]).read_text()[:-20])
    argv = register({**b, "config": str(t / "broken.json")}, t / "out")
    return argv, r"broken\.json: cannot read the config \(JSONDecodeError"


def _direction(t, b):
    return (
        register(b, t / "out", None, None, None, "--direction", "MR2US"),
        r"direction must be one of \['mr2us', 'us2mr'\], got 'MR2US'",
    )


def _folder_as_image(t, b):
    return (
        register(b, t / "out", moving=str(Path(b["mr_image"]).parent)),
        r"mr_images: moving image is a folder, not a file",
    )


def _complex_image(t, b):
    data, affine = image(b["mr_image"])
    moving = save(data.astype(np.complex64), affine, t / "complex.nii.gz")
    return register(b, t / "out", moving=moving), r"complex\.nii\.gz: moving image holds complex voxels \(complex64\)"


def _dice_threshold(t, b):
    return (
        register(b, t / "out", None, None, None, "--qc", "{min_gland_dice: 2}"),
        r"--qc: min_gland_dice is a Dice, between 0 and 1",
    )


ROWS = {
    "missing file": _missing,
    "image not 3-D": _image_2d,
    "label wrong channel count": _label_channels,
    "label on the wrong grid": _label_grid,
    "MR and TRUS case lists differ (register-folder)": _case_lists,
    "MR and TRUS case lists differ (datalist)": _case_lists_datalist,
    "NaN voxels": _nan,
    "Inf voxels": _inf,
    "empty gland label": _empty_gland,
    "constant image": _constant,
    "truncated .nii.gz": _truncated,
    "not a NIfTI file": _not_nifti,
    "fields of view do not overlap": _no_overlap,
    "corrupted checkpoint": _corrupt_checkpoint,
    "checkpoint of another architecture": _mismatched_checkpoint,
    "mistyped --qc threshold": _qc_key,
    "non-numeric --qc threshold": _qc_value,
    "--fixed-gland on another grid": _fixed_gland_grid,
    "point CSV without a frame": _points_without_frame,
    "mistyped yes/no value": _mistyped_flag,
    "output folder cannot be created": _uncreatable_output,
    "evaluate: gland channel beyond the labels": _gland_channel,
    "header without orientation codes": _no_orientation,
    "sform and qform disagree": _sform_qform_disagree,
    "one-voxel-thick fixed image, no rigid step": _one_slice,
    "mistyped flag name": _mistyped_flag_name,
    "moving label with a negative value": _label_value(-1.0, r"odd\.nii\.gz: label holds the negative value -1"),
    "moving label with the value 2.5": _label_value(
        2.5, r"odd\.nii\.gz: label holds the value 2\.5, neither in \[0, 1\]"
    ),
    "empty moving label": _label_value(0.0, r"odd\.nii\.gz: gland label \(channel 0\) is empty"),
    "output path is a file": _out_is_a_file,
    "output path is a symbolic link": _out_is_a_symlink,
    "config file that does not parse": _broken_config,
    "unknown direction": _direction,
    "a folder given as an image": _folder_as_image,
    "complex image": _complex_image,
    "Dice threshold above 1": _dice_threshold,
}


@pytest.mark.parametrize("row", list(ROWS))
def test_bad_input_gives_one_line_exit_2_and_no_outputs(row, base, tmp_path, capsys):
    argv, regex = ROWS[row](tmp_path, base)
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert re.search(regex, errors[0]), errors[0]
    assert not (tmp_path / "out").exists()  # nothing written, not even the folder
    assert not list(tmp_path.glob(".*staging*"))


def test_existing_output_folder_is_refused_and_left_unchanged(base, tmp_path, capsys):
    out = tmp_path / "out"
    main(register(base, out))  # a first, successful registration
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    assert len(before) >= 10
    with pytest.raises(SystemExit) as stop:
        main(register(base, out))
    assert stop.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"error: {re.escape(str(out))}: already exists \(\d+ files\); pass overwrite=True \(CLI: "
        r"--overwrite\) to replace it",
        line,
    )
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before


# ---------------------------------------------------------------- subprocesses: exit status 2, no traceback


def _run(args, timeout=300):
    proc = subprocess.run(
        [sys.executable, "-m", "scripts", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout
    )
    return proc.returncode, proc.stderr


@pytest.mark.full
def test_cli_subprocess_exits_2_without_traceback(base, tmp_path):
    rc, err = _run(register(base, tmp_path / "out", moving=str(tmp_path / "nope.nii.gz")))
    assert rc == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == f"error: {tmp_path / 'nope.nii.gz'}: moving image file does not exist"
    assert not (tmp_path / "out").exists()


@pytest.mark.full
def test_run_without_a_config_says_how_to_call_it():
    rc, err = _run(["run"])
    assert rc == 2 and err.strip() == (
        "error: no --config_file: python -m scripts run [RUN_ID] --config_file FILE [--id value ...] takes the "
        "arguments of python -m monai.bundle run"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "scripts", "run", "--help"], cwd=ROOT, env=ENV, capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m scripts run [RUN_ID] --config_file")


@pytest.mark.full
def test_training_config_bad_data_exits_2_and_writes_no_run_folder(tmp_path):
    """``python -m scripts run training --config_file configs/train.json``: the data are checked before the run
    folder is created (first in ``run``), so a bad case leaves nothing behind."""
    data = folder(tmp_path, lambda p: save(np.zeros((12, 14, 10, 6), np.uint8), MR_AFFINE, p["mr_label"]), "train")
    rc, err = _run(
        [
            "run",
            "training",
            "--config_file",
            "configs/train.json",
            "--dataset_dir",
            data,
            "--run_dir",
            str(tmp_path / "run"),
        ]
    )
    assert rc == 2 and "Traceback" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line == f"error: {tmp_path}/data/train/mr_labels/case000000.nii.gz: gland label (channel 0) is empty"
    assert not (tmp_path / "run").exists()


@pytest.mark.full
def test_training_without_a_val_split_stops_before_any_preprocessing(tmp_path):
    """Both splits are listed before the pre-stage cache is filled: a missing ``val/`` costs seconds, not the
    whole train split's pre-processing, and leaves no run folder and nothing cached."""
    data = folder(tmp_path, lambda p: None, "train")
    rc, err = _run(
        [
            "run",
            "training",
            "--config_file",
            "configs/train.json",
            "--dataset_dir",
            data,
            "--run_dir",
            str(tmp_path / "runs" / "run"),
        ]
    )
    assert rc == 2 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == f"error: {tmp_path}/data/val: split folder does not exist"
    assert not (tmp_path / "runs" / "run").exists()
    assert not any((tmp_path / "runs" / "prestage_cache").iterdir())  # PersistentDataset made it; nothing cached


@pytest.mark.full
def test_inference_config_nan_image_exits_2_without_traceback(base, tmp_path):
    data, affine = image(base["mr_image"])
    data = data.copy()
    data[0, 0, 0] = np.nan
    moving = save(data, affine, tmp_path / "nan.nii.gz")
    rc, err = _run(
        [
            "run",
            "--config_file",
            base["config"],
            "--moving",
            moving,
            "--fixed",
            base["us_image"],
            "--output_dir",
            str(tmp_path / "out"),
            "--use_rigid",
            "False",
            "--roi_mask",
            "False",
            "--bundle_root",
            str(ROOT),
        ]
    )
    assert rc == 2 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == f"error: {moving}: moving image contains 1 NaN/Inf voxels"
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- trusted weights


def test_tampered_listed_weights_are_refused_before_loading(tmp_path):
    """A weight file listed in large_files.yml must match its SHA-256, through load_weights and inference.json's
    ``network`` (where the config loads its weights); an unlisted (locally trained) file loads."""
    (tmp_path / "models").mkdir()
    weights = tmp_path / "models" / "model.pt"
    torch.save(small_net().state_dict(), weights)
    write_manifest(tmp_path)
    assert isinstance(load_weights(small_net(), weights, bundle_root=tmp_path), RegistrationNet)  # the listed hash

    state = torch.load(weights, weights_only=True)
    next(v for v in state.values() if v.is_floating_point()).add_(1.0)  # replaced, still the right architecture
    torch.save(state, weights)
    message = rf"{re.escape(str(weights))}: sha256 differs from large_files\.yml; the file is corrupt or replaced"
    with pytest.raises(InputError, match=message):
        load_weights(small_net(), weights, bundle_root=tmp_path)

    shutil.copytree(ROOT / "configs", tmp_path / "configs")  # the bundle root's configs (its pair stage)
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    parser["network_def"].update(SMALL)
    parser.update({"bundle_root": str(tmp_path), "spatial_size": GRID, "use_seg": False})
    with pytest.raises(RuntimeError) as wrapped:
        parser.get_parsed_content("network")
    assert re.fullmatch(message, str(user_error(wrapped.value)))

    unlisted = tmp_path / "mine.pt"
    torch.save(state, unlisted)
    assert isinstance(load_weights(small_net(), unlisted, bundle_root=tmp_path), RegistrationNet)


# ---------------------------------------------------------------- numerical safety


def test_bf16_autocast_gives_finite_losses_and_gradients_even_with_an_empty_gland():
    """Network forward under CPU bf16 autocast, then the fp32 loss; sample 1 has no gland anywhere, so its MI
    region is empty (MI exactly 0 there, tests/test_losses.py checks the value): every number stays finite."""
    from scripts.training.losses import RegistrationLoss, composite_loss

    net = small_net()
    torch.manual_seed(1)
    image = torch.rand(2, 2, *GRID)
    labels = (torch.rand(2, 2, 2, *GRID) > 0.5).float()  # (moving/fixed, N, C, H, W, D)
    labels[:, 1] = 0.0  # sample 1: empty moving and fixed glands
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net.forward_train(image)
        terms = RegistrationLoss(chunks=SMALL["chunks"])(out["ddf"], image[:, :1], image[:, 1:], labels[0], labels[1])
    loss = composite_loss(terms)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(torch.isfinite(terms[k]).all() for k in ("reg", "smooth", "dice", "mi", "grad"))
    assert torch.all(terms["reg"][1] == 0.0)  # sample 1: Dice loss 0 (empty vs empty, smoothed) and MI 0
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
