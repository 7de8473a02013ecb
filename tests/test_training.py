"""configs/train.json and scripts/training/run_folder.py: run folders, checkpoints, resume, and a short training that learns.

The end-to-end tests run ``python -m monai.bundle`` in a subprocess on a tiny synthetic data set
(``conftest.make_dataset``): a spherical gland whose TRUS copy is the MR copy shifted by a fixed 9.5 mm, on
differently oriented MR and TRUS grids. Without registration its Dice follows from the
two-sphere overlap formula; a few seeded CPU epochs of a small network must do clearly better.
"""

import json
import random
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import NO_RIGID, ROOT, SMALL_NET, SPHERE_SHIFT_MM, load, make_dataset, run_bundle
from ignite.engine import Engine
from monai.bundle import ConfigParser

from scripts.data.nifti import InputError
from scripts.data.transforms import LandmarkErrord, PairToBoxd, TrueFieldToBoxd, Warpd
from scripts.inference.pair import PairStage
from scripts.networks.registration import decode_settings
from scripts.training.run_folder import (
    AtomicCheckpointSaver,
    RngState,
    active_config,
    config_fingerprint,
    drop_replaced_run,
    prepare_run_dir,
)
from scripts.weights.trained_model import EXTRA_STATE

# ---------------------------------------------------------------- tiny synthetic data set (conftest.make_dataset)


def sphere_dice(radius, distance):
    """Dice of two balls of equal radius whose centres are ``distance`` apart (lens volume formula)."""
    lens = np.pi * (4 * radius + distance) * (2 * radius - distance) ** 2 / 12
    return lens / (4 / 3 * np.pi * radius**3)


# ---------------------------------------------------------------- running the bundle


def scalars(run_dir, tag):
    """{step: value} of one TensorBoard scalar written by the run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "tensorboard"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A seeded 3-epoch training with ``run training``; returns (data folder, run folder, log, radii)."""
    base = tmp_path_factory.mktemp("training")
    radii = make_dataset(base / "data")
    rc, log = run_bundle("training", base / "data", base / "run", "--max_epochs", "3", "--seed", "0", *NO_RIGID)
    assert rc == 0, log[-3000:]
    return base / "data", base / "run", log, radii


@pytest.mark.full
def test_training_writes_checkpoints_that_load_weights_only(trained):
    _, run, log, _ = trained
    assert "starting a new training" in log
    assert "Epoch [1/3]" not in log  # --progress_bar false switches ignite's progress bar off
    for name in ("last.pt", "best.pt"):
        ckpt = load(run / name)
        assert {"model", "optimizer", "mask_optimizer", "lr_scheduler", "rng", "validation", "trainer"} <= set(ckpt)
        assert isinstance(ckpt["rng"]["torch"], torch.Tensor) and ckpt["rng"]["torch"].dtype == torch.uint8
    last = load(run / "last.pt")
    assert last["trainer"]["iteration"] == 3 * 4  # 3 epochs of 4 training cases, batch size 1
    # best.pt is the epoch with the highest validation gland Dice
    dice = scalars(run, "val_gland_dice")
    best = load(run / "best.pt")
    assert best["trainer"]["iteration"] == 4 * max(dice, key=dice.get)
    assert best["validation"]["best_metric"] == pytest.approx(max(dice.values()), abs=1e-6)
    assert json.loads((run / "run_config.json").read_text())["config"]["learning_rate"] == 0.005


@pytest.mark.full
def test_short_training_lowers_loss_and_beats_no_registration(trained):
    _, run, _, radii = trained
    loss = scalars(run, "train_loss")
    assert sorted(loss) == [1, 2, 3]
    assert loss[3] < loss[1]
    unregistered = scalars(run, "val_gland_dice_rigid_only")  # no rigid step in this run: no registration
    expected = np.mean([sphere_dice(radii[c], np.linalg.norm(SPHERE_SHIFT_MM)) for c in ("case000004", "case000005")])
    assert unregistered[1] == pytest.approx(expected, abs=0.04)  # the validation sees the unwarped labels as they are
    registered = scalars(run, "val_gland_dice")
    assert max(registered.values()) >= unregistered[1] + 0.05


