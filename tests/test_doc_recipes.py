"""The ANTs and ITK recipes of docs/pipeline.md, run verbatim in a case folder, give the bundle's own results.

Each ```python block of the section "Applying the transforms elsewhere" is executed as written (cwd: a case
folder registered with a rigid step and a deforming stand-in network, the pair linked as moving.nii.gz and
fixed.nii.gz), then its variables are compared with the pipeline's outputs: warped images with
warped_image.nii.gz (forward) and with the composed inverse field applied by ANTs (inverse), points with the
bundle's own point mapping (scripts.spatial.points) and with each other after a round trip.
"""

import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import CROP, SIZE, ContentNet, register_pair

from scripts.inference.registrar import OUTPUTS
from scripts.spatial.points import transform_points

DOC = Path(__file__).resolve().parents[1] / "docs" / "pipeline.md"


def recipe_blocks() -> list[str]:
    text = DOC.read_text()
    section = text[text.index("## Applying the transforms elsewhere") : text.index("## Checked by the tests")]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.fixture(scope="module")
def recipes(case, tmp_path_factory):
    """Run every block in one namespace inside a registered case folder; return the namespace and the folder."""
    out = tmp_path_factory.mktemp("recipes") / "case"
    rigid = np.eye(4)
    c, s = np.cos(np.deg2rad(8)), np.sin(np.deg2rad(8))
    rigid[:3, :3] = [[c, 0, s], [0, 1, 0], [-s, 0, c]]
    rigid[:3, 3] = [3.0, -2.0, 1.5]
    register_pair(
        case["mr_image"],
        case["us_image"],
        out,
        None,
        network=ContentNet(),
        spatial_size=SIZE,
        depth_crop=CROP,
        rigid=rigid,
    )
    (out / "moving.nii.gz").symlink_to(case["mr_image"])
    (out / "fixed.nii.gz").symlink_to(case["us_image"])
    blocks, namespace, cwd = recipe_blocks(), {}, os.getcwd()
    assert len(blocks) == 3  # ANTs images, ANTs points, ITK
    os.chdir(out)
    try:
        for block in blocks:
            exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102  (the documented code, as written)
    finally:
        os.chdir(cwd)
    return namespace, out


def _array(image) -> np.ndarray:
    import itk

    return image.numpy() if hasattr(image, "numpy") else np.transpose(itk.array_from_image(image), (2, 1, 0))


def test_documented_ants_and_itk_image_recipes_give_the_bundles_warped_image(recipes):
    ns, out = recipes
    reference = np.asarray(nib.load(out / OUTPUTS["warped_image"]).dataobj, np.float64)
    span = np.ptp(reference)
    for name in ("warped", "warped_composed", "warped_itk"):
        assert np.abs(_array(ns[name]) - reference).mean() <= 0.01 * span, name


def test_documented_inverse_recipes_agree_and_are_not_the_identity(recipes):
    import ants

    ns, out = recipes
    reference = ns["back_composed"].numpy()  # the composed inverse field (tests/test_pipeline.py checks it)
    assert np.abs(ns["back"].numpy() - reference).mean() <= 0.01 * np.ptp(reference)
    unmoved = ants.resample_image_to_target(ns["fixed"], ns["moving"]).numpy()
    assert np.abs(unmoved - reference).mean() > 0.03 * np.ptp(reference)  # the transform does something


def test_documented_point_recipes_match_the_bundles_point_mapping(recipes):
    ns, out = recipes
    mr = ns["targets_mr"][["x", "y", "z"]].to_numpy(np.float64)
    bundle_trus = transform_points(mr, out / "transform_moving_to_fixed.nii.gz")
    assert np.linalg.norm(bundle_trus - mr, axis=1).min() > 1.0  # the targets move
    for name, trus in (
        ("ants", ns["targets_trus"][["x", "y", "z"]].to_numpy()),
        ("itk", np.asarray([list(ns["target_trus"])])),
    ):
        expected = bundle_trus[: len(trus)]
        assert np.linalg.norm(trus - expected, axis=1).max() <= 0.3, name
    round_trip = ns["targets_back"][["x", "y", "z"]].to_numpy()
    assert np.linalg.norm(round_trip - mr, axis=1).max() <= 0.3
    assert np.linalg.norm(np.asarray(list(ns["target_back"])) - mr[0]) <= 0.3
