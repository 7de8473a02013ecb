"""End-to-end evaluation on a tiny hand-made μ-RegPro-layout folder (2 cases, 3 label channels)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import initial_weights

from scripts.data.nifti import InputError
from scripts.evaluation.evaluate import ddf_to_voxels, evaluate

ROOT = Path(__file__).resolve().parents[1]
MR_SHAPE, US_SHAPE = (14, 12, 10), (10, 12, 10)
MR_AFFINE = np.eye(4)  # 1 mm voxels at the origin
US_AFFINE = np.eye(4)
US_AFFINE[0, 3] = 3.0  # TRUS index i is the world point i + (3, 0, 0) = MR index i + (3, 0, 0)


def _label(shape, gland, *points):
    """(X, Y, Z, C) label: a gland box (x0, x1) x y 3..8 x z 3..7, then one-voxel landmarks (None = empty)."""
    out = np.zeros((*shape, 1 + len(points)), np.float32)
    out[gland[0] : gland[1] + 1, 3:9, 3:8, 0] = 1
    for c, p in enumerate(points, start=1):
        if p is not None:
            out[(*p, c)] = 1
    return out


def _save(data, affine, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))


# case -> (MR label, TRUS label). Case 65: the TRUS labels are the MR labels moved by the affines, so
# "no registration" (physical resampling) is perfect. Case 66: landmark 1 is 3 voxels off in x after
# resampling (MR x = 9 -> TRUS x = 6, TRUS label at 3), landmark 2 is empty in both.
CASES = {
    "case000065": (_label(MR_SHAPE, (5, 8), (6, 5, 5), (7, 7, 4)), _label(US_SHAPE, (2, 5), (3, 5, 5), (4, 7, 4))),
    "case000066": (_label(MR_SHAPE, (5, 8), (9, 5, 5), None), _label(US_SHAPE, (2, 5), (3, 5, 5), None)),
}


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "data"
    for case, (mr, us) in CASES.items():
        name = f"{case}.nii.gz"
        _save(np.ones(MR_SHAPE, np.float32), MR_AFFINE, root / "val" / "mr_images" / name)
        _save(np.ones(US_SHAPE, np.float32), US_AFFINE, root / "val" / "us_images" / name)
        _save(mr, MR_AFFINE, root / "val" / "mr_labels" / name)
        _save(us, US_AFFINE, root / "val" / "us_labels" / name)
    return root


def _copy_fixed_labels(dataset, folder, direction):
    """Stored 'warped' labels equal to the fixed labels: a perfect registration."""
    fixed = "us_labels" if direction == "mr2us" else "mr_labels"
    for path in (dataset / "val" / fixed).iterdir():
        img = nib.load(str(path))
        _save(np.asarray(img.dataobj), img.affine, folder / path.name)
    return folder


def _rows(out):
    with open(out / "per_case.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("direction", ["mr2us", "us2mr"])
def test_perfect_warped_labels(dataset, tmp_path, direction):
    warped = _copy_fixed_labels(dataset, tmp_path / "warped", direction)
    out = tmp_path / "eval"
    summary = evaluate(dataset, "val", direction, warped_dir=str(warped), out=str(out))
    saved = json.loads((out / "summary.json").read_text())
    assert saved == summary
    assert (saved["mode"], saved["direction"], saved["method"]) == ("official", direction, "warped")
    assert saved["n_cases"] == 2
    m = saved["metrics"]
    assert (m["DSC"], m["RDSC"], m["TRE"], m["RTRE"], m["RTs"], m["HD95"]) == (1.0, 1.0, 0.0, 0.0, 0.0, 0.0)
    # references in raw indices of the two grids: glands x 5..8 (MR) and 2..5 (TRUS): centroids 6 and 3 ->
    # error 3 // 3 = 1 in both cases; landmark 1 at MR x = 6 / 9 vs TRUS x = 3 -> 1 and 2; landmark 2 -> 1 / 0.
    # Per-case TRE_0: sqrt((1+1+1)//3) = 1 and sqrt((1+4+0)//3) = 1.
    assert saved["references"]["TRE_0"] == pytest.approx(1.0)
    assert saved["references"]["HD95_0"] > 0
    assert m["score"] == pytest.approx(1.0)  # every term at its best
    # clinical TRE: 3 landmarks used, landmark 2 of case 66 empty in the fixed label
    clin = saved["clinical"]
    assert (clin["tre_mm_mean"], clin["n_landmarks_used"], clin["n_landmarks_excluded_empty_fixed"]) == (0.0, 3, 1)
    rows = _rows(out)
    assert [r["case"] for r in rows] == ["case000065", "case000066"]
    assert [float(r["dsc"]) for r in rows] == [1.0, 1.0]
    assert [float(r["tre"]) for r in rows] == [0.0, 0.0]
    assert (out / "boxplots.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_identity_baseline_resamples_through_the_affines(dataset, tmp_path):
    out = tmp_path / "identity"
    summary = evaluate(dataset, "val", "mr2us", method="identity", mode="float", out=str(out))
    rows = _rows(out)
    # case 65 is aligned by the affines alone; case 66's landmark 1 is 3 voxels (3 mm) off in x
    assert [float(r["dsc"]) for r in rows] == pytest.approx([1.0, 1.0])
    assert [float(r["error_ch1"]) for r in rows] == pytest.approx([0.0, 1.0])  # float: 3 / 3
    assert [float(r["tre_mm"]) for r in rows] == pytest.approx([0.0, 3.0])
    assert summary["clinical"]["tre_mm_mean"] == pytest.approx(1.5)
    # channels 0 and 2 have error 0 in both cases and are dropped: per-case TRE = landmark-1 error
    assert summary["kept_channels"] == [1]
    assert summary["metrics"]["TRE"] == pytest.approx(0.5)
    assert summary["mode"] == "float"


def test_model_predictor_with_fields(dataset, tmp_path):
    # a predictor returning the fixed labels and a zero field (on-disk convention: (X, Y, Z, 1, 3) LPS mm)
    def predictor(case):
        fixed = np.moveaxis(np.asarray(nib.load(case["fixed_label"]).dataobj, dtype=np.float64), -1, 0)
        return {"warped_label": fixed, "ddf": np.zeros((*US_SHAPE, 1, 3))}

    truth = np.zeros((*US_SHAPE, 1, 3), np.float32)
    truth[..., 0, 0], truth[..., 0, 1] = -3.0, 4.0  # LPS (-3, 4, 0) mm: 5 mm long
    for case in CASES:
        _save(truth, US_AFFINE, tmp_path / "truth" / f"{case}.nii.gz")
    out = tmp_path / "model"
    truth_dir = str(tmp_path / "truth")
    summary = evaluate(dataset, "val", method="model", predictor=predictor, true_ddf_dir=truth_dir, out=str(out))
    assert summary["regularity"] == {"jacobian_nonpositive_pct_mean": 0.0, "log_jacobian_std_mean": 0.0}
    assert summary["field_error"]["ddf_error_mean_mm_mean"] == pytest.approx(5.0)
    assert summary["metrics"]["DSC"] == 1.0


def test_ddf_to_voxels():
    # LPS (1, 2, 3) mm -> RAS (-1, -2, 3) mm -> voxels of a 2 mm grid: (-0.5, -1, 1.5)
    ddf = np.broadcast_to(np.array([1.0, 2.0, 3.0]), (2, 2, 2, 1, 3))
    vox = ddf_to_voxels(ddf, np.diag([2.0, 2.0, 2.0, 1.0]))
    assert vox.shape == (3, 2, 2, 2)
    assert vox[:, 0, 0, 0] == pytest.approx([-0.5, -1.0, 1.5])


def test_refuses_to_overwrite(dataset, tmp_path):
    warped = _copy_fixed_labels(dataset, tmp_path / "warped", "mr2us")
    out = tmp_path / "eval"
    evaluate(dataset, warped_dir=str(warped), out=str(out))
    before = (out / "summary.json").read_text()
    with pytest.raises(FileExistsError, match="summary.json"):
        evaluate(dataset, warped_dir=str(warped), out=str(out), mode="float")
    assert (out / "summary.json").read_text() == before
    evaluate(dataset, warped_dir=str(warped), out=str(out), mode="float", overwrite=True)
    assert json.loads((out / "summary.json").read_text())["mode"] == "float"


def test_missing_or_misplaced_warped_label(dataset, tmp_path):
    warped = _copy_fixed_labels(dataset, tmp_path / "warped", "mr2us")
    (warped / "case000066.nii.gz").unlink()
    with pytest.raises(InputError, match="case000066.nii.gz"):
        evaluate(dataset, warped_dir=str(warped), out=str(tmp_path / "a"))
    # a label on the moving (MR) grid instead of the fixed grid
    _save(CASES["case000066"][0], MR_AFFINE, warped / "case000066.nii.gz")
    with pytest.raises(InputError, match="not on the fixed image's grid"):
        evaluate(dataset, warped_dir=str(warped), out=str(tmp_path / "b"))


@pytest.mark.full
def test_config_runs_through_the_monai_bundle_runner(dataset, tmp_path):
    warped = _copy_fixed_labels(dataset, tmp_path / "warped", "mr2us")
    out = tmp_path / "bundle_eval"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "evaluating", "--config_file", "configs/evaluate.json"]
    cmd += ["--dataset_dir", str(dataset), "--warped_dir", str(warped), "--eval_dir", str(out), "--mode", "float"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["mode"], summary["direction"], summary["metrics"]["DSC"]) == ("float", "mr2us", 1.0)


@pytest.mark.full
def test_override_of_the_inference_config_registers_then_scores(tmp_path):
    """evaluate.json merged on inference.json: ``evaluating_model`` registers the split, then scores the outputs.

    The network keeps its initial weights (a field of ~1e-5 voxels) and the rigid step is off, so the warped
    labels are the moving labels resampled through the affines: the score must match the identity method's.
    """
    from scripts.phantom.synth import synth

    synth(tmp_path / "data", cases=3, seed=0, size="small", preview=False)  # one case per split
    files = "['configs/inference.json','configs/evaluate.json']"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "evaluating_model", "--config_file", files]
    cmd += [
        "--dataset_dir",
        str(tmp_path / "data"),
        "--output_dir",
        str(tmp_path / "registered"),
        "--eval_dir",
        str(tmp_path / "eval"),
        "--checkpoint",
        str(initial_weights(tmp_path / "untrained.pt", spatial_size=[24, 24, 24])),
        "--use_rigid",
        "False",
        "--roi_mask",
        "False",
        "--use_seg",
        "False",
        "--spatial_size",
        "[24,24,24]",
        "--mode",
        "float",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    case = next((tmp_path / "data" / "val" / "mr_images").iterdir()).name.split(".")[0]
    assert (tmp_path / "registered" / case / "warped_label.nii.gz").is_file()
    model = json.loads((tmp_path / "eval" / "summary.json").read_text())
    identity = evaluate(str(tmp_path / "data"), split="val", method="identity", mode="float", out=str(tmp_path / "id"))
    assert model["split"] == "val" and model["n_cases"] == 1
    # the pipeline thresholds its warped labels at 0.5, the identity baseline keeps them soft
    assert model["metrics"]["DSC"] == pytest.approx(identity["metrics"]["DSC"], abs=0.03)
    assert model["regularity"]["jacobian_nonpositive_pct_mean"] == 0.0