@pytest.mark.full
def test_same_command_resumes_and_changed_config_needs_overwrite(trained, tmp_path):
    data, run, _, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)  # run_dir is not part of the fingerprint: the copy resumes

    rc, log = run_bundle("training", data, copy, "--max_epochs", "4", "--seed", "0", *NO_RIGID)
    assert rc == 0, log[-3000:]
    assert f"resuming from {copy / 'last.pt'} at epoch 3" in log
    assert load(copy / "last.pt")["trainer"]["iteration"] == 4 * 4  # one more epoch, not four
    assert sorted(scalars(copy, "train_loss")) == [1, 2, 3, 4]

    rc, log = run_bundle(None, data, copy, "--max_epochs", "1", "--seed", "1", *NO_RIGID)  # plain `run`, other seed
    assert rc != 0
    assert f"{copy}: the config differs from the run in this folder" in log
    assert "seed: 0 -> 1" in log and "--overwrite true" in log
    assert load(copy / "last.pt")["trainer"]["iteration"] == 16  # untouched

    rc, log = run_bundle(None, data, copy, "--max_epochs", "1", "--seed", "1", "--overwrite", "true", *NO_RIGID)
    assert rc == 0, log[-3000:]
    assert "starting a new training" in log
    assert load(copy / "last.pt")["trainer"]["iteration"] == 4
    assert sorted(scalars(copy, "train_loss")) == [1]  # the old TensorBoard logs were removed


@pytest.mark.full
def test_phantom_training_beats_no_registration_and_the_rigid_step(tmp_path):
    """The default pipeline (ANTs rigid on the gland masks, ROI images) on small phantom data, 10 seeded epochs."""
    from scripts.evaluation.evaluate import identity_warp, read_label
    from scripts.evaluation.metrics import soft_dice
    from scripts.phantom.synth import synth

    synth(tmp_path / "data", cases=6, seed=0, size="small", preview=False)  # 4 train, 1 val, 1 holdout
    rc, log = run_bundle(
        "training", tmp_path / "data", tmp_path / "run", "--max_epochs", "10", "--seed", "0", grid="[32,32,32]"
    )
    assert rc == 0, log[-3000:]
    loss = scalars(tmp_path / "run", "train_loss")
    assert min(loss[e] for e in range(6, 11)) < loss[1]
    # no registration, computed independently of the training code: the moving gland resampled through the
    # two affines onto the fixed grid
    val = next((tmp_path / "data" / "val" / "mr_labels").iterdir()).name
    moving, moving_img = read_label(tmp_path / "data" / "val" / "mr_labels" / val)
    fixed, fixed_img = read_label(tmp_path / "data" / "val" / "us_labels" / val)
    unregistered = soft_dice(identity_warp(moving[:1], moving_img.affine, fixed_img)[0] > 0.5, fixed[0] > 0.5)
    registered, rigid_only = (
        scalars(tmp_path / "run", "val_gland_dice"),
        scalars(tmp_path / "run", "val_gland_dice_rigid_only"),
    )
    assert max(registered.values()) >= unregistered + 0.05
    assert registered[10] > rigid_only[10]  # the network adds to the rigid step
    tre, tre_rigid = (
        scalars(tmp_path / "run", "val_landmark_tre_mm"),
        scalars(tmp_path / "run", "val_landmark_tre_mm_rigid_only"),
    )
    assert sorted(tre) == sorted(tre_rigid) == list(range(1, 11)) and all(np.isfinite(list(tre.values())))
    assert len(set(tre_rigid.values())) == 1  # the rigid-only error does not depend on the network


# ---------------------------------------------------------------- run folder rules (in-process)


def _checkpoint(path, iteration=8, epoch_length=4):
    torch.save({"model": {}, "trainer": {"iteration": iteration, "epoch_length": epoch_length}}, path)


