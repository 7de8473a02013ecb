"""Command-line overrides must name ids of the config files (scripts/overrides.py)."""

import pytest

from scripts.io import InputError
from scripts.overrides import check_overrides, config_ids

BUNDLE = "/venv/lib/python3.11/site-packages/monai/bundle/__main__.py"
TRAIN = "['configs/train.json','configs/cpu_net.json','configs/cpu_recipe.json']"


def test_config_ids_cover_nested_keys_and_list_items():
    assert config_ids({"a": {"b": [1, {"c": 2}]}, "d": 3}) == ["a", "a#b", "a#b#0", "a#b#1", "a#b#1#c", "d"]


def test_known_ids_and_run_arguments_pass():
    check_overrides([BUNDLE, "run", "training", "--config_file", TRAIN, "--dataset_dir", "data", "--max_epochs", "3",
                     "--loss#field_weight", "0.01", "--network_def#task_mask=false", "--overwrite", "--run_id", "x",
                     "--train#handlers#0#new_argument", "1"])  # a component's new keyword: its constructor checks it
    check_overrides(["/usr/bin/pytest", "--max_epoch", "3"])  # not a bundle command: left alone


@pytest.mark.parametrize("argv, message", [
    ([BUNDLE, "run", "training", "--config_file", TRAIN, "--max_epoch", "3"], r"--max_epoch \(did you mean --max_epochs\?\)"),
    ([BUNDLE, "run", "training", "--config_file", TRAIN, "--learning_rat", "1e-3"], r"did you mean --learning_rate\?"),
    ([BUNDLE, "run", "training", "--config_file", TRAIN, "--train#handlerz#0#x", "1"], r"--train#handlerz#0#x"),
    (["/b/scripts/__main__.py", "run", "--config_file=configs/inference.json", "--checkpont", "m.pt"],
     r"configs/inference\.json: no config id for the override\(s\) --checkpont \(did you mean --checkpoint\?\)"),
])
def test_a_mistyped_override_is_refused_with_the_nearest_id(argv, message):
    with pytest.raises(InputError, match=message):
        check_overrides(argv)
