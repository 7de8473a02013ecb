"""The biopsy command line (scripts/tools/cli.py via ``python -m scripts``): register, register-folder, map-points,
and the HTML index opened in headless Chromium (``apt-get install -y chromium``)."""

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import SMALL
from matplotlib.image import imread

from scripts.__main__ import main
from scripts.networks.registration import RegistrationNet
from scripts.phantom.synth import generate_case, write_case

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
PICTURES = ("qa_contours.png", "qa_checkerboard.png", "qa_grid.png")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """train/case000000: a true phantom pair; train/case000001: MR of phantom case 1 with TRUS of case 2 (swapped)."""
    root = tmp_path_factory.mktemp("cli")
    write_case(generate_case(0, 0, "small"), root / "data", "train", "case000000", preview=False)
    one, two = generate_case(0, 1, "small"), generate_case(0, 2, "small")
    swapped = {**two, "mr_image": one["mr_image"], "mr_label": one["mr_label"], "mr_affine": one["mr_affine"]}
    write_case(swapped, root / "data", "train", "case000001", preview=False)
    config = json.loads((ROOT / "configs" / "inference.json").read_text())
    config["checkpoint"] = str(root / "no_such_model.pt")  # the default checkpoint is missing: rigid-only fallback
    config["use_seg"] = False  # the glands come from the labels here, not from the shipped segmenter
    (root / "rigid_only.json").write_text(json.dumps(config))
    return {"root": root, "data": root / "data", "train": root / "data" / "train", "config": root / "rigid_only.json"}


def _case(d, name):
    return {k: str(d / f"{k}s" / f"{name}.nii.gz") for k in ("mr_image", "us_image", "mr_label", "us_label")}


@pytest.mark.full
def test_register_command_writes_outputs_qc_and_mapped_points(dataset, tmp_path):
    case = _case(dataset["train"], "case000000")
    targets = tmp_path / "targets.csv"
    targets.write_text("label,x,y,z\nlesion 1,1.5,-2.0,3.0\nlesion 2,-4.0,0.5,-1.0\n")
    out = tmp_path / "out"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts",
            "register",
            "--moving",
            case["mr_image"],
            "--fixed",
            case["us_image"],
            "--out",
            str(out),
            "--moving-labels",
            case["mr_label"],
            "--points",
            str(targets),
            "--frame",
            "RAS",
            "--direction",
            "mr2us",
            "--fixed-gland",
            case["us_label"],
            "--config-file",
            str(dataset["config"]),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr
    assert "no trained weights" in run.stderr and "RIGID step only" in run.stderr
    listed = [line.strip() for line in run.stdout.splitlines() if line.startswith("  ")]
    for name in (
        "warped_image.nii.gz",
        "warped_label.nii.gz",
        "transform_moving_to_fixed.h5",
        "qc.json",
        "targets_to_fixed.csv",
        *PICTURES,
    ):
        assert str(out / name) in listed
    assert all(Path(p).is_file() for p in listed)
    qc = json.loads((out / "qc.json").read_text())
    assert f"out: QC {qc['verdict']}" in run.stdout + run.stderr
    assert qc["metrics"]["gland_source"] == "given" and qc["metrics"]["gland_dice"] is not None
    with open(out / "targets_to_fixed.csv") as f:
        assert [row["label"] for row in csv.DictReader(f)] == ["lesion 1", "lesion 2"]
    assert json.loads((out / "result.json").read_text())["deformable"] == "none (rigid only)"