def test_run_dir_fresh_resume_and_refusals(tmp_path, caplog):
    run, config = tmp_path / "run", {"seed": 0, "net": {"channels": [4, 8]}, "max_epochs": 3}
    caplog.set_level("INFO")
    assert prepare_run_dir(str(run), config=config) is None  # missing folder: fresh
    assert (run / "run_config.json").is_file()
    assert prepare_run_dir(str(run), config=config) is None  # same config, no checkpoint yet: fresh

    _checkpoint(run / "last.pt")
    extended = {**config, "max_epochs": 10}  # max_epochs does not block a resume
    assert prepare_run_dir(str(run), config=extended) == str(run / "last.pt")
    assert f"resuming from {run / 'last.pt'} at epoch 2" in caplog.text

    changed = {**config, "net": {"channels": [4, 16]}}
    with pytest.raises(InputError, match=r"net#channels: \[4, 8\] -> \[4, 16\]") as err:
        prepare_run_dir(str(run), config=changed)
    assert str(run) in str(err.value) and "--overwrite true" in str(err.value)

    with pytest.raises(InputError, match="config differs"):  # the command line's "false" is not a yes
        prepare_run_dir(str(run), overwrite="false", config=changed)

    (run / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="last.pt: checkpoint cannot be read"):
        prepare_run_dir(str(run), config=config)

    (run / "tensorboard").mkdir()
    (run / "notes.txt").write_text("mine")
    _checkpoint(run / "best.pt")
    assert prepare_run_dir(str(run), overwrite=True, config=changed) is None
    # only our files moved aside, kept until the new run's first epoch has saved its checkpoints
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt", "replaced_run", "run_config.json"]
    assert sorted(p.name for p in (run / "replaced_run").iterdir()) == [
        "best.pt",
        "last.pt",
        "run_config.json",
        "tensorboard",
    ]
    assert json.loads((run / "run_config.json").read_text())["config"]["net"] == {"channels": [4, 16]}
    # the new run failed before saving anything; a second --overwrite keeps the first replaced run
    assert prepare_run_dir(str(run), overwrite=True, config=config) is None
    assert (run / "replaced_run" / "best.pt").is_file() and not (run / "best.pt").exists()
    trainer = Engine(lambda engine, batch: None)
    drop_replaced_run(trainer, str(run))
    trainer.run([0, 1], max_epochs=2)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt", "run_config.json"]


def test_run_dir_with_a_best_model_and_no_last_checkpoint_is_not_restarted(tmp_path):
    run, config = tmp_path / "run", {"seed": 0}
    prepare_run_dir(str(run), config=config)
    _checkpoint(run / "best.pt")
    before = (run / "best.pt").read_bytes()
    with pytest.raises(InputError, match=r"holds best\.pt but no last\.pt"):
        prepare_run_dir(str(run), config=config)
    assert (run / "best.pt").read_bytes() == before


def test_run_dir_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "other.txt").write_text("x")
    with pytest.raises(InputError, match="no run_config.json"):
        prepare_run_dir(str(tmp_path), config={"seed": 0})


def test_fingerprint_ignores_listed_ids_only():
    config = {"seed": 0, "device": "cpu", "train": {"trainer": {"max_epochs": 3, "lr": 1}}}
    ignore = ["device", "train#trainer#max_epochs"]
    same = {"seed": 0, "device": "cuda", "train": {"trainer": {"max_epochs": 9, "lr": 1}}}
    assert config_fingerprint(config, ignore) == config_fingerprint(same, ignore)
    assert config_fingerprint(config, ignore) != config_fingerprint({**config, "seed": 1}, ignore)


def test_active_config_sees_overrides():
    parser = ConfigParser(
        {
            "imports": ["$import scripts", "$import scripts.training.run_folder"],
            "a": 1,
            "seen": "$scripts.training.run_folder.active_config()",
        }
    )
    parser.update({"a": 2})
    parser.parse()
    assert parser.get_parsed_content("seen")["a"] == 2
    with pytest.raises(RuntimeError):
        active_config()


# ---------------------------------------------------------------- checkpoint objects


