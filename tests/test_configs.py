"""The configs that must agree: the shipped weights are trained by these configs and run by inference.json."""

import json
import shutil
from pathlib import Path

import torch
from monai.bundle import ConfigParser

from scripts.weights.trained_model import REGISTRATION, SEGMENTATION, settings_of, stored_settings

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# the configs that train the shipped weights (docs/model_card.md)
SHIPPED_TRAINING = ("train.json", "cpu_net.json", "cpu_recipe.json")
SHIPPED_SEG_TRAINING = ("seg_train.json", "cpu_seg_recipe.json")


def _settings(names, kind):
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / n) for n in names])
    return settings_of(parser, kind)


def test_inference_configs_describe_the_shipped_recipe_and_weights():
    """inference.json / seg_inference.json build the networks and grids that the shipped recipe trains,
    and the settings stored in the shipped weights (make-model) are those configs' settings."""
    infer = _settings(["inference.json"], REGISTRATION)
    assert infer == _settings(SHIPPED_TRAINING, REGISTRATION)
    for stage in ("cpu_recipe_continue.json", "cpu_recipe_field.json"):  # the shipped stages 2 and 3
        assert infer == _settings(SHIPPED_TRAINING + (stage,), REGISTRATION), stage
    seg = _settings(["seg_inference.json"], SEGMENTATION)
    assert seg == _settings(SHIPPED_SEG_TRAINING, SEGMENTATION)
    train, inference = (json.loads((CONFIGS / n).read_text()) for n in ("train.json", "inference.json"))
    for key in ("use_rigid", "direction", "pair_overrides", "pair"):  # "pair": the one configs/pair.json loader
        assert inference[key] == train[key], key
    for weights, expected in (("models/model.pt", infer), ("models/seg_model.pt", seg)):
        stored = stored_settings(torch.load(CONFIGS.parent / weights, map_location="cpu", weights_only=True))
        assert stored == expected, weights


def _pair_stages(bundle_root, recipe=SHIPPED_TRAINING):
    """The pair stage that ``recipe`` trains with (inside ``train#preprocessing``'s PairToBoxd) and the one
    ``inference.json`` runs with, both parsed from the configs of ``bundle_root``."""
    stages = []
    for names, where in ((recipe, "train#preprocessing"), (("inference.json",), "pair")):
        parser = ConfigParser()
        parser.read_config([str(Path(bundle_root) / "configs" / n) for n in names])
        parser["bundle_root"] = str(bundle_root)
        found = parser.get_parsed_content(where)
        stages.append(found if where == "pair" else found.transforms[0].pair)
    return stages


def _pair_settings(stage) -> dict:
    return {**vars(stage), "intensity": (type(stage.intensity), vars(stage.intensity))}


def test_training_and_inference_run_the_same_pair_stage():
    """The shipped recipe trains on the geometry inference.json runs: the same PairStage settings, box, rigid,
    intensities and ROI switch, from the one configs/pair.json."""
    trained, inferred = _pair_stages(CONFIGS.parent)
    assert type(trained) is type(inferred) and _pair_settings(trained) == _pair_settings(inferred)
    assert (
        trained.rigid_args["iterations"] == json.loads((CONFIGS / "pair.json").read_text())["rigid_args"]["iterations"]
    )


def test_an_edit_of_the_shared_pair_block_reaches_training_and_inference(tmp_path):
    """Changing rigid_args (and the depth crop) in configs/pair.json changes both stages: there is no second copy."""
    shutil.copytree(CONFIGS, tmp_path / "configs")
    pair = json.loads((tmp_path / "configs" / "pair.json").read_text())
    pair["rigid_args"]["iterations"] = [37, 11]
    pair["depth_crop"] = 3
    (tmp_path / "configs" / "pair.json").write_text(json.dumps(pair))
    for stage in _pair_stages(tmp_path):
        assert stage.rigid_args["iterations"] == [37, 11] and stage.depth_crop == 3
    before = _pair_stages(CONFIGS.parent)[0]
    assert before.rigid_args["iterations"] != [37, 11] and before.depth_crop != 3


