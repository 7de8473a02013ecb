"""Tests of the phantom's TRUS sequences (scripts/phantom/sequence.py): frame 0 is the static case, every frame's
stored truth is the inverse of that frame's transform, landmarks follow the fields, the files carry time."""

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from scripts.data.nifti import InputError
from scripts.phantom.sequence import Motion, MotionParams, generate_sequence
from scripts.phantom.synth import generate_case, synth, voxel_to_world
from scripts.spatial.geometry import RAS_LPS_FLIP

FRAMES = 4


@pytest.fixture(scope="module")
def seq():
    return generate_sequence(0, 1, FRAMES, "small", "realistic")


def test_frame_zero_is_the_static_case(seq):
    static = generate_case(0, 1, "small", preset="realistic")
    assert np.array_equal(seq["us_sequence"][..., 0], static["us_image"])
    assert np.array_equal(seq["us_sequence_label"][..., 0, :], static["us_true_label"])
    assert np.array_equal(seq["ddf_mr2us_sequence"][..., 0, :], static["ddf_mr2us"][..., 0, :])
    assert np.array_equal(seq["ddf_us2mr_sequence"][..., 0, :], static["ddf_us2mr"][..., 0, :])


def test_every_frame_moves_and_its_field_inverts_its_transform(seq):
    """p = q + u_t(q) read from the stored field (LPS -> RAS) must map back to q through phi_t, for every frame."""
    phi, mo = seq["transform"], Motion.random(np.random.default_rng([0, 1, 3]), FRAMES)
    q = voxel_to_world(seq["us_affine"], seq["us_sequence"].shape[:3])
    gland = seq["us_sequence_label"][..., 0].reshape(-1, FRAMES) > 0
    for t in range(FRAMES):
        p = q + seq["ddf_mr2us_sequence"][..., t, :].reshape(-1, 3) * RAS_LPS_FLIP
        np.testing.assert_allclose(mo.transform(phi, t).forward(p), q, atol=1e-3)
        if t:  # the gland has moved: frame t's field is not frame 0's
            change = np.linalg.norm(
                seq["ddf_mr2us_sequence"][..., t, :] - seq["ddf_mr2us_sequence"][..., 0, :], axis=-1
            )
            assert change.reshape(-1)[gland[:, t]].max() > 0.3
    assert mo.push_scale(0) == 1.0 and all(mo.push_scale(t) <= 1.0 for t in range(FRAMES))
    assert np.array_equal(mo.offset_mm(0), np.zeros(3))


def test_landmarks_of_each_frame_follow_the_stored_fields(seq):
    """The JSON's TRUS landmark centre of frame t, pulled back through the stored field, lands on its MR centre."""
    aff = seq["us_affine"]
    mr_centres = [lm["mr_centre_ras_mm"] for lm in seq["truth"]["landmarks"]]
    for t, frame in enumerate(seq["truth"]["sequence"]["frames_truth"]):
        for us_c, mr_c in zip(frame["landmarks_us_ras_mm"], mr_centres):
            vox = np.linalg.solve(aff[:3, :3], np.asarray(us_c) - aff[:3, 3])
            u = [
                ndimage.map_coordinates(seq["ddf_mr2us_sequence"][..., t, k], vox[:, None], order=1)[0]
                for k in range(3)
            ]
            np.testing.assert_allclose(np.asarray(us_c) + np.asarray(u) * RAS_LPS_FLIP, mr_c, atol=0.25)
    assert seq["truth"]["sequence"]["frames_truth"][0]["motion_p95_mm"] == 0.0


def test_synth_writes_sequences_with_their_frame_interval(tmp_path):
    synth(str(tmp_path / "d"), cases=1, size="small", preset="realistic", splits="0,0,1", sequence=3, preview=False)
    d = tmp_path / "d" / "holdout"
    shapes = {}
    for folder in ("us_sequences", "us_sequence_labels", "ddf_mr2us_sequences", "ddf_us2mr_sequences"):
        img = nib.load(d / folder / "case000000.nii.gz")
        assert img.header.get_zooms()[3] == MotionParams().frame_interval_s
        assert img.header.get_xyzt_units() == ("mm", "sec")
        shapes[folder] = img.shape
    us = nib.load(d / "us_images" / "case000000.nii.gz").shape
    assert shapes["us_sequences"] == (*us, 3) and shapes["us_sequence_labels"] == (*us, 3, 6)
    assert shapes["ddf_mr2us_sequences"] == (*us, 3, 3)
    with pytest.raises(InputError, match="at least 2 frames"):
        synth(str(tmp_path / "e"), cases=1, size="small", sequence=1)


def test_evaluate_sequences_scores_the_truth_perfectly_and_a_blip_by_hand(tmp_path):
    """Registered outputs equal to the truth score Dice 1, TRE 0, consistency 1, jitter 0; the truth with frame 1's
    field moved by 1 mm scores inter-frame errors (1, 1) mm and jitter 2 mm."""
    from scripts.evaluation.evaluate_sequences import evaluate_sequences

    synth(str(tmp_path / "d"), cases=1, size="small", preset="realistic", splits="0,0,1", sequence=3, preview=False)
    d = tmp_path / "d" / "holdout"
    labels = nib.load(d / "us_sequence_labels" / "case000000.nii.gz")
    field = nib.load(d / "ddf_mr2us_sequences" / "case000000.nii.gz")
    for name, shift in (("perfect", 0.0), ("blip", 1.0)):
        case = tmp_path / name / "case000000"
        case.mkdir(parents=True)
        moved = np.asarray(field.dataobj).copy()
        moved[:, :, :, 1, 0] += shift
        nib.save(nib.Nifti1Image(moved, field.affine), str(case / "transform_fixed_to_moving_sequence.nii.gz"))
        nib.save(labels, str(case / "warped_label_sequence.nii.gz"))
    perfect = evaluate_sequences(tmp_path / "d", tmp_path / "perfect", out=str(tmp_path / "e1"))
    assert perfect["dice_mean"] == 1.0 and perfect["tre_mean_mm"] == 0.0 and perfect["cases"] == 1
    assert perfect["consistency"] == 1.0 and perfect["jitter_mm"] == 0.0
    evaluate_sequences(tmp_path / "d", tmp_path / "blip", out=str(tmp_path / "e2"))
    blip = json.loads((tmp_path / "e2" / "per_case.json").read_text())["case000000"]
    assert blip["interframe_error_mm"] == pytest.approx([1.0, 1.0], abs=1e-6)
    assert blip["jitter_mm"] == pytest.approx(2.0, abs=1e-6)
    with pytest.raises(FileExistsError):
        evaluate_sequences(tmp_path / "d", tmp_path / "blip", out=str(tmp_path / "e2"))