def test_rng_state_round_trip_through_weights_only_load(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    torch.save(RngState().state_dict(), tmp_path / "rng.pt")
    first = (random.random(), np.random.rand(), torch.rand(2).tolist())
    RngState().load_state_dict(load(tmp_path / "rng.pt"))
    assert (random.random(), np.random.rand(), torch.rand(2).tolist()) == first


class _Validator:
    class state:  # noqa: N801 (ignite's attribute name)
        best_metric_epoch = -1
        best_metric = -1.0


def _engine(epochs):
    engine = Engine(lambda e, b: None)
    engine.run([0, 1], max_epochs=epochs)
    return engine


def test_best_saver_writes_only_on_a_new_best(tmp_path):
    saver = AtomicCheckpointSaver(str(tmp_path), {"rng": RngState()}, "best.pt", validator=_Validator)
    engine = _engine(2)
    _Validator.state.best_metric_epoch = 1  # the best was at epoch 1, the engine is at epoch 2
    saver(engine)
    assert not (tmp_path / "best.pt").exists()
    _Validator.state.best_metric_epoch = 2
    saver(engine)
    assert load(tmp_path / "best.pt")["trainer"]["iteration"] == 4


def test_saver_keeps_the_previous_checkpoint_when_writing_fails(tmp_path, monkeypatch):
    saver = AtomicCheckpointSaver(str(tmp_path), {"rng": RngState()}, "last.pt")
    saver(_engine(1))

    def broken_save(obj, path):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        saver(_engine(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind
    assert load(tmp_path / "last.pt")["trainer"]["iteration"] == 2  # still the epoch-1 checkpoint


# ---------------------------------------------------------------- transforms


def test_warpd_moves_a_label_by_the_field():
    label = torch.zeros(2, 8, 6, 5)
    label[0, 3, 2, 2] = 1.0
    label[1, 5, 1, 4] = 1.0  # lands outside the grid: zeros padding
    ddf = torch.zeros(3, 8, 6, 5)
    ddf[0], ddf[2] = 1.0, -1.0  # out(p) = label(p + (1, 0, -1))
    out = Warpd("label", ddf_key="ddf", output_keys="warped")({"label": label, "ddf": ddf})["warped"]
    expected = torch.zeros_like(label)
    expected[0, 2, 2, 3] = 1.0
    assert torch.allclose(out, expected, atol=1e-5)


def test_landmark_error_measures_centroid_shifts_in_mm_on_the_box(tmp_path):
    """Box of 8x8x4 on a 16x16x12 fixed grid of 1 mm voxels with a depth crop of 2: box voxels are
    2 x 2 x 1.5 mm; a landmark moved by one box voxel along x and two along z is sqrt(2² + 3²) mm away."""
    fixed_image = tmp_path / "fixed.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 12), np.float32), np.eye(4)), str(fixed_image))
    fixed, moving = torch.zeros(3, 8, 8, 4), torch.zeros(3, 8, 8, 4)
    fixed[0, 2:6, 2:6, 1:3] = moving[0, 2:6, 2:6, 1:3] = 1  # gland: left out when landmarks exist
    fixed[1, 3, 3, 0], moving[1, 4, 3, 2] = 1, 1
    fixed[2, 5, 5, 1] = 1  # absent from the moving label: left out
    pair = PairStage((8, 8, 4), depth_crop=2)
    transform = LandmarkErrord("moving", fixed_key="fixed", output_keys="error", pair=pair)
    error = transform({"moving": moving, "fixed": fixed, "fixed_image": str(fixed_image)})["error"]
    assert error.item() == pytest.approx(np.hypot(2.0, 3.0))
    moving[1] = 0  # no landmark left in both: NaN, not a made-up number
    assert torch.isnan(transform({"moving": moving, "fixed": fixed, "fixed_image": str(fixed_image)})["error"])


def test_true_field_target_warps_the_moving_labels_onto_the_fixed_ones(tmp_path):
    """TrueFieldToBoxd turns the phantom's true map into the network's box field after the case's rigid:
    warping the moving labels with it must land on the fixed labels far better than the rigid alone."""
    from scripts.data.datalist import load_split
    from scripts.evaluation.metrics import soft_dice
    from scripts.phantom.synth import synth

    synth(str(tmp_path / "data"), cases=2, seed=0, size="small", splits="1,0,0", preview=False)
    item = load_split(tmp_path / "data", "train", "mr2us")[1]
    pair = PairStage((32, 32, 24), depth_crop=2, use_rigid=True)
    boxed = PairToBoxd(pair)(item)
    out = Warpd("moving_label", ddf_key="true_ddf", output_keys="warped")(TrueFieldToBoxd(pair)(boxed))
    fixed = out["fixed_label"][0].numpy() > 0.5
    rigid_only = soft_dice(out["moving_label"][0].numpy() > 0.5, fixed)
    assert soft_dice(out["warped"][0].numpy() > 0.5, fixed) >= max(0.9, rigid_only + 0.03)
    missing = dict(item, fixed_image=str(tmp_path / "elsewhere" / "us_images" / "x.nii.gz"))
    with pytest.raises(InputError, match="ddf_mr2us"):
        TrueFieldToBoxd(pair)(dict(boxed, fixed_image=missing["fixed_image"]))


def test_field_term_switch_adds_the_true_field_without_touching_the_prestage_cache(tmp_path):
    """loss#field_weight > 0 appends TrueFieldToBoxd after the cached transforms: the PersistentDataset
    hash (hence the cached pre-stage) stays that of the runs without it, and the iteration passes true_ddf on."""
    from scripts.phantom.synth import synth

    synth(str(tmp_path / "data"), cases=2, seed=0, size="small", splits="1,0,0", preview=False)
    datasets = {}
    for weight in (0.0, 0.01):
        parser = ConfigParser()
        parser.read_config(str(ROOT / "configs" / "train.json"))
        parser.update(
            {"dataset_dir": str(tmp_path / "data"), "run_dir": str(tmp_path / "run"), "loss#field_weight": weight}
        )
        datasets[weight] = parser.get_parsed_content("train#dataset")
    names = {w: [type(t).__name__ for t in d.transform.transforms] for w, d in datasets.items()}
    assert names[0.0] == ["PairToBoxd", "EnsureTyped"] and names[0.01] == names[0.0] + ["TrueFieldToBoxd"]
    assert datasets[0.0].transform_hash == datasets[0.01].transform_hash


@pytest.mark.full
def test_make_model_stores_the_trained_settings_and_loaders_refuse_others(trained, tmp_path):
    """``make-model`` writes the run's best weights with its grid and network; the CLI loader runs them with
    those settings and stops, naming the difference, when the config gives another grid or width."""
    from scripts.inference.registrar import load_registrar
    from scripts.weights.trained_model import make_model

    data, run, _, _ = trained
    out = tmp_path / "model.pt"
    make_model(str(run), out=str(out))
    stored = load(out)  # a plain state dict (the zoo's format): the best epoch's tensors, the settings beside them
    best = load(run / "best.pt")["model"]
    assert stored.keys() == best.keys() and all(torch.equal(stored[k], best[k]) for k in best if k != EXTRA_STATE)
    assert decode_settings(best[EXTRA_STATE]) == {}  # training checkpoints carry none
    settings = decode_settings(stored[EXTRA_STATE])
    assert settings["spatial_size"] == [24, 24, 24] and settings["network_def"]["spatial_size"] == [24, 24, 24]
    assert settings["roi_mask"] is False and settings["depth_crop"] == 0  # the run's NO_RIGID overrides
    # the config the run was trained with, written as inference overrides: loads, weights equal
    overrides = {
        "spatial_size": [24, 24, 24],
        "pair_overrides": {"depth_crop": 0},
        "roi_mask": False,
        "device": "cpu",
        "seg_checkpoint": str(tmp_path / "none.pt"),
    }
    small = {SMALL_NET[i][2:]: json.loads(SMALL_NET[i + 1]) for i in range(0, len(SMALL_NET), 2)}
    overrides.update(
        {k: v for k, v in small.items() if k.startswith("network_def#")}
    )  # not the training-only task mask
    overrides["network_def#msfa_mode"] = "paper"  # train.json's default (inference.json has the shipped model's)
    (tmp_path / "same.json").write_text(json.dumps(overrides))
    config = [str(ROOT / "configs" / "inference.json"), str(tmp_path / "same.json")]
    network = load_registrar(config, {"checkpoint": str(out)}).network
    assert all(torch.equal(network.state_dict()[k], best[k]) for k in best if k != EXTRA_STATE)
    assert network.trained_settings == settings
    (tmp_path / "other.json").write_text(json.dumps({**overrides, "spatial_size": [32, 32, 32]}))
    with pytest.raises(InputError, match=r"spatial_size: trained with \[24, 24, 24\], configured \[32, 32, 32\]"):
        load_registrar([config[0], str(tmp_path / "other.json")], {"checkpoint": str(out)})
    with pytest.raises(FileExistsError):  # never replaced silently
        make_model(str(run), out=str(out))
    # fine-tuning: a fresh run starts from these weights (learning rate 0: they come out unchanged) ...
    rc, log = run_bundle(
        "training",
        data,
        tmp_path / "finetune",
        "--max_epochs",
        "1",
        "--seed",
        "0",
        *NO_RIGID,
        "--init_weights",
        str(out),
        "--learning_rate",
        "0.0",
    )
    assert rc == 0, log[-3000:]
    tuned = load(tmp_path / "finetune" / "last.pt")["model"]
    assert all(torch.equal(tuned[k], best[k]) for k in best if k != EXTRA_STATE)
    assert decode_settings(tuned[EXTRA_STATE]) == settings  # the settings it was checked against travel on
    # ... and refuses weights trained on another grid, naming it
    rc, log = run_bundle(
        "training",
        data,
        tmp_path / "other_grid",
        "--max_epochs",
        "1",
        *NO_RIGID,
        "--init_weights",
        str(out),
        grid="[32,32,32]",
    )
    assert rc != 0 and "spatial_size: trained with [24, 24, 24], configured [32, 32, 32]" in log
    # a diverged run (NaN weights) does not become a model
    nan_run = tmp_path / "nan_run"
    shutil.copytree(run, nan_run, ignore=shutil.ignore_patterns("tensorboard"))
    ckpt = load(nan_run / "best.pt")
    first = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
    ckpt["model"][first].fill_(float("nan"))
    torch.save(ckpt, nan_run / "best.pt")
    with pytest.raises(InputError, match="NaN"):
        make_model(str(nan_run), out=str(tmp_path / "nan.pt"))
