"""Registering a sequence (scripts/inference/sequence.py), its weights (scripts/weights/sequence_model.py), its
training windows (scripts/training/sequence.py), the CLI's and the bundle's 4-D runs."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import ENV, ROOT, SMALL, US_AFFINE, ContentNet, make_registrar, small_net, write_case

from scripts.data.nifti import InputError
from scripts.inference.registrar import load_registrar
from scripts.inference.sequence import StreamingNetwork, read_sequence, register_sequence
from scripts.networks.registration import RegistrationNet
from scripts.networks.sequence import SequenceRegistrationNet
from scripts.training.sequence import SequenceWindows, frame_of
from scripts.weights.sequence_model import load_sequence_model, make_sequence_model

FRAMES = 3


def _sequence(path, frames=FRAMES, shape=(10, 12, 9), seed=0, nan_frame=None):
    """A 4-D TRUS sequence of smooth random frames drifting by one voxel per frame; returns its path."""
    rng = np.random.default_rng(seed)
    base = rng.random(shape).astype(np.float32)
    data = np.stack([np.roll(base, t, axis=0) for t in range(frames)], axis=3)
    if nan_frame is not None:
        data[1, 1, 1, nan_frame] = np.nan
    nib.save(nib.Nifti1Image(data, US_AFFINE), str(path))
    return path


def _random_head(net: SequenceRegistrationNet, seed=1) -> SequenceRegistrationNet:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in (*net.head.parameters(), *net.cell.parameters()):
            p.normal_(0, 0.3)
    return net


def test_bad_sequences_are_refused(tmp_path):
    three_d = tmp_path / "frame.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((10, 12, 9), np.float32), US_AFFINE), str(three_d))
    with pytest.raises(InputError, match="is 3-D"):
        read_sequence(three_d)
    with pytest.raises(InputError, match="has 1 frame"):
        read_sequence(_sequence(tmp_path / "one.nii.gz", frames=1))
    with pytest.raises(InputError, match="frame 2: fixed sequence has NaN"):
        read_sequence(_sequence(tmp_path / "nan.nii.gz", nan_frame=2))
    other = tmp_path / "other.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((10, 12, 8), dtype=np.float32), US_AFFINE), str(other))
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(1).random((10, 12, 9), dtype=np.float32), US_AFFINE), str(good))
    with pytest.raises(InputError, match="all frames must share one grid"):
        read_sequence([good, other])
    frames, interval = read_sequence([good, good])
    assert len(frames) == 2 and interval is None


def test_streaming_equals_the_whole_sequence_and_reset_starts_over():
    net = _random_head(SequenceRegistrationNet(small_net(), hidden=4))
    frames = torch.rand(1, FRAMES, 2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole, _ = net.forward_sequence(frames)
        stream = StreamingNetwork(net)
        streamed = [stream.forward_train(frames[:, t])["ddf"] for t in range(FRAMES)]
        stream.reset()
        again = stream.forward_train(frames[:, 0])["ddf"]
    for t in range(FRAMES):
        torch.testing.assert_close(streamed[t], whole["ddf"][:, t], rtol=0, atol=1e-6)
    torch.testing.assert_close(again, whole["ddf"][:, 0], rtol=0, atol=1e-6)
    assert not torch.allclose(streamed[1], net(frames[:, 1]), atol=1e-4)  # frame 1 depends on frame 0


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A case, tiny static weights, a config using them (no segmenter, whole images, no rigid step), sequence
    weights for those static weights, and an override file naming them."""
    root = tmp_path_factory.mktemp("sequence")
    case = write_case(root / "data", "holdout", "case000000")
    torch.save(small_net().state_dict(), root / "weights.pt")
    config = json.loads((ROOT / "configs" / "inference.json").read_text())
    config["network_def"].update(SMALL)
    config.update(spatial_size=[16, 16, 16], checkpoint=str(root / "weights.pt"), use_seg=False, roi_mask=False)
    config.update(use_rigid=False)
    (root / "small.json").write_text(json.dumps(config))
    run = root / "run"
    run.mkdir()
    seq = _random_head(SequenceRegistrationNet(small_net(), hidden=16))
    torch.save({"model": seq.state_dict()}, run / "last.pt")
    (run / "run_config.json").write_text(json.dumps({"config": {"sequence_def": {"stride": 2}}}))
    make_sequence_model(run, root / "sequence_model.pt", static_checkpoint=root / "weights.pt")
    (root / "seq.json").write_text(json.dumps({"sequence_checkpoint": str(root / "sequence_model.pt")}))
    return {"root": root, "case": case, "seq": seq}


