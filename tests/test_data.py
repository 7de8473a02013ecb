"""μ-RegPro loading: valid folders load for both directions; each kind of bad file raises an error naming it."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import MR_AFFINE, write_case

from scripts.data.datalist import load_split
from scripts.data.nifti import InputError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("channels", [2, 6])
def test_folder_loads_with_any_channel_count(tiny_dataset, channels):
    root = tiny_dataset(n_cases=3, channels=channels)
    cases = load_split(root, "train")
    assert [c["case"] for c in cases] == ["case000000", "case000001", "case000002"]
    assert all(c["direction"] == "mr2us" for c in cases)
    # with MONAI's loaders the label becomes channel-first with the same C
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    load = Compose(
        [LoadImaged(["moving_label"], image_only=True), EnsureChannelFirstd(["moving_label"], channel_dim=-1)]
    )
    assert tuple(load(cases[0])["moving_label"].shape) == (channels, 12, 14, 10)


def test_direction_swaps_moving_and_fixed(tiny_dataset):
    root = tiny_dataset(n_cases=1)
    mr2us, us2mr = load_split(root, "train", "mr2us")[0], load_split(root, "train", "us2mr")[0]
    assert mr2us["moving_image"].endswith("mr_images/case000000.nii.gz")
    assert mr2us["fixed_label"].endswith("us_labels/case000000.nii.gz")
    assert us2mr["moving_image"] == mr2us["fixed_image"] and us2mr["fixed_image"] == mr2us["moving_image"]
    assert us2mr["moving_label"] == mr2us["fixed_label"] and us2mr["fixed_label"] == mr2us["moving_label"]
    with pytest.raises(InputError, match="direction"):
        load_split(root, "train", "mr2ct")


def _replace(path, data, affine=MR_AFFINE):
    nib.save(nib.Nifti1Image(data, affine), str(path))


def test_missing_file_is_named(tiny_dataset):
    root = tiny_dataset(n_cases=2)
    gone = root / "train" / "us_labels" / "case000001.nii.gz"
    gone.unlink()
    with pytest.raises(InputError, match=r"us_labels/case000001\.nii\.gz: missing"):
        load_split(root, "train")


def test_2d_image_is_named(tmp_path):
    paths = write_case(tmp_path, "train", "case000000")
    _replace(paths["mr_image"], np.zeros((12, 14), np.float32))
    with pytest.raises(InputError, match=r"mr_images/case000000\.nii\.gz: MR image has 2 dimensions"):
        load_split(tmp_path, "train")


def test_mismatched_channel_counts_are_named(tmp_path):
    paths = write_case(tmp_path, "train", "case000000", channels=6)
    label = np.zeros((10, 12, 9, 4), np.uint8)
    label[..., 0] = 1
    _replace(paths["us_label"], label, nib.load(paths["us_image"]).affine)
    with pytest.raises(
        InputError, match=r"us_labels/case000000\.nii\.gz: has 4 label channels but .*mr_labels.* has 6"
    ):
        load_split(tmp_path, "train")


def test_label_on_another_grid_is_named(tmp_path):
    paths = write_case(tmp_path, "train", "case000000")
    label = np.ones((11, 14, 10, 6), np.uint8)
    _replace(paths["mr_label"], label)
    with pytest.raises(InputError, match=r"mr_labels/case000000\.nii\.gz: label grid \(11, 14, 10\) differs"):
        load_split(tmp_path, "train")
    label = np.ones((12, 14, 10, 6), np.uint8)
    _replace(paths["mr_label"], label, MR_AFFINE @ np.diag([1.0, 1.0, 1.5, 1.0]))
    with pytest.raises(InputError, match=r"mr_labels/case000000\.nii\.gz: label affine differs"):
        load_split(tmp_path, "train")


def test_nan_voxels_are_named(tmp_path):
    paths = write_case(tmp_path, "train", "case000000")
    image = np.zeros((10, 12, 9), np.float32)
    image[3, 4, 5] = np.nan
    image[1, 1, 1] = np.inf
    _replace(paths["us_image"], image, nib.load(paths["us_image"]).affine)
    with pytest.raises(InputError, match=r"us_images/case000000\.nii\.gz: TRUS image contains 2 NaN/Inf voxels"):
        load_split(tmp_path, "train")


def test_empty_gland_and_unreadable_file_are_named(tmp_path):
    paths = write_case(tmp_path, "train", "case000000")
    _replace(paths["mr_label"], np.zeros((12, 14, 10, 6), np.uint8))
    with pytest.raises(InputError, match=r"mr_labels/case000000\.nii\.gz: gland label \(channel 0\) is empty"):
        load_split(tmp_path, "train")
    paths["mr_label"].write_bytes(b"not a nifti file")
    with pytest.raises(InputError, match=r"mr_labels/case000000\.nii\.gz: cannot read MR label"):
        load_split(tmp_path, "train")


@pytest.mark.full
def test_datalist_round_trip_and_cli(tiny_dataset, tmp_path):
    root = tiny_dataset(n_cases=2)
    out = tmp_path / "lists" / "datalist.json"
    subprocess.run(
        [sys.executable, "-m", "scripts", "datalist", str(root), str(out)], cwd=ROOT, check=True, capture_output=True
    )
    entries = json.loads(out.read_text())["train"]
    assert entries[0]["mr_image"] == "../train/mr_images/case000000.nii.gz"  # relative to the JSON's folder
    from_list = load_split(datalist=out, split="train", direction="us2mr")
    from_folder = load_split(root, "train", direction="us2mr")
    assert [
        {k: str(Path(v).resolve()) if k.endswith(("image", "label")) else v for k, v in c.items()} for c in from_folder
    ] == from_list
    # the CLI refuses to overwrite and prints one line, no traceback
    again = subprocess.run(
        [sys.executable, "-m", "scripts", "datalist", str(root), str(out)], cwd=ROOT, capture_output=True, text=True
    )
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr


@pytest.mark.full
def test_metadata_passes_schema_offline():
    schema = ROOT / "tests" / "data" / "meta_schema_20240725.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "verify_metadata",
            "--meta_file",
            "configs/metadata.json",
            "--filepath",
            str(schema),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "metadata is verified with no error" in result.stdout + result.stderr
    assert (ROOT / "metadata.json").resolve() == (ROOT / "configs" / "metadata.json").resolve()


def test_overwrite_given_as_text_on_the_command_line_is_understood(tmp_path):
    """``--overwrite false`` reaches the code as the string "false", which Python would take as yes."""
    from scripts.data.nifti import write_text

    path = write_text("first", tmp_path / "out.txt")
    with pytest.raises(FileExistsError, match="already exists"):
        write_text("second", path, overwrite="false")
    write_text("third", path, overwrite="True")
    assert path.read_text() == "third"
    with pytest.raises(InputError, match="overwrite must be true or false"):
        write_text("fourth", path, overwrite="maybe")
    with pytest.raises(InputError, match="overwrite must be true or false"):
        write_text("fifth", path, overwrite=2)
    from scripts.data.nifti import flag

    assert [flag(v) for v in ("YES", " no ", "1", "0", 1, 0, "False")] == [True, False, True, False, True, False, False]


def test_prestage_cache_keys_follow_settings_and_file_contents(tmp_path):
    import os

    import torch
    from monai.transforms import EnsureTyped

    from scripts.data.datalist import case_cache_key, settings_cache_key
    from scripts.data.transforms import PairToBoxd
    from scripts.inference.pair import PairStage

    def chain(size, crop=4):
        return [PairToBoxd(PairStage(size, depth_crop=crop)), EnsureTyped(keys=["image"], dtype=torch.float32)]

    # equal settings in fresh objects give one key (no memory addresses in it); any setting change a new one
    assert settings_cache_key(chain([48, 48, 40])) == settings_cache_key(chain([48, 48, 40]))
    assert settings_cache_key(chain([48, 48, 40])) != settings_cache_key(chain([48, 48, 32]))
    assert settings_cache_key(chain([48, 48, 40])) != settings_cache_key(chain([48, 48, 40], crop=2))
    # a changed default of the rigid step (not named in any config) is a new key too, and a mistyped name an error
    import scripts.spatial.rigid

    key = settings_cache_key(chain([48, 48, 40]))
    defaults = scripts.spatial.rigid.rigid_prealign.__defaults__
    try:
        scripts.spatial.rigid.rigid_prealign.__defaults__ = tuple(
            1.0 if v == 2.0 else v for v in defaults
        )  # 1 mm mask smoothing
        assert settings_cache_key(chain([48, 48, 40])) != key
    finally:
        scripts.spatial.rigid.rigid_prealign.__defaults__ = defaults
    assert settings_cache_key(chain([48, 48, 40])) == key
    # a new version of the pre-stage code (e.g. the rigid step's storage order) is a new key
    import scripts.data.datalist

    version = scripts.data.datalist.PRESTAGE_VERSION
    try:
        scripts.data.datalist.PRESTAGE_VERSION = version + 1
        assert settings_cache_key(chain([48, 48, 40])) != key
    finally:
        scripts.data.datalist.PRESTAGE_VERSION = version
    with pytest.raises(InputError, match=r"rigid_args: unknown setting\(s\) \['iteration'\]"):
        PairStage([48, 48, 40], rigid_args={"iteration": [10]})

    image = tmp_path / "mr.nii.gz"
    image.write_bytes(b"first")
    item = {"case": "case000000", "moving_image": str(image)}
    before = case_cache_key(item)
    assert case_cache_key(dict(item)) == before
    image.write_bytes(b"second, longer")  # a regenerated input file must not reuse the old cache entry
    os.utime(image, ns=(1, 1))
    assert case_cache_key(item) != before


def test_case_names_keep_their_dots_and_must_be_unique(tmp_path):
    for name in ("pt.A", "pt.B"):
        write_case(tmp_path, "train", name)
    assert [c["case"] for c in load_split(tmp_path, "train")] == ["pt.A", "pt.B"]  # not both "pt"
    for sub in ("mr_images", "us_images", "mr_labels", "us_labels"):  # the same case stored twice: .nii and .nii.gz
        img = nib.load(str(tmp_path / "train" / sub / "pt.A.nii.gz"))
        nib.save(img, str(tmp_path / "train" / sub / "pt.A.nii"))
    with pytest.raises(InputError, match=r"two cases are named 'pt\.A'"):
        load_split(tmp_path, "train")
