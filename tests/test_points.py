"""Point, markup and label mapping through written transforms (scripts/spatial/points.py, configs/map_points.json).

Hand-made fields give hand-worked expectations; a phantom case registered with its ground-truth field
checks that MR landmark centres land on their analytic TRUS positions.
"""

import csv
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import register_pair
from monai.bundle import ConfigParser

from scripts.data.nifti import InputError
from scripts.phantom.synth import generate_case, write_case
from scripts.spatial.composed import FieldNetwork, write_field_nifti
from scripts.spatial.geometry import network_box
from scripts.spatial.points import MARKUPS_SCHEMA, map_files, read_points_csv

ROOT = Path(__file__).resolve().parent.parent
# 10^3 grid, 2 mm voxels, RAS coordinate of voxel i = 2 i - 9 on every axis
GRID_AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
GRID_AFFINE[:3, 3] = -9.0


def _linear_field():
    """u_LPS(p) = (0.1 p_x + 1, -2, 0.05 p_z) at the voxel centres, LPS coordinates worked out by hand."""
    i, j, k = np.meshgrid(*[np.arange(10.0)] * 3, indexing="ij")
    x, z = -(2 * i - 9), 2 * k - 9  # LPS x = -RAS x; LPS z = RAS z
    return np.stack([0.1 * x + 1, np.full_like(x, -2.0), 0.05 * z], axis=-1)


# RAS input -> RAS output, by hand: RAS (3, -1, 4.5) = LPS (-3, 1, 4.5); u = (0.7, -2, 0.225); LPS (-2.3, -1, 4.725)
POINTS_RAS = {"target A": (3.0, -1.0, 4.5), "target B": (-8.0, 6.0, -2.0)}
EXPECTED_RAS = {"target A": (2.3, 1.0, 4.725), "target B": (-9.8, 8.0, -2.1)}


def _lps(p):
    return (-p[0], -p[1], p[2])


@pytest.fixture
def linear_case(tmp_path):
    folder = tmp_path / "case"
    write_field_nifti(_linear_field(), GRID_AFFINE, folder / "transform_moving_to_fixed.nii.gz")
    return folder


def _write_csv(path, points, header_frame=None, column_frame=None):
    """A point CSV; ``header_frame``: a '# frame: ...' first line; ``column_frame``: a frame column (every row)."""
    with open(path, "w", newline="") as f:
        if header_frame:
            f.write(f"# frame: {header_frame}\n")
        writer = csv.writer(f)
        writer.writerow(["label", "x", "y", "z"] + ["frame"] * bool(column_frame))
        for name, p in points.items():
            writer.writerow([name, *p] + [column_frame] * bool(column_frame))