def _configs(small, sequence=True):
    files = [str(small["root"] / "small.json")]
    return files + [str(ROOT / "configs" / "sequence_inference.json"), str(small["root"] / "seq.json")] * sequence


def test_sequence_weights_round_trip_and_refuse_other_static_weights(small, tmp_path):
    registrar = load_registrar(_configs(small))
    net = registrar.network
    assert isinstance(net, SequenceRegistrationNet)
    for key, value in small["seq"].state_dict().items():
        assert torch.equal(net.state_dict()[key], value), key
    other = tmp_path / "other.pt"
    torch.manual_seed(5)
    torch.save(RegistrationNet(**SMALL, spatial_size=(16, 16, 16)).state_dict(), other)
    fresh = SequenceRegistrationNet(small_net(), hidden=16)
    with pytest.raises(InputError, match="static_sha256"):
        load_sequence_model(fresh, small["root"] / "sequence_model.pt", other)


def test_register_sequence_writes_4d_outputs(small, tmp_path):
    case = small["case"]
    fixed = _sequence(tmp_path / "seq.nii.gz")
    out = tmp_path / "out"
    record = register_sequence(load_registrar(_configs(small)), case["mr_image"], fixed, out, case["mr_label"])
    assert record["frames"] == FRAMES and record["network"].startswith("sequence")
    labels = nib.load(out / "warped_label_sequence.nii.gz")
    field = np.asarray(nib.load(out / "transform_fixed_to_moving_sequence.nii.gz").dataobj)
    assert labels.shape == (10, 12, 9, FRAMES, 6) and field.shape == (10, 12, 9, FRAMES, 3)
    for t in range(FRAMES):
        frame_field = np.asarray(nib.load(out / f"frame{t:03d}" / "transform_fixed_to_moving.nii.gz").dataobj)
        assert np.array_equal(field[:, :, :, t], frame_field[:, :, :, 0])
        assert "staging" not in (out / f"frame{t:03d}" / "result.json").read_text()


def test_the_state_carries_earlier_frames_into_later_ones(small, tmp_path):
    """With a static network that reads the images (ContentNet), a different frame 0 changes frame 1's field in
    the sequence mode and not in the per-frame mode; frame 1 itself is the same in both sequences."""
    case = small["case"]
    fixed = _sequence(tmp_path / "seq.nii.gz")
    changed = np.asarray(nib.load(fixed).dataobj).copy()
    changed[..., 0] = np.random.default_rng(7).random(changed.shape[:3])
    nib.save(nib.Nifti1Image(changed, US_AFFINE), str(tmp_path / "changed.nii.gz"))
    fields = {}
    for mode, net in (
        ("sequence", _random_head(SequenceRegistrationNet(ContentNet(), hidden=4))),
        ("static", ContentNet()),
    ):
        for name in ("seq", "changed"):
            registrar = make_registrar(net, spatial_size=(16, 16, 16), use_rigid=False, roi_mask=False)
            out = tmp_path / mode / name
            register_sequence(registrar, case["mr_image"], tmp_path / f"{name}.nii.gz", out)
            fields[mode, name] = np.asarray(nib.load(out / "transform_fixed_to_moving_sequence.nii.gz").dataobj)
    assert not np.allclose(fields["sequence", "seq"][..., 1, :], fields["sequence", "changed"][..., 1, :], atol=1e-3)
    assert np.array_equal(fields["static", "seq"][..., 1, :], fields["static", "changed"][..., 1, :])
    assert not np.allclose(fields["static", "seq"][..., 0, :], fields["static", "changed"][..., 0, :], atol=1e-3)


def test_a_bad_frame_publishes_nothing(small, tmp_path):
    case = small["case"]
    with pytest.raises(InputError, match="frame 2: fixed sequence has NaN"):
        register_sequence(
            load_registrar(_configs(small)),
            case["mr_image"],
            _sequence(tmp_path / "s.nii.gz", nan_frame=2),
            tmp_path / "o",
        )
    assert not (tmp_path / "o").exists()
    masks = tmp_path / "masks.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((10, 12, 9, FRAMES), np.uint8), US_AFFINE), str(masks))
    record = register_sequence(
        load_registrar(_configs(small)),
        case["mr_image"],
        _sequence(tmp_path / "u.nii.gz"),
        tmp_path / "q",
        None,
        None,
        masks,
    )
    assert [r["masks"]["source"]["fixed_mask"] for r in record["per_frame"]] == ["given"] * FRAMES
    nib.save(nib.Nifti1Image(np.ones((10, 12, 9, 2), np.uint8), US_AFFINE), str(masks))
    with pytest.raises(InputError, match="one mask per frame"):
        register_sequence(
            load_registrar(_configs(small)),
            case["mr_image"],
            _sequence(tmp_path / "t.nii.gz"),
            tmp_path / "p",
            None,
            None,
            masks,
        )


