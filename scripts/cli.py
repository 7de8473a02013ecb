"""Command line for the biopsy workflow (``python -m scripts register|register-folder|map-points``).

Each registered case gets the pipeline's files (``docs/pipeline.md``), ``qc.json`` (:mod:`scripts.qc`),
three PNGs (:mod:`scripts.pictures`) and, when points are given, the points mapped into fixed space
(:mod:`scripts.points`). The network, its box and pre/post-processing come from ``configs/inference.json``,
so the CLI registers exactly as the bundle config does. ``docs/biopsy.md`` is the user guide.
"""

from __future__ import annotations

import sys
from pathlib import Path

from monai.bundle import ConfigParser
from tqdm import tqdm

from scripts.data import load_split
from scripts.io import InputError, flag, write_json
from scripts.pictures import case_pictures, write_index
from scripts.pipeline import load_weights, refuse_taken_case_folders, register_pair
from scripts.trained_model import settings_of
from scripts.points import map_files
from scripts.qc import quality_check
from scripts.timing import StageTimer, summary

__all__ = ["register", "register_folder", "map_points", "load_registration"]

BUNDLE_ROOT = Path(__file__).resolve().parent.parent
CONFIG = BUNDLE_ROOT / "configs" / "inference.json"
# register_pair settings read from the inference config
CONFIG_KEYS = ("spatial_size", "depth_crop", "axcodes", "rigid_args", "int_steps", "label_threshold",
               "preprocessing", "inferer", "postprocessing", "device", "amp")
GLAND_SOURCES = ("auto", "predicted", "label", "none")


def load_registration(config_file=None, checkpoint=None, use_network: bool = True) -> tuple[object, dict]:
    """The network (``network_def`` of the inference config, weights loaded) and the other ``register_pair`` settings.

    Without a ``checkpoint`` argument the config's (``models/model.pt``) is used; if that file does not
    exist, a warning is printed and the network is ``None`` (rigid-only registration). A ``checkpoint``
    given explicitly must exist. When the config's ``use_seg`` is on and its gland segmenter weights
    (``seg_checkpoint``, ``models/seg_model.pt``) exist, ``settings["seg_network"]`` is that segmenter, so the pipeline predicts
    both glands (used by the rigid step, ``roi_mask`` and the QC). A config whose ``network`` is an object
    of its own (``configs/inference_onnx.json``: the ONNX file on ONNX Runtime) gives that network instead.
    ``use_network=False``: no network (``None``: the rigid step only, for comparison), the rest as above.
    """
    files = [CONFIG] if config_file is None else config_file if isinstance(config_file, (list, tuple)) else [config_file]
    for path in files:
        if not Path(path).is_file():
            raise InputError(f"{path}: config file does not exist")
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])  # later files override earlier ones, as with the bundle runner
    parser["bundle_root"] = str(BUNDLE_ROOT)
    settings = {k: parser.get_parsed_content(k) for k in CONFIG_KEYS}
    seg_weights = parser.get("seg_checkpoint") and Path(parser.get_parsed_content("seg_checkpoint"))
    roi_mask = flag(parser.get_parsed_content("roi_mask"), "roi_mask")
    if flag(parser.get_parsed_content("use_seg"), "use_seg") and seg_weights and seg_weights.is_file():
        parser["use_seg"] = True
        settings.update(seg_network=parser.get_parsed_content("seg_network"), roi_mask=roi_mask)
    elif roi_mask:
        print(f"WARNING: no gland segmenter weights at {seg_weights}: the network gets whole images, not the ROI "
              "images it was trained on (roi_mask); train configs/seg_train.json for the paper's ROI step.",
              file=sys.stderr)
    if not flag(use_network, "use_network"):
        return None, settings
    if isinstance(parser.get("network"), dict):  # the config builds its own network (configs/inference_onnx.json)
        if checkpoint is not None:
            raise InputError(f"{checkpoint}: the config's network ({parser.get('network').get('_target_')}) "
                             "does not load PyTorch checkpoints; leave --checkpoint out")
        return parser.get_parsed_content("network"), settings
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise InputError(f"{checkpoint}: checkpoint file does not exist")
    weights = Path(checkpoint if checkpoint is not None else parser.get_parsed_content("checkpoint"))
    if not weights.is_file():
        print(f"WARNING: no trained weights at {weights}: registering with the RIGID step only (no deformable "
              "part). Train the network (configs/train.json) or pass --checkpoint.", file=sys.stderr)
        return None, settings
    network = load_weights(parser.get_parsed_content("network_def"), str(weights), settings["device"],
                           settings=settings_of(parser))
    return network, settings


