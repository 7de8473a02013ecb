"""Shared test fixtures: tiny μ-RegPro-layout folders written with nibabel."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

MR_AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
US_AFFINE = np.array([[0.0, -2.5, 0.0, 40.0], [2.5, 0.0, 0.0, -10.0], [0.0, 0.0, 2.5, 5.0], [0, 0, 0, 1.0]])


# a small registration network (RegistrationNet arguments) for tests that train or run the pipeline
SMALL = dict(
    encoder_channels=[4, 4, 4, 4],
    decoder_channels=[4, 4, 4, 4],
    head_channels=[4, 4, 4],
    chunks=2,
    lstm_hidden=8,
    lstm_layers=1,
    compact_code=[4, 4, 2],
    task_hidden=8,
    msfa_mode="paper",
)


def write_case(root, split, case, channels=6, mr_shape=(12, 14, 10), us_shape=(10, 12, 9), seed=0):
    """Write one case (two images, two channel-last labels with a non-empty gland) and return its MR/TRUS paths."""
    rng = np.random.default_rng(seed)
    paths = {}
    for mod, shape, affine in (("mr", mr_shape, MR_AFFINE), ("us", us_shape, US_AFFINE)):
        image = rng.random(shape).astype(np.float32)
        label = np.zeros((*shape, channels), np.uint8)
        label[2:-2, 2:-2, 2:-2, 0] = 1
        for kind, data in (("images", image), ("labels", label)):
            path = Path(root) / split / f"{mod}_{kind}" / f"{case}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data, affine), str(path))
            paths[f"{mod}_{kind[:-1]}"] = path
    return paths


@pytest.fixture
def tiny_dataset(tmp_path):
    """A factory: ``tiny_dataset(n_cases=2, channels=6, split="train")`` -> dataset root with that many cases."""

    def make(n_cases=2, channels=6, split="train"):
        for i in range(n_cases):
            write_case(tmp_path, split, f"case{i:06d}", channels=channels, seed=i)
        return tmp_path

    return make


def initial_weights(path, **overrides) -> Path:
    """The inference config's network (``overrides``: config ids -> values) with its seeded initial weights, saved
    as a plain state dict: for runs that need a checkpoint file (a missing one is an error) but no training."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(Path(__file__).resolve().parents[1] / "configs" / "inference.json"))
    for key, value in overrides.items():
        parser[key] = value
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    return Path(path)