def _read_csv(path, frame=None):
    """A mapped CSV as {label: (x, y, z)}; with ``frame``, every row's frame column must say it."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert frame is None or [r["frame"] for r in rows] == [frame] * len(rows)
    return {row["label"]: tuple(float(row[c]) for c in "xyz") for row in rows}


def _refused(call, match, out):
    """``call()`` raises InputError matching ``match`` and leaves no file in the folder ``out``."""
    with pytest.raises(InputError, match=match) as error:
        call()
    assert not out.exists() or not any(out.iterdir())
    return str(error.value)


def test_csv_in_ras_and_lps_map_to_the_hand_worked_positions(linear_case, tmp_path):
    _write_csv(tmp_path / "ras.csv", POINTS_RAS)
    _write_csv(tmp_path / "lps.csv", {k: _lps(p) for k, p in POINTS_RAS.items()})
    out = tmp_path / "out"
    (ras_out,) = map_files(linear_case, out, points=tmp_path / "ras.csv", frame="RAS")
    (lps_out,) = map_files(linear_case, out, points=str(tmp_path / "lps.csv"), frame="LPS")
    assert Path(ras_out).name == "ras_to_fixed.csv"
    ras, lps = _read_csv(ras_out, "RAS"), _read_csv(lps_out, "LPS")  # written in the input's frame, which they name
    for name, expected in EXPECTED_RAS.items():
        np.testing.assert_allclose(ras[name], expected, atol=1e-3)
        np.testing.assert_allclose(lps[name], _lps(expected), atol=1e-3)
    with pytest.raises(FileExistsError):
        map_files(linear_case, out, points=tmp_path / "ras.csv", frame="RAS")


def _markups(frame, points):
    """A 3D Slicer markups document (schema v1.0.3) with one Fiducial list and one unplaced point."""
    control = [
        {
            "id": str(n + 1),
            "label": name,
            "description": "",
            "associatedNodeID": "",
            "position": list(p),
            "orientation": [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0],
            "selected": True,
            "locked": False,
            "visibility": True,
            "positionStatus": "defined",
        }
        for n, (name, p) in enumerate(points.items())
    ]
    control.append({"id": "9", "label": "not placed", "position": [0.0, 0.0, 0.0], "positionStatus": "undefined"})
    return {
        "@schema": MARKUPS_SCHEMA,
        "markups": [
            {
                "type": "Fiducial",
                "coordinateSystem": frame,
                "coordinateUnits": "mm",
                "locked": False,
                "labelFormat": "%N-%d",
                "controlPoints": control,
                "measurements": [],
                "display": {"visibility": True, "color": [0.4, 1.0, 1.0]},
            }
        ],
    }


def test_markups_in_ras_and_lps_describing_the_same_points_map_to_the_same_result(linear_case, tmp_path):
    (tmp_path / "ras.mrk.json").write_text(json.dumps(_markups("RAS", POINTS_RAS)))
    (tmp_path / "lps.mrk.json").write_text(json.dumps(_markups("LPS", {k: _lps(p) for k, p in POINTS_RAS.items()})))
    written = map_files(linear_case, tmp_path / "out", points=[tmp_path / "ras.mrk.json", tmp_path / "lps.mrk.json"])
    assert [Path(w).name for w in written] == ["ras_to_fixed.mrk.json", "lps_to_fixed.mrk.json"]
    ras, lps = (json.loads(Path(w).read_text()) for w in written)
    for doc, frame in ((ras, "RAS"), (lps, "LPS")):
        assert doc["@schema"] == MARKUPS_SCHEMA
        (markup,) = doc["markups"]
        assert markup["type"] == "Fiducial" and markup["coordinateSystem"] == frame  # the input's frame is kept
        assert markup["display"]["color"] == [0.4, 1.0, 1.0]
        assert markup["controlPoints"][-1]["position"] == [0.0, 0.0, 0.0]  # unplaced: left alone
    for n, (name, expected) in enumerate(EXPECTED_RAS.items()):
        a, b = ras["markups"][0]["controlPoints"][n], lps["markups"][0]["controlPoints"][n]
        assert a["label"] == b["label"] == name
        np.testing.assert_allclose(a["position"], expected, atol=1e-4)
        np.testing.assert_allclose(_lps(b["position"]), a["position"], atol=1e-4)


def test_a_point_outside_the_field_is_refused_naming_it(linear_case, tmp_path):
    _write_csv(tmp_path / "far.csv", {"far away": (0.0, 0.0, 50.0)}, header_frame="LPS")
    _refused(
        lambda: map_files(linear_case, tmp_path / "out", points=tmp_path / "far.csv"),
        "far away.*coordinate frame",
        tmp_path / "out",
    )


def test_a_csv_without_a_frame_is_refused_naming_the_file_and_nothing_is_written(linear_case, tmp_path):
    _write_csv(tmp_path / "good.csv", POINTS_RAS, header_frame="RAS")
    _write_csv(tmp_path / "plain.csv", POINTS_RAS)
    message = _refused(
        lambda: map_files(linear_case, tmp_path / "out", points=[tmp_path / "good.csv", tmp_path / "plain.csv"]),
        "coordinate frame",
        tmp_path / "out",
    )  # good.csv is not written either
    assert message == (
        f"{tmp_path / 'plain.csv'}: the coordinate frame of the points is not stated; add a 'frame' "
        "column (LPS or RAS) or a '# frame: LPS' first line, or pass --frame LPS|RAS"
    )


def test_a_frame_line_or_column_reads_as_the_frame_argument_does(linear_case, tmp_path):
    _write_csv(tmp_path / "line.csv", POINTS_RAS, header_frame="RAS")
    _write_csv(tmp_path / "column.csv", POINTS_RAS, column_frame="ras")  # any case
    _write_csv(tmp_path / "plain.csv", POINTS_RAS)
    # RAS (3, -1, 4.5) and (-8, 6, -2) are LPS (-3, 1, 4.5) and (8, -6, -2)
    lps = np.array([[-3.0, 1.0, 4.5], [8.0, -6.0, -2.0]])
    for name, frame in (("line", None), ("column", None), ("plain", "RAS"), ("line", "ras")):
        labels, points = read_points_csv(tmp_path / f"{name}.csv", frame)
        assert labels == list(POINTS_RAS)
        np.testing.assert_array_equal(points, lps)
    out = tmp_path / "out"
    written = map_files(linear_case, out, points=[tmp_path / "line.csv", tmp_path / "column.csv"])
    written += map_files(linear_case, out, points=tmp_path / "plain.csv", frame="RAS")
    for path in written:
        mapped = _read_csv(path, "RAS")
        for name, expected in EXPECTED_RAS.items():
            np.testing.assert_allclose(mapped[name], expected, atol=1e-3)
        _, back = read_points_csv(path)  # the output states its frame: no flag needed to read it back
        np.testing.assert_allclose(back, [_lps(p) for p in EXPECTED_RAS.values()], atol=1e-3)


@pytest.mark.parametrize(
    "content, frame, match",
    [
        ("# frame: RAS\nlabel,x,y,z\na,1,2,3\n", "LPS", "states frame RAS .*line 1.* but frame LPS was passed"),
        ("label,x,y,z,frame\na,1,2,3,LPS\n", "RAS", "states frame LPS .*'frame' column.* but frame RAS was passed"),
        ("# frame: RAS\nlabel,x,y,z,frame\na,1,2,3,LPS\n", None, "states two frames"),
        ("label,x,y,z,frame\na,1,2,3,LPS\nb,1,2,3,RAS\n", None, "mixes LPS \\(line 2\\) and RAS \\(line 3\\)"),
        ("label,x,y,z,frame\na,1,2,3,XYZ\n", None, "line 2: the frame must be LPS or RAS, got 'XYZ'"),
        ("# frame = left-posterior\nlabel,x,y,z\na,1,2,3\n", None, "line 1: the frame must be LPS or RAS"),
        ("# coordinates in the RAS frame\nlabel,x,y,z\na,1,2,3\n", "RAS", "line 1: cannot read a frame"),
        ("label,x,x,y,z\na,1,1,2,3\n", "LPS", "line 1: column 'x' appears 2 times"),
        (
            "label,x,y,z,comment\na,1,2,3,hi\n",
            "LPS",
            "line 1: unknown column 'comment'; the accepted columns are label, x, y, z, frame",
        ),
        ("# frame: LPS\nlabel,x,z\na,1,3\n", None, "line 2: missing column\\(s\\) y"),
        ("label,x,y,z\na,1,2,3\nb,1,two,3\n", "LPS", "line 3: x, y, z must be numbers .*'two'"),
        ("label,x,y,z\na,1,2,nan\n", "LPS", "line 2: x, y, z must be finite"),
        ("label,x,y,z\na,1,2\n", "LPS", "line 2: 3 fields, but the header names 4 columns"),
        ("", "LPS", "empty point file"),
        ("label,x,y,z\n", "LPS", "no points"),
    ],
)
def test_unreadable_csvs_are_refused_naming_file_and_line(linear_case, tmp_path, content, frame, match):
    (tmp_path / "bad.csv").write_text(content)
    message = _refused(
        lambda: map_files(linear_case, tmp_path / "out", points=tmp_path / "bad.csv", frame=frame),
        match,
        tmp_path / "out",
    )
    assert message.startswith(f"{tmp_path / 'bad.csv'}: ") and "\n" not in message


def test_markups_without_a_coordinate_system_are_refused(linear_case, tmp_path):
    for name, frame in (("none", None), ("odd", "IJK")):
        document = _markups("LPS", POINTS_RAS)
        document["markups"][0].pop("coordinateSystem")
        if frame:
            document["markups"][0]["coordinateSystem"] = frame
        (tmp_path / f"{name}.mrk.json").write_text(json.dumps(document))
        message = _refused(
            lambda: map_files(linear_case, tmp_path / "out", points=tmp_path / f"{name}.mrk.json", frame="LPS"),
            "coordinateSystem",
            tmp_path / "out",
        )
        assert message.startswith(f"{tmp_path / f'{name}.mrk.json'}: markup 0 has coordinateSystem {frame!r}")


def test_labels_are_pulled_onto_the_field_grid_by_hand_worked_shift(tmp_path):
    # identity grid; u_LPS = (-1, 0, 2) mm: out(i, j, k) = label(i + 1, j, k + 2) (LPS x = -RAS x)
    folder = tmp_path / "case"
    field = np.zeros((12, 12, 12, 3))
    field[..., 0], field[..., 2] = -1.0, 2.0
    write_field_nifti(field, np.eye(4), folder / "transform_fixed_to_moving.nii.gz")
    write_field_nifti(np.zeros_like(field), np.eye(4), folder / "transform_moving_to_fixed.nii.gz")  # moving grid
    label = np.zeros((12, 12, 12, 2), np.uint8)
    label[4:7, 3:6, 5:8, 0] = 1
    nib.save(nib.Nifti1Image(label, np.eye(4)), str(tmp_path / "gland.nii.gz"))
    (out,) = map_files(folder, tmp_path / "out", labels=tmp_path / "gland.nii.gz", to="fixed")
    mapped = nib.load(out).get_fdata()
    expected = np.zeros_like(mapped)
    expected[3:6, 3:6, 3:6, 0] = 1
    np.testing.assert_array_equal(mapped, expected)


# a 9 x 10 x 8 grid of 1.5 mm voxels, not at the origin; both fields zero (identity) on it
LABEL_AFFINE = np.array([[1.5, 0, 0, -4.0], [0, 1.5, 0, 7.0], [0, 0, 1.5, -2.0], [0, 0, 0, 1]])


@pytest.fixture
def identity_case(tmp_path):
    folder = tmp_path / "case"
    for name in ("transform_fixed_to_moving.nii.gz", "transform_moving_to_fixed.nii.gz"):
        write_field_nifti(np.zeros((9, 10, 8, 3)), LABEL_AFFINE, folder / name)
    return folder


def _save(data, path, affine=LABEL_AFFINE):
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def test_an_integer_label_map_is_split_into_one_channel_per_value_in_ascending_order(identity_case, tmp_path):
    rng = np.random.default_rng(7)
    for values, dtype in (((0, 1, 2), np.uint8), ((0, 7, 3), np.float32)):
        label = rng.choice(values, size=(9, 10, 8)).astype(dtype)
        path = _save(label, tmp_path / f"map{values[-1]}.nii.gz")
        (out,) = map_files(identity_case, tmp_path / "out", labels=path, to="fixed")
        mapped = nib.load(out)
        np.testing.assert_allclose(mapped.affine, LABEL_AFFINE, atol=1e-6)
        ascending = sorted(values[1:])
        assert mapped.shape == (9, 10, 8, 2) and mapped.get_data_dtype() == np.uint8
        for k, value in enumerate(ascending):
            np.testing.assert_array_equal(np.asarray(mapped.dataobj)[..., k], label == value)
        assert mapped.header["descrip"].tobytes().rstrip(b"\0").decode() == (
            f"channels = label values {ascending[0]},{ascending[1]}"
        )


def test_a_soft_label_is_thresholded_at_label_threshold(identity_case, tmp_path):
    soft = np.zeros((9, 10, 8), np.float32)
    soft[2:5, 3:6, 1:4], soft[5, 5, 5] = 0.6, 0.3
    path = _save(soft, tmp_path / "soft.nii.gz")
    for threshold in (0.25, 0.5, 0.7):
        (out,) = map_files(identity_case, tmp_path / f"t{threshold}", labels=path, label_threshold=threshold)
        np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), soft >= threshold)


@pytest.mark.parametrize(
    "value, ndim, match",
    [
        (1.7, 3, "label holds the value 1.7, neither in \\[0, 1\\]"),
        (-1.0, 3, "negative value -1"),
        (2.0, 4, "4-D label holds the value 2"),
        (0.5, 3, "mixes fractional values \\(0.5\\) with integers above 1 \\(2\\)"),
    ],
)
def test_labels_that_are_neither_soft_nor_an_integer_map_are_refused(identity_case, tmp_path, value, ndim, match):
    label = np.zeros((9, 10, 8) + (2,) * (ndim == 4), np.float32)
    label[1:3, 1:3, 1:3], label[5, 5, 5] = 1.0, value
    if value == 0.5:
        label[6, 6, 6] = 2.0
    path = _save(label, tmp_path / "bad.nii.gz")
    message = _refused(lambda: map_files(identity_case, tmp_path / "out", labels=path), match, tmp_path / "out")
    assert message.startswith(f"{path}: ")


def test_a_label_on_another_grid_is_refused(identity_case, tmp_path):
    shifted = LABEL_AFFINE.copy()
    shifted[0, 3] += 1.5
    path = _save(np.zeros((9, 10, 8), np.uint8), tmp_path / "shifted.nii.gz", shifted)
    _refused(
        lambda: map_files(identity_case, tmp_path / "out", labels=path, to="moving"),
        "shifted.nii.gz: label grid .* differs from the grid it must lie on, that of "
        ".*transform_fixed_to_moving.nii.gz",
        tmp_path / "out",
    )


@pytest.fixture(scope="module")
def ground_truth_case(tmp_path_factory):
    """Phantom case 2 (oblique TRUS grid) registered MR -> TRUS with its ground-truth field."""
    root = tmp_path_factory.mktemp("phantom")
    name = "case000002"
    write_case(generate_case(0, 2, "small"), root, "train", name, preview=False)
    d = root / "train"
    fixed = nib.load(str(d / "us_images" / f"{name}.nii.gz"))
    size = (32, 40, 24)
    box = network_box(fixed.affine, fixed.shape, size, 0)
    out = root / "registered"
    register_pair(
        d / "mr_images" / f"{name}.nii.gz",
        d / "us_images" / f"{name}.nii.gz",
        out,
        network=FieldNetwork(d / "ddf_mr2us" / f"{name}.nii.gz", box),
        spatial_size=size,
        depth_crop=0,
        use_rigid=False,
    )
    truth = json.loads((d / "truth" / f"{name}.json").read_text())
    return {"out": out, "truth": truth, "dir": d, "name": name}


def test_mr_landmarks_land_within_1mm_of_their_trus_positions_and_back(ground_truth_case, tmp_path):
    lms = ground_truth_case["truth"]["landmarks"]
    assert len(lms) >= 2
    mr = {f"landmark {n}": tuple(lm["mr_centre_ras_mm"]) for n, lm in enumerate(lms)}
    us = {f"landmark {n}": tuple(lm["us_centre_ras_mm"]) for n, lm in enumerate(lms)}
    _write_csv(tmp_path / "mr_targets.csv", mr)
    (tmp_path / "us_targets.mrk.json").write_text(json.dumps(_markups("LPS", {k: _lps(p) for k, p in us.items()})))
    out = ground_truth_case["out"]
    (to_fixed,) = map_files(out, tmp_path, points=tmp_path / "mr_targets.csv", to="fixed", frame="RAS")
    (to_moving,) = map_files(out, tmp_path, points=tmp_path / "us_targets.mrk.json", to="moving")
    mapped = _read_csv(to_fixed)
    back = json.loads(Path(to_moving).read_text())["markups"][0]["controlPoints"]
    moved = [np.linalg.norm(np.subtract(us[k], mr[k])) for k in mr]
    assert max(moved) > 3.0  # the targets really move between the images
    for n, name in enumerate(mr):
        assert np.linalg.norm(np.subtract(mapped[name], us[name])) <= 1.0, name
        assert np.linalg.norm(np.subtract(_lps(back[n]["position"]), mr[name])) <= 1.0, name


def test_map_points_config_maps_the_trus_gland_onto_the_mr_gland(ground_truth_case, tmp_path):
    d, name = ground_truth_case["dir"], ground_truth_case["name"]
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "map_points.json"))
    parser.update(
        {
            "transforms": str(ground_truth_case["out"]),
            "output_dir": str(tmp_path),
            "labels": str(d / "us_labels" / f"{name}.nii.gz"),
            "to": "moving",
        }
    )
    parser.get_parsed_content("run")
    mapped = nib.load(str(tmp_path / f"{name}_to_moving.nii.gz"))
    mr = nib.load(str(d / "mr_labels" / f"{name}.nii.gz"))
    np.testing.assert_allclose(mapped.affine, mr.affine, atol=1e-5)
    a, b = mapped.get_fdata()[..., 0] > 0.5, mr.get_fdata()[..., 0] > 0.5
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.9


def test_markups_whose_control_points_are_not_a_list_are_refused(tmp_path):
    from scripts.spatial.points import read_markups

    document = _markups("LPS", {"t1": [1.0, 2.0, 3.0]})
    document["markups"][0]["controlPoints"] = None
    path = tmp_path / "t.mrk.json"
    path.write_text(json.dumps(document))
    with pytest.raises(
        InputError, match=rf"^{re.escape(str(path))}: markup 0 has controlPoints NoneType; it must be a list"
    ):
        read_markups(path)
