"""A case folder is one transaction (scripts/data/case_folder.py): staged, published by one rename under a lock.

Unit checks of the transaction, then the CLI through real processes: two registrations of different patients
into one folder at the same time never leave a mixed folder, and a run killed while it writes leaves the
previous folder byte for byte.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import ENV, ROOT, register, write_case

import scripts.data.case_folder as case_folder
from scripts.data.case_folder import case_transaction
from scripts.data.nifti import InputError


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_failed_block_leaves_the_destination_and_no_staging(tmp_path):
    dest = tmp_path / "case"
    with case_transaction(dest) as stage:
        (stage / "result.json").write_text("{}")
        (stage / "a.txt").write_text("old")
    before = snapshot(dest)
    with pytest.raises(RuntimeError, match="half way"):
        with case_transaction(dest, overwrite=True) as stage:
            (stage / "a.txt").write_text("new")
            raise RuntimeError("half way")
    assert snapshot(dest) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case"]


@pytest.mark.parametrize("swap", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_overwrite_replaces_the_whole_folder(tmp_path, monkeypatch, swap):
    if not swap:
        monkeypatch.setattr(case_folder, "_exchange", lambda a, b: False)
    dest = tmp_path / "case"
    with case_transaction(dest) as stage:
        (stage / "result.json").write_text('{"run": 1}')
        (stage / "targets_to_fixed.csv").write_text("stale")
    with case_transaction(dest, overwrite=True) as stage:
        (stage / "result.json").write_text('{"run": 2}')
    assert snapshot(dest) == {Path("result.json"): b'{"run": 2}'}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case"]


def test_taken_folder_refused_without_overwrite_and_foreign_folder_even_with_it(tmp_path):
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=f"^{dest}: already exists \\(1 files\\)"):
        with case_transaction(dest):
            pass
    with pytest.raises(InputError, match=f"^{dest}: holds files but no result.json"):
        with case_transaction(dest, overwrite=True):
            pass
    assert snapshot(dest) == {Path("notes.txt"): b"keep me"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_an_input_inside_the_folder_that_overwrite_would_replace_is_refused(tmp_path):
    dest = tmp_path / "case"
    dest.mkdir()
    (dest / "result.json").write_text("{}")
    (dest / "mr.nii.gz").write_bytes(b"image")
    with pytest.raises(InputError, match=f"^{dest / 'mr.nii.gz'}: an input lies inside the output folder"):
        with case_transaction(dest, overwrite=True, inputs=[str(dest / "mr.nii.gz")]):
            pass
    assert (dest / "mr.nii.gz").read_bytes() == b"image"


def test_a_second_publisher_finds_the_folder_taken(tmp_path):
    dest = tmp_path / "case"
    with pytest.raises(FileExistsError, match="written by another run meanwhile"):
        with case_transaction(dest) as stage:
            (stage / "result.json").write_text('{"patient": "A"}')
            with case_transaction(dest) as other:  # another run publishes first
                (other / "result.json").write_text('{"patient": "B"}')
    assert snapshot(dest) == {Path("result.json"): b'{"patient": "B"}'}


# ---------------------------------------------------------------- real processes through the CLI


@pytest.fixture(scope="module")
def patients(base, tmp_path_factory):
    """Two different patients, and each one's reference warped image and labels from a run of its own."""
    root = tmp_path_factory.mktemp("patients")
    cases = {"A": base, "B": {**base, **{k: str(v) for k, v in write_case(root, "holdout", "b", seed=7).items()}}}
    from scripts.__main__ import main

    for name, case in cases.items():
        main(register(case, root / f"reference_{name}", None, None, case["mr_label"]))
        case["reference"] = {
            key: np.asarray(nib.load(root / f"reference_{name}" / f"{key}.nii.gz").dataobj)
            for key in ("warped_image", "warped_label")
        }
    assert not np.allclose(cases["A"]["reference"]["warped_image"], cases["B"]["reference"]["warped_image"], atol=1e-2)
    return cases


def _start(case, out, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "scripts", *register(case, out, None, None, case["mr_label"], *extra)],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _one_patient(out: Path, patients) -> str:
    """The patient whose run wrote ``out``: result.json, warped image and warped labels must all agree."""
    moving = json.loads((out / "result.json").read_text())["moving_image"]
    (name,) = [n for n, c in patients.items() if c["mr_image"] == moving]
    for key, reference in patients[name]["reference"].items():
        np.testing.assert_allclose(np.asarray(nib.load(out / f"{key}.nii.gz").dataobj), reference, atol=1e-5)
    return name


@pytest.mark.full
@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "both-overwrite"])
def test_two_patients_into_one_folder_at_once_never_mix(patients, tmp_path, overwrite):
    out = tmp_path / "out"
    extra = ["--overwrite", "true"] if overwrite else []
    runs = [_start(patients[name], out, *extra) for name in "AB"]
    codes = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    _one_patient(out, patients)
    assert not [p for p in tmp_path.iterdir() if p.name != "out"]  # no staging folder left
    if overwrite:
        assert [c for c, _ in codes] == [0, 0], codes
    else:  # exactly one published; the other stopped with one line naming the folder
        assert sorted(c for c, _ in codes) == [0, 2], codes
        (err,) = [e for c, e in codes if c == 2]
        assert err.strip().splitlines()[-1].startswith(f"error: {out}: already exists")


@pytest.mark.full
def test_a_run_killed_while_writing_leaves_the_previous_folder(patients, tmp_path):
    out = tmp_path / "out"
    from scripts.__main__ import main

    main(register(patients["A"], out, None, None, patients["A"]["mr_label"]))
    before = snapshot(out)
    run = _start(patients["B"], out, "--overwrite", "true")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill once the new run has written its first outputs
        staged = [p for p in tmp_path.glob(".out.staging-*") if len(list(p.glob("*.nii.gz"))) >= 2]
        if staged or run.poll() is not None:
            break
        time.sleep(0.01)
    assert staged, "the run finished before it could be killed"
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=60)
    assert snapshot(out) == before
    assert _one_patient(out, patients) == "A"


def test_overwrite_keeps_a_checkpoint_or_config_stored_in_the_case_folder(base, tmp_path, capsys):
    """The config and checkpoint a user names are inputs too: a folder holding them is not replaced."""
    from scripts.__main__ import main

    out = tmp_path / "out"
    main(register(base, out))
    (out / "my_config.json").write_text(Path(base["config"]).read_text())
    before = snapshot(out)
    argv = register({**base, "config": str(out / "my_config.json")}, out, None, None, None, "--overwrite")
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            f"error: {out / 'my_config.json'}: an input lies inside the output "
            f"folder {out}, which overwrite would replace; move it or write elsewhere"
        )
    )
    assert snapshot(out) == before


def test_the_current_folder_is_refused_and_the_case_folder_gets_the_usual_permissions(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="is the current folder"):
        with case_transaction("."):
            pass
    with case_transaction(tmp_path / "case") as stage:
        (stage / "result.json").write_text("{}")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "case").stat().st_mode & 0o777 == 0o777 & ~umask  # as mkdir makes it, not mkdtemp's 0700


def test_an_output_name_that_looks_like_a_number_stays_a_folder_name(base, tmp_path, monkeypatch):
    from scripts.__main__ import main

    monkeypatch.chdir(tmp_path)
    main(register(base, "2024"))  # fire reads "2024" as the int 2024
    assert (tmp_path / "2024" / "result.json").is_file()