def _register_case(network, settings, moving, fixed, out, moving_labels, direction, fixed_gland, gland_source,
                   points, frame, use_rigid, pictures, qc, overwrite, timer=None) -> dict:
    """Register one pair, then QC, pictures and point mapping; returns what was written, the QC and the seconds.

    ``fixed_gland`` (a path) is the QC's fixed gland; with ``gland_source == "predicted"`` it is taken from
    the pipeline's own prediction (``result.json``'s ``masks``) instead. ``result.json``'s ``seconds`` gains the
    qc, pictures and points stages, and its total becomes the whole case's wall time (since ``timer`` started,
    when one is given: e.g. with the network's loading).
    """
    timer = timer or StageTimer()
    result = register_pair(moving, fixed, out, moving_labels, network=network, direction=direction,
                           use_rigid=use_rigid, overwrite=overwrite, **settings)
    timer.stages.update({k: v for k, v in result["seconds"].items() if k != "total"})
    written = [str(Path(out) / name) for name in result["files"].values()] + [str(Path(out) / "result.json")]
    if gland_source == "predicted":
        fixed_gland = result["masks"]["fixed"]
    with timer("qc"):
        verdict = quality_check(out, fixed_gland, gland_source if fixed_gland is not None else None,
                                overwrite=overwrite, **(qc or {}))
    written.append(str(Path(out) / "qc.json"))
    with timer("pictures"):
        images = case_pictures(out, moving_labels, fixed_gland, overwrite=overwrite) if pictures else []
    written += images
    if points is not None:
        with timer("points"):
            written += map_files(out, out, points=points, to="fixed", frame=frame, overwrite=overwrite)
    result["seconds"] = timer.seconds
    write_json(result, Path(out) / "result.json", overwrite=True)  # this call's own file, now with every stage
    return {"out": str(out), "written": written, "qc": verdict, "pictures": images, "seconds": result["seconds"]}


def _report(name: str, qc: dict, seconds: dict, write=print) -> None:
    """One line per case: the QC verdict (a warning on stderr unless pass), then the seconds per stage."""
    if qc["verdict"] == "pass":
        write(f"{name}: QC pass; {summary(seconds)}")
    else:
        write(f"WARNING {name}: QC {qc['verdict']}: {'; '.join(qc['reasons'])}; {summary(seconds)}", file=sys.stderr)


def _flags(**values) -> list[bool]:
    """The yes/no arguments as bools: fire passes ``--pictures false`` as the string "false" (:func:`flag`)."""
    return [flag(value, name) for name, value in values.items()]


def register(moving, fixed, out, moving_labels=None, points=None, direction: str = "mr2us", frame: str = "LPS",
             fixed_gland=None, config_file=None, checkpoint=None, use_rigid: bool = True, use_network: bool = True,
             pictures: bool = True, qc: dict | None = None, overwrite: bool = False) -> None:
    """Register a moving image to a fixed image; write transforms, warped image/labels, qc.json, pictures.

    Args:
        moving, fixed: NIfTI images (mr2us: moving = MR, fixed = TRUS).
        out: output folder.
        moving_labels: labels on the moving grid (3-D, or 4-D channel-last with the gland in channel 0).
        points: points on the moving image to map into fixed space: a CSV (label,x,y,z) or 3D Slicer ``.mrk.json``.
        direction: "mr2us" or "us2mr" (recorded).
        frame: "LPS" or "RAS", the frame of a CSV's coordinates (markups carry their own).
        fixed_gland: gland mask on the fixed grid for the QC Dice (QC only); default: the gland the pipeline
            predicts when the segmenter's weights (models/seg_model.pt) exist, else no Dice.
        config_file: inference config (default configs/inference.json), or a list of config files merged in
            order (e.g. the inference config and an override file); checkpoint: weights (default its own).
        use_rigid: run the ANTs rigid step. use_network: run the trained network after it (false: the rigid
            step alone, for comparison). pictures: write the PNGs.
        qc: QC thresholds overriding :func:`scripts.qc.quality_check`'s defaults, e.g. ``{"min_gland_dice": 0.8}``.
        overwrite: replace existing outputs.
    """
    timer = StageTimer()
    use_rigid, use_network, pictures, overwrite = _flags(use_rigid=use_rigid, use_network=use_network,
                                                         pictures=pictures, overwrite=overwrite)
    with timer("load"):
        network, settings = load_registration(config_file, checkpoint, use_network)
    source = "given" if fixed_gland is not None else ("predicted" if "seg_network" in settings else None)
    case = _register_case(network, settings, moving, fixed, out, moving_labels, direction, fixed_gland, source,
                          points, frame, use_rigid, pictures, qc, overwrite, timer)
    print(f"wrote {len(case['written'])} files:")
    for path in case["written"]:
        print(f"  {path}")
    _report(Path(out).name, case["qc"], case["seconds"])