def test_register_folder_fails_the_swapped_case_only(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:  # every case is written, then the run exits 3 for the failed one
        main(
            [
                "register-folder",
                str(dataset["data"]),
                str(out),
                "--split",
                "train",
                "--gland",
                "label",
                "--config-file",
                str(dataset["config"]),
            ]
        )
    assert stop.value.code == 3
    captured = capsys.readouterr()
    verdicts = {c: json.loads((out / c / "qc.json").read_text())["verdict"] for c in ("case000000", "case000001")}
    assert verdicts == {"case000000": "pass", "case000001": "fail"}
    assert "ERROR case000001: QC fail" in captured.err and "case000000: QC pass" in captured.out
    assert "2/2" in captured.err  # the tqdm progress bar
    assert "1 pass, 0 warn, 1 fail" in captured.out
    for c in verdicts:
        assert all((out / c / p).is_file() for p in PICTURES)
    page = (out / "index.html").read_text()
    assert 'src="case000001/qa_grid.png"' in page  # relative links
    _check_index_in_chromium(out, tmp_path)


def _chromium(args, profile):
    assert Path(CHROMIUM).is_file(), "CI must install Chromium: apt-get install -y chromium"
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _check_index_in_chromium(out, tmp_path):
    url = (out / "index.html").as_uri()
    dom = _chromium(["--dump-dom", url], tmp_path / "profile1").stdout
    assert 'data-images-loaded="6/6"' in dom
    shot = tmp_path / "index.png"
    _chromium([f"--screenshot={shot}", "--window-size=1200,1600", url], tmp_path / "profile2")
    image = imread(shot)
    assert image.shape[:2] == (1600, 1200) and image[..., :3].std() > 0.05  # a rendered page, not blank
    # the page's own check notices a picture that does not load
    (out / "case000000" / "qa_grid.png").unlink()
    dom = _chromium(["--dump-dom", url], tmp_path / "profile3").stdout
    assert 'data-images-loaded="5/6"' in dom


def _small_network_config(tmp_path) -> Path:
    """inference.json with a tiny seeded network on a 16^3 grid, its weights saved, no segmenter, whole images
    (roi_mask off): ``small.json``."""
    config = json.loads((ROOT / "configs" / "inference.json").read_text())
    config["network_def"].update(SMALL)
    config["spatial_size"] = [16, 16, 16]
    torch.manual_seed(0)
    torch.save(RegistrationNet(**SMALL, spatial_size=(16, 16, 16)).state_dict(), tmp_path / "weights.pt")
    config.update(checkpoint=str(tmp_path / "weights.pt"), use_seg=False, roi_mask=False)
    (tmp_path / "small.json").write_text(json.dumps(config))
    return tmp_path / "small.json"


def test_register_with_weights_runs_the_network(dataset, tmp_path, capsys):
    _small_network_config(tmp_path)
    case = _case(dataset["train"], "case000000")
    main(
        [
            "register",
            "--moving",
            case["mr_image"],
            "--fixed",
            case["us_image"],
            "--out",
            str(tmp_path / "out"),
            "--config-file",
            str(tmp_path / "small.json"),
            "--use-rigid",
            "False",
            "--pictures",
            "False",
        ]
    )
    captured = capsys.readouterr()
    assert "no trained weights" not in captured.err
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["deformable"] == "network" and result["network_box"]["shape"] == [16, 16, 16]
    assert (tmp_path / "out" / "qc.json").is_file() and not (tmp_path / "out" / "qa_grid.png").exists()
    # the same weights, --use-network false: no network; lower-case "false" also switches the rigid step and
    # the pictures off
    main(
        [
            "register",
            "--moving",
            case["mr_image"],
            "--fixed",
            case["us_image"],
            "--out",
            str(tmp_path / "alone"),
            "--config-file",
            str(tmp_path / "small.json"),
            "--use-rigid",
            "false",
            "--use-network",
            "false",
            "--pictures",
            "false",
        ]
    )
    alone = json.loads((tmp_path / "alone" / "result.json").read_text())
    assert not any((tmp_path / "alone" / name).exists() for name in PICTURES)
    assert alone["deformable"] == "none (rigid only)"
    assert np.allclose(alone["rigid"]["matrix_lps_fixed_to_moving"], np.eye(4))


def test_result_json_times_every_stage_and_they_add_up_to_the_wall_time(dataset, tmp_path, capsys):
    _small_network_config(tmp_path)
    (tmp_path / "targets.csv").write_text("# frame: LPS\nlabel,x,y,z\nlesion,1.5,-2.0,3.0\n")
    case = _case(dataset["train"], "case000000")
    start = time.perf_counter()
    main(
        [
            "register",
            "--moving",
            case["mr_image"],
            "--fixed",
            case["us_image"],
            "--out",
            str(tmp_path / "out"),
            "--moving-labels",
            case["mr_label"],
            "--fixed-gland",
            case["us_label"],
            "--points",
            str(tmp_path / "targets.csv"),
            "--config-file",
            str(tmp_path / "small.json"),
        ]
    )
    wall = time.perf_counter() - start
    seconds = json.loads((tmp_path / "out" / "result.json").read_text())["seconds"]
    stages = ("load", "read", "rigid", "box", "network", "resampling", "writing", "qc", "pictures", "points")
    assert set(seconds) == {*stages, "total"} and all(seconds[k] > 0 for k in stages)
    assert sum(seconds[k] for k in stages) == pytest.approx(seconds["total"], rel=0.1)
    assert seconds["total"] == pytest.approx(wall, rel=0.1)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("out: QC"))
    assert f"{seconds['total']:.1f} s: " in line and all(k in line for k in stages)


def test_map_points_command_applies_the_written_rigid(dataset, tmp_path, capsys):
    case = _case(dataset["train"], "case000000")
    out = tmp_path / "reg"
    main(
        [
            "register",
            "--moving",
            case["mr_image"],
            "--fixed",
            case["us_image"],
            "--out",
            str(out),
            "--config-file",
            str(dataset["config"]),
            "--pictures",
            "False",
        ]
    )
    rigid = np.asarray(json.loads((out / "result.json").read_text())["rigid"]["matrix_lps_fixed_to_moving"])
    # fixed-space points (LPS) near the TRUS grid centre; rigid only, so fixed -> moving is p -> R p exactly
    fixed = nib.load(case["us_image"])
    centre = (fixed.affine[:3, :3] @ (np.array(fixed.shape) - 1) / 2 + fixed.affine[:3, 3]) * [-1, -1, 1]
    points = centre + np.array([[0.0, 0.0, 0.0], [3.0, -2.0, 4.0]])
    (tmp_path / "us.csv").write_text(
        "# frame: LPS\nlabel,x,y,z\n" + "".join(f"p{n},{x},{y},{z}\n" for n, (x, y, z) in enumerate(points))
    )
    main(["map-points", str(out), str(tmp_path / "mapped"), "--points", str(tmp_path / "us.csv"), "--to", "moving"])
    assert f"wrote {tmp_path / 'mapped' / 'us_to_moving.csv'}" in capsys.readouterr().out
    with open(tmp_path / "mapped" / "us_to_moving.csv") as f:
        mapped = np.array([[float(r[c]) for c in "xyz"] for r in csv.DictReader(f)])
    np.testing.assert_allclose(mapped, points @ rigid[:3, :3].T + rigid[:3, 3], atol=1e-3)


def test_bad_input_is_one_error_line_and_exit_code_2(dataset, tmp_path, capsys):
    case = _case(dataset["train"], "case000000")
    with pytest.raises(SystemExit) as stop:
        main(
            [
                "register",
                "--moving",
                str(tmp_path / "nope.nii.gz"),
                "--fixed",
                case["us_image"],
                "--out",
                str(tmp_path / "out"),
                "--config-file",
                str(dataset["config"]),
            ]
        )
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and "nope.nii.gz" in err[-1] and "does not exist" in err[-1]