class _Frames:
    """A stand-in per-frame dataset: ``data`` items named like the frame view, tensors per item."""

    def __init__(self, names):
        self.data = [{"case": n} for n in names]

    def __getitem__(self, i):
        return {"image": torch.full((2, 2, 2, 2), float(i)), "moving_label": torch.zeros(1, 2, 2, 2)}


def test_windows_cover_every_start_with_the_frames_before_as_burn_in():
    names = [f"case{c:06d}_f{t:03d}" for c in range(2) for t in range(5)]
    windows = SequenceWindows(_Frames(names[::-1]), window=3)  # order in the dataset does not matter
    assert len(windows) == 2 * 3
    item = windows[2]  # case 0, start 2: burn-in frames 0, 1
    assert item["burn_in_image"].shape[0] == 2 and item["image"].shape[:2] == (3, 2)
    assert item["frame_index"].tolist() == [names[::-1].index(f"case000000_f{t:03d}") for t in (2, 3, 4)]
    assert windows[0]["burn_in_image"].shape[0] == 0
    assert frame_of("case000003_f007") == ("case000003", 7)
    with pytest.raises(InputError, match="not a frame"):
        SequenceWindows(_Frames(["case000000"]), window=1)
    with pytest.raises(InputError, match="fewer than the window"):
        SequenceWindows(_Frames(names[:2]), window=3)


@pytest.mark.full
def test_cli_and_bundle_register_a_4d_sequence(small, tmp_path):
    case = small["case"]
    fixed = _sequence(tmp_path / "seq.nii.gz")
    configs = "[" + ",".join(f"'{c}'" for c in _configs(small)) + "]"
    cli = [sys.executable, "-m", "scripts", "register", "--moving", str(case["mr_image"]), "--fixed", str(fixed)]
    cli += ["--moving-labels", str(case["mr_label"]), "--out", str(tmp_path / "cli"), "--config-file", configs]
    (tmp_path / "targets.csv").write_text("# frame: RAS\nlabel,x,y,z\ntarget,10,12,8\n")
    cli += ["--points", str(tmp_path / "targets.csv")]
    proc = subprocess.run(cli + ["--pictures", "false"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "state kept between frames" in proc.stdout
    bundle = [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, "--moving", str(case["mr_image"])]
    bundle += ["--fixed", str(fixed), "--moving_label", str(case["mr_label"]), "--output_dir", str(tmp_path / "b")]
    proc = subprocess.run(bundle, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = np.asarray(nib.load(tmp_path / "cli" / "warped_label_sequence.nii.gz").dataobj)
    b = np.asarray(nib.load(tmp_path / "b" / "warped_label_sequence.nii.gz").dataobj)
    assert a.shape == (10, 12, 9, FRAMES, 6) and np.array_equal(a, b)
    for t in range(FRAMES):  # each frame with its QC and its own mapping of the points
        assert (tmp_path / "cli" / f"frame{t:03d}" / "qc.json").is_file()
        assert "target" in (tmp_path / "cli" / f"frame{t:03d}" / "targets_to_fixed.csv").read_text()


@pytest.mark.full
def test_sequence_training_moves_the_cell_and_not_the_static_network(tmp_path):
    data = tmp_path / "frames"
    for t in range(3):
        write_case(data, "train", f"case000000_f{t:03d}", seed=t)
    init = tmp_path / "static.pt"
    torch.manual_seed(0)
    net = RegistrationNet(**SMALL, spatial_size=(16, 16, 16))
    torch.save(net.state_dict(), init)
    configs = "['configs/train.json','configs/sequence_train.json']"
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", configs]
    command += ["--dataset_dir", str(data), "--run_dir", str(tmp_path / "run"), "--init_weights", str(init)]
    command += ["--spatial_size", "[16,16,16]", "--use_rigid", "False", "--roi_mask", "False", "--max_epochs", "1"]
    command += ["--sequence_window", "2", "--progress_bar", "False"]
    for key, value in SMALL.items():
        command += [f"--network_def#{key}", json.dumps(value)]
    proc = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    for key, value in net.state_dict().items():
        if key != "_extra_state":
            assert torch.equal(trained[f"static.{key}"], value), key
    assert trained["head.weight"].abs().sum() > 0  # zero at initialisation
