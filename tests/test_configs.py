"""The configs that must agree: a model trained with train.json is run by inference.json."""

import json
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_inference_builds_the_network_and_box_that_training_trains():
    train, infer = (json.loads((CONFIGS / name).read_text()) for name in ("train.json", "inference.json"))
    assert infer["network_def"] == train["network_def"]
    for key in ("spatial_size", "depth_crop", "roi_mask", "use_rigid", "direction"):
        assert infer[key] == train[key], key