def register_folder(dataset_dir, out, split: str = "holdout", direction: str = "mr2us", gland: str = "auto",
                    config_file=None, checkpoint=None, use_rigid: bool = True, use_network: bool = True,
                    pictures: bool = True, qc: dict | None = None, overwrite: bool = False) -> None:
    """Register every case of a μ-RegPro split (outputs in ``out/<case>/``) and write ``out/index.html``.

    Args:
        dataset_dir, split: the μ-RegPro folder and split; direction: "mr2us" or "us2mr".
        gland: the fixed gland for the QC Dice: "predicted" (segmentation network, needs models/seg_model.pt),
            "label" (the split's fixed label, channel 0), "none", or "auto" (predicted if possible, else label).
        Other arguments as for :func:`register`.
    """
    use_rigid, use_network, pictures, overwrite = _flags(use_rigid=use_rigid, use_network=use_network,
                                                         pictures=pictures, overwrite=overwrite)
    if gland not in GLAND_SOURCES:
        raise InputError(f"gland must be one of {GLAND_SOURCES}, got {gland!r}")
    cases = load_split(dataset_dir, split, direction)
    refuse_taken_case_folders(out, cases, overwrite, extra=[Path(out) / "index.html"])
    network, settings = load_registration(config_file, checkpoint, use_network)
    predicted = "seg_network" in settings
    if gland == "predicted" and not predicted:
        raise InputError("gland='predicted' needs the gland segmenter's weights (models/seg_model.pt)")
    source = {"auto": "predicted" if predicted else "label", "none": None}.get(gland, gland)
    done = []
    for case in tqdm(cases, desc="register", unit="case"):
        fixed_gland = case["fixed_label"] if source == "label" else None
        result = _register_case(network, settings, case["moving_image"], case["fixed_image"], Path(out) / case["case"],
                                case["moving_label"], direction, fixed_gland, source, None, "LPS", use_rigid,
                                pictures, qc, overwrite)
        done.append({"case": case["case"], **result})
        _report(case["case"], result["qc"], result["seconds"], tqdm.write)
    index = write_index(out, done, overwrite)
    n_warn = sum(c["qc"]["verdict"] != "pass" for c in done)
    print(f"wrote {len(done)} case folders in {out} and the index {index}; QC: {len(done) - n_warn} pass, {n_warn} warn")


def map_points(transforms, out, points=None, labels=None, to: str = "fixed", frame: str = "LPS",
               label_threshold: float = 0.5, overwrite: bool = False) -> None:
    """Map points (CSV label,x,y,z or 3D Slicer ``.mrk.json``) and label volumes through a registration's files.

    Args:
        transforms: a case output folder of ``register`` (holds the transform files).
        out: output folder; files are named ``<input>_to_<to>.<suffix>``.
        points, labels: a file or a comma-separated list of files in the other space.
        to: "fixed" (moving -> fixed, e.g. MR targets onto TRUS) or "moving" (back).
        frame: "LPS" or "RAS" for CSV coordinates; label_threshold: binarisation of mapped labels.
    """
    split = lambda x: x.split(",") if isinstance(x, str) else x  # noqa: E731
    for path in map_files(transforms, out, points=split(points), labels=split(labels), to=to, frame=frame,
                          label_threshold=label_threshold, overwrite=overwrite):
        print(f"wrote {path}")

