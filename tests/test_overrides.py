"""Command-line overrides must name ids of the config files (scripts/overrides.py)."""

import json

import pytest

from scripts.data.nifti import InputError
from scripts.overrides import check_overrides, config_ids

BUNDLE = "/venv/lib/python3.11/site-packages/monai/bundle/__main__.py"
TRAIN = "['configs/train.json','configs/cpu_net.json','configs/cpu_recipe.json']"


def test_config_ids_cover_nested_keys_and_list_items():
    assert config_ids({"a": {"b": [1, {"c": 2}]}, "d": 3}) == ["a", "a#b", "a#b#0", "a#b#1", "a#b#1#c", "d"]


def test_known_ids_and_run_arguments_pass():
    check_overrides(
        [
            BUNDLE,
            "run",
            "training",
            "--config_file",
            TRAIN,
            "--dataset_dir",
            "data",
            "--max_epochs",
            "3",
            "--loss#field_weight",
            "0.01",
            "--network_def#msfa=False",
            "--overwrite",
            "--run_id",
            "x",
            "--train#handlers#0#new_argument",
            "1",
        ]
    )  # a component's new keyword: its constructor checks it
    check_overrides(["/usr/bin/pytest", "--max_epoch", "3"])  # not a bundle command: left alone


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            [BUNDLE, "run", "training", "--config_file", TRAIN, "--max_epoch", "3"],
            r"--max_epoch \(did you mean --max_epochs\?\)",
        ),
        (
            [BUNDLE, "run", "training", "--config_file", TRAIN, "--learning_rat", "1e-3"],
            r"did you mean --learning_rate\?",
        ),
        ([BUNDLE, "run", "training", "--config_file", TRAIN, "--train#handlerz#0#x", "1"], r"--train#handlerz#0#x"),
        (
            ["/b/scripts/__main__.py", "run", "--config_file=configs/inference.json", "--checkpont", "m.pt"],
            r"configs/inference\.json: no config id for the override\(s\) --checkpont \(did you mean --checkpoint\?\)",
        ),
    ],
)
def test_a_mistyped_override_is_refused_with_the_nearest_id(argv, message):
    with pytest.raises(InputError, match=message):
        check_overrides(argv)


@pytest.mark.parametrize(
    "value, message",
    [
        (
            "false",
            r"--network_def#msfa false: python -m monai.bundle run passes 'false' on as text, which Python reads "
            r"as yes; write True or False",
        ),
        ("flase", r"--network_def#msfa must be true or false \(or yes/no, 1/0\), got 'flase'"),
    ],
)
def test_a_yes_no_override_that_would_be_misread_is_refused(value, message):
    check_overrides([BUNDLE, "run", "training", "--config_file", TRAIN, "--network_def#msfa", "yes"])  # read as yes
    with pytest.raises(InputError, match=message):
        check_overrides([BUNDLE, "run", "training", "--config_file", TRAIN, "--network_def#msfa", value])
    # python -m scripts run reads yes/no words itself (scripts/tools/runner.py), so only the unreadable one is refused there
    wrapper = ["/b/scripts/__main__.py", "run", "training", "--config_file", TRAIN, "--network_def#msfa", value]
    if value == "flase":
        with pytest.raises(InputError, match=message):
            check_overrides(wrapper)
    else:
        check_overrides(wrapper)


@pytest.mark.parametrize("value, expected", [("false", False), ("No", False), ("TRUE", True), ("1", True)])
def test_the_runner_reads_yes_no_words_as_bools(tmp_path, value, expected):
    """``python -m scripts run`` hands the config a real bool for a yes/no id (fire would pass the text)."""
    from scripts.tools.runner import run

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"switch": True, "out": "", "run": ["$open(@out, 'w').write(repr(@switch))"]}))
    run("run", config_file=str(config), switch=value, out=str(tmp_path / "seen.txt"))
    assert (tmp_path / "seen.txt").read_text() == repr(expected)