def _imported_modules(config: dict) -> set[str]:
    lines = config.get("imports", []) + config.get("+imports", [])
    return {line.split()[-1] for line in lines if line.startswith("$import ")}


def test_every_scripts_module_an_expression_uses_is_imported():
    """A `$` expression that names `scripts.<module>` needs `$import scripts.<module>` in its config
    (an override's `+imports` adds to train.json's); `$import scripts` alone does not load submodules,
    so a missing line fails only in a fresh process, as `init_weights` once did."""
    import re

    train = json.loads((CONFIGS / "train.json").read_text())
    for path in sorted(CONFIGS.glob("**/*.json")):
        config = json.loads(path.read_text())
        if "imports" not in config and "+imports" not in config:
            continue
        imported = _imported_modules(config) | (_imported_modules(train) if "+imports" in config else set())
        names = re.findall(
            r"\bscripts(?:\.[A-Za-z_]+)+",
            " ".join(s for s in _strings(config) if s.startswith("$") and not s.startswith("$import ")),
        )
        used = {name.rsplit(".", 1)[0] for name in names}  # scripts.<package>.<module>.<attribute> -> the module
        assert used <= imported, f"{path.name}: expressions use {sorted(used - imported)} without importing them"


def _strings(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)
    elif isinstance(node, str):
        yield node


def test_the_deploy_package_manifest_carries_the_bundle_version():
    import yaml

    manifest = yaml.safe_load((CONFIGS.parent / "apps" / "deploy" / "app.yaml").read_text())
    assert str(manifest["application"]["version"]) == json.loads((CONFIGS / "metadata.json").read_text())["version"]


def test_metadata_pins_are_the_requirements_pins():
    """The versions the metadata declares (what the model zoo installs) are the ones the tests run with."""
    pins = {}
    for line in (CONFIGS.parent / "requirements.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip()] = version.strip()
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    declared = {"monai": meta["monai_version"], "torch": meta["pytorch_version"], "numpy": meta["numpy_version"]}
    declared.update(meta["required_packages_version"])
    assert {name: pins.get(name) for name in declared} == declared


def test_settings_of_a_config_holding_python_objects():
    """Code that builds a config with objects (a torch.device override) still gets its settings, not a JSON error."""
    config = json.loads((CONFIGS / "inference.json").read_text())
    config["device"] = torch.device("cpu")
    assert settings_of(config) == settings_of(json.loads((CONFIGS / "inference.json").read_text()))


def test_the_shipped_torchscript_is_the_shipped_weights_of_this_version():
    """``models/model.ts`` (scripted by ``python -m scripts export``) gives ``models/model.pt``'s field through the
    inference config and carries this version's metadata: re-export it when the weights or the version change."""
    from scripts.weights.trained_model import load_weights

    extra = {"metadata.json": ""}
    scripted = torch.jit.load(str(CONFIGS.parent / "models" / "model.ts"), _extra_files=extra)
    assert (
        json.loads(extra["metadata.json"])["version"] == json.loads((CONFIGS / "metadata.json").read_text())["version"]
    )
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    parser["bundle_root"] = str(CONFIGS.parent)
    net = load_weights(parser.get_parsed_content("network_def"), CONFIGS.parent / "models" / "model.pt")
    x = torch.rand(1, 2, 48, 48, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ddf = net(x)
        assert ddf.abs().max() > 0.1 and torch.equal(scripted(x), ddf)


def test_modules_that_locate_the_bundle_root_find_it():
    """The modules that find configs/, models/ and large_files.yml from their own path (they moved a level deeper
    with the stage layout once, and the demo looked in scripts/models/)."""
    from scripts.inference import registrar
    from scripts.tools import demo
    from scripts.weights import trained_model

    for module in (registrar, demo, trained_model):
        assert module.BUNDLE_ROOT == CONFIGS.parent, module.__name__
        assert (module.BUNDLE_ROOT / "models" / "model.pt").is_file() and (
            module.BUNDLE_ROOT / "large_files.yml"
        ).is_file()
