"""Command line for the biopsy workflow (``python -m scripts register|register-folder|map-points``).

Each registered case gets the pipeline's files (``docs/pipeline.md``), ``qc.json`` (:mod:`scripts.evaluation.qc`),
three PNGs (:mod:`scripts.evaluation.pictures`) and, when points are given, the points mapped into fixed space
(:mod:`scripts.spatial.points`). The registrar (network, pair stage, segmenter, post-processing) is the
``registrar`` of ``configs/inference.json``, so the CLI registers exactly as the bundle config does.
``docs/biopsy.md`` is the user guide.
"""

from __future__ import annotations

import difflib
import inspect
import sys
from pathlib import Path

from tqdm import tqdm

from scripts.data.case_folder import case_transaction
from scripts.data.datalist import check_direction, load_split
from scripts.data.nifti import InputError, flag, read_nifti, same_grid, write_json
from scripts.evaluation.pictures import case_pictures, write_index
from scripts.evaluation.qc import quality_check
from scripts.inference.registrar import Registrar, load_registrar, refuse_taken_case_folders
from scripts.inference.segmentation import MissingSegmenter
from scripts.inference.sequence import register_sequence
from scripts.inference.timing import StageTimer, summary
from scripts.spatial.points import check_point_files, map_files

__all__ = ["register", "register_folder", "map_points", "cli_registrar"]

GLAND_SOURCES = ("auto", "predicted", "label", "none")


def cli_registrar(config_file=None, checkpoint=None, use_network: bool = True, use_rigid: bool = True) -> Registrar:
    """The inference config's ``registrar`` (:func:`scripts.inference.registrar.load_registrar`) with the CLI's
    switches as config overrides: ``checkpoint`` (must exist), ``use_network`` false (``network`` None: the rigid
    step alone), ``use_rigid`` false."""
    overrides = {} if use_rigid else {"use_rigid": False}
    if checkpoint is not None:  # load_registrar names a missing one
        overrides["checkpoint"] = str(Path(checkpoint).absolute())
    if not use_network:
        overrides["network"] = None
    return load_registrar(config_file, overrides)


def _predicts_masks(registrar: Registrar) -> bool:
    """Whether the registrar's segmenter can predict gland masks (declared, with its weights)."""
    return registrar.segmenter is not None and not isinstance(registrar.segmenter, MissingSegmenter)


QC_FAIL_STATUS = 3  # exit status of a run whose outputs are written but whose QC says "fail"
QC_FIXED = ("case_dir", "fixed_gland", "gland_source", "moving_gland", "overwrite")  # quality_check's non-thresholds


def check_qc_settings(qc) -> dict:
    """The ``--qc`` thresholds as a dict, refused (:class:`InputError`) unless every key is a threshold of
    :func:`scripts.evaluation.qc.quality_check` (with the nearest one named) and every value a number (or null)."""
    if qc is None:
        return {}
    if not isinstance(qc, dict):
        raise InputError(f"--qc must be a dict of thresholds such as {{min_gland_dice: 0.8}}, got {qc!r}")
    known = [k for k in inspect.signature(quality_check).parameters if k not in QC_FIXED]
    for key, value in qc.items():
        if key not in known:
            near = difflib.get_close_matches(str(key), known, n=1)
            raise InputError(
                f"--qc: unknown threshold {key!r}"
                + (f" (did you mean {near[0]!r}?)" if near else "")
                + f"; known: {', '.join(known)}"
            )
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise InputError(f"--qc: {key} must be a number, got {value!r}")
        if "dice" in key and value is not None and not 0 <= value <= 1:
            raise InputError(f"--qc: {key} is a Dice, between 0 and 1, got {value!r}")
    return qc


def _check_case_inputs(fixed, fixed_gland, points, frame) -> None:
    """What a case reads after the registration, checked before it: the QC's fixed gland (readable, on the fixed
    image's grid) and the point files (readable, frame stated)."""
    if fixed_gland is not None:
        mask = read_nifti(fixed_gland, ndim=(3, 4), what="fixed gland")
        if not same_grid(mask, read_nifti(fixed, ndim=3, what="fixed image")):
            raise InputError(f"{fixed_gland}: fixed gland mask is not on the fixed image's grid ({fixed})")
    check_point_files(points, frame)


def _register_case(
    registrar: Registrar,
    pair: dict,
    out,
    direction,
    fixed_gland,
    gland_source,
    points,
    frame,
    pictures,
    qc,
    overwrite,
    timer=None,
    settings_files=(),
) -> dict:
    """Register one pair, then QC, pictures and point mapping; returns what was written, the QC and the seconds.

    ``pair``: the :meth:`scripts.inference.registrar.Registrar.register` paths (``moving_image``, ``fixed_image``,
    ``moving_labels``, ``moving_mask``, ``fixed_mask``). ``fixed_gland`` (a path) is the QC's fixed gland; with
    ``gland_source == "predicted"`` it is taken from
    the pipeline's own prediction (``result.json``'s ``masks``) instead. ``result.json``'s ``seconds`` gains the
    qc, pictures and points stages, and its total becomes the whole case's wall time (since ``timer`` started,
    when one is given: e.g. with the network's loading). ``settings_files`` (the config files and checkpoint the
    user named) join the inputs that an overwritten case folder must not hold.
    """
    timer, out = timer or StageTimer(), Path(out)
    points = points.split(",") if isinstance(points, str) else points  # a file or a comma-separated list
    moving_labels = pair.get("moving_labels")
    _check_case_inputs(pair["fixed_image"], fixed_gland, points, frame)
    inputs = (*(v for v in pair.values() if v is not None), fixed_gland, *(points or []), *settings_files)
    with case_transaction(out, overwrite, inputs) as stage:  # every file below, published together
        result = registrar.register(out_dir=stage, direction=direction, publish=False, **pair)
        timer.stages.update({k: v for k, v in result["seconds"].items() if k != "total"})
        if gland_source == "predicted":
            fixed_gland = stage / result["masks"]["fixed"]
        with timer("qc"):
            verdict = quality_check(
                stage, fixed_gland, gland_source if fixed_gland is not None else None, moving_gland=moving_labels, **qc
            )
        with timer("pictures"):
            images = case_pictures(stage, moving_labels, fixed_gland, title=out.name) if pictures else []
        if points is not None:
            with timer("points"):
                try:
                    map_files(stage, stage, points=points, to="fixed", frame=frame)
                except InputError as err:  # name the case folder the user knows, not the private staging folder
                    raise InputError(str(err).replace(str(stage), str(out))) from None
        result["seconds"] = timer.seconds
        write_json(result, stage / "result.json", overwrite=True)  # this call's own file, now with every stage
        written = sorted(out / p.relative_to(stage) for p in stage.rglob("*") if p.is_file())
    images, written = [str(out / Path(p).relative_to(stage)) for p in images], [str(p) for p in written]
    return {"out": str(out), "written": written, "qc": verdict, "pictures": images, "seconds": result["seconds"]}


def _report(name: str, qc: dict, seconds: dict, write=print) -> None:
    """One line per case: the QC verdict (on stderr, WARNING or ERROR, unless pass), then the seconds per stage."""
    if qc["verdict"] == "pass":
        write(f"{name}: QC pass; {summary(seconds)}")
    else:
        level = "ERROR" if qc["verdict"] == "fail" else "WARNING"
        write(f"{level} {name}: QC {qc['verdict']}: {'; '.join(qc['reasons'])}; {summary(seconds)}", file=sys.stderr)


def _is_sequence(fixed) -> bool:
    """A list of frames, or a NIfTI file whose header says 4-D (nothing else is read)."""
    if isinstance(fixed, (list, tuple)):
        return True
    return read_nifti(fixed, ndim=(3, 4), what="fixed image").ndim == 4


def _sequence_configs(sequence_network: bool) -> list:
    """The configs for a sequence: the sequence mode's when asked and its weights exist, else the static one's."""
    root = Path(__file__).resolve().parents[2]
    if sequence_network and not (root / "models" / "sequence_model.pt").is_file():
        print("WARNING: no models/sequence_model.pt: each frame is registered on its own", file=sys.stderr)
        sequence_network = False
    return [
        str(root / "configs" / name) for name in ("inference.json", "sequence_inference.json")[: 1 + sequence_network]
    ]


def _paths(*values) -> list:
    """Path arguments as text: fire turns ``--out 2024`` into an int and ``--out True`` into a bool."""
    return [str(v) if isinstance(v, (int, float, bool, Path)) else v for v in values]


def _settings_files(config_file, checkpoint) -> list:
    """The config files and checkpoint a user named: an overwritten case folder must not hold them."""
    configs = config_file if isinstance(config_file, (list, tuple)) else [config_file]
    return [str(f) for f in (*configs, checkpoint) if f is not None]


def _flags(**values) -> list[bool]:
    """The yes/no arguments as bools: fire passes ``--pictures false`` as the string "false" (:func:`flag`)."""
    return [flag(value, name) for name, value in values.items()]


def register(
    moving,
    fixed,
    out,
    moving_labels=None,
    points=None,
    direction: str = "mr2us",
    frame: str | None = None,
    fixed_gland=None,
    moving_mask=None,
    fixed_mask=None,
    config_file=None,
    checkpoint=None,
    use_rigid: bool = True,
    use_network: bool = True,
    pictures: bool = True,
    qc: dict | None = None,
    overwrite: bool = False,
    sequence_network: bool = True,
) -> None:
    """Register a moving image to a fixed image; write transforms, warped image/labels, qc.json, pictures.

    Args:
        moving, fixed: NIfTI images (mr2us: moving = MR, fixed = TRUS). A 4-D ``fixed`` (X, Y, Z, T), or a list of
            3-D frames, is a live sequence: every frame is registered into ``out/frameNNN/`` (with its QC, pictures
            and mapped points), and ``out`` gets the 4-D warped labels and fields and ``sequence.json``
            (:mod:`scripts.inference.sequence`); ``fixed_mask`` is then a 4-D mask sequence.
        out: output folder.
        moving_labels: labels on the moving grid (3-D, or 4-D channel-last with the gland in channel 0).
        points: points on the moving image to map into fixed space: a CSV (label,x,y,z) or 3D Slicer ``.mrk.json``.
        direction: "mr2us" or "us2mr" (recorded).
        frame: None, "LPS" or "RAS": the frame of a CSV's coordinates when the CSV does not state it (a 'frame'
            column or a '# frame: ...' first line); a CSV stating another frame is refused. Markups carry their own.
        fixed_gland: gland mask on the fixed grid for the QC Dice (QC only); default: the gland the pipeline
            predicts when the segmenter's weights (models/seg_model.pt) exist, else no Dice.
        moving_mask, fixed_mask: gland masks on each image's grid for the rigid step and the network's ROI
            inputs; without them the config's segmenter predicts them (docs/pipeline.md, the masks rule).
        config_file: inference config (default configs/inference.json), or a list of config files merged in
            order (e.g. the inference config and an override file); checkpoint: weights (default its own).
        use_rigid: run the ANTs rigid step. use_network: run the trained network after it (false: the rigid
            step alone, for comparison). pictures: write the PNGs.
        qc: QC thresholds overriding :func:`scripts.evaluation.qc.quality_check`'s defaults, e.g. ``{"min_gland_dice": 0.8}``.
        overwrite: replace existing outputs.
        sequence_network: for a sequence, the sequence mode (``configs/sequence_inference.json``: state kept from
            frame to frame) when ``config_file`` is not given; false: the static network on each frame alone.
    """
    if _is_sequence(fixed):
        config_file = config_file or _sequence_configs(flag(sequence_network, "sequence_network"))
    timer = StageTimer()
    use_rigid, use_network, pictures, overwrite = _flags(
        use_rigid=use_rigid, use_network=use_network, pictures=pictures, overwrite=overwrite
    )
    moving, fixed, out, moving_labels, fixed_gland, moving_mask, fixed_mask, checkpoint, points = _paths(
        moving, fixed, out, moving_labels, fixed_gland, moving_mask, fixed_mask, checkpoint, points
    )
    check_direction(direction)
    qc = check_qc_settings(qc)
    with timer("load"):
        registrar = cli_registrar(config_file, checkpoint, use_network, use_rigid)
    source = "given" if fixed_gland is not None else ("predicted" if _predicts_masks(registrar) else None)
    if source == "predicted" and fixed_mask is not None:  # the given mask is the pipeline's fixed gland
        fixed_gland, source = fixed_mask, "given"
    pair = {
        "moving_image": moving,
        "fixed_image": fixed,
        "moving_labels": moving_labels,
        "moving_mask": moving_mask,
        "fixed_mask": fixed_mask,
    }
    if _is_sequence(fixed):
        settings = _settings_files(config_file, checkpoint)

        def one_frame(registrar, frame_pair, frame_out):
            gland, how = (frame_pair["fixed_mask"], "given") if frame_pair["fixed_mask"] else (fixed_gland, source)
            args = (direction, gland, how, points, frame, pictures, qc, False, None, settings)
            case = _register_case(registrar, frame_pair, frame_out, *args)
            _report(Path(frame_out).name, case["qc"], case["seconds"])
            return {"qc": case["qc"]["verdict"], "seconds": case["seconds"]}

        record = register_sequence(
            registrar, moving, fixed, out, moving_labels, moving_mask, fixed_mask, overwrite, one_frame
        )
        print(f"wrote {record['frames']} frames into {out} ({record['network']})")
        if any(r["qc"] == "fail" for r in record["per_frame"]):
            raise SystemExit(QC_FAIL_STATUS)
        return
    case = _register_case(
        registrar,
        pair,
        out,
        direction,
        fixed_gland,
        source,
        points,
        frame,
        pictures,
        qc,
        overwrite,
        timer,
        _settings_files(config_file, checkpoint),
    )
    print(f"wrote {len(case['written'])} files:")
    for path in case["written"]:
        print(f"  {path}")
    _report(Path(out).name, case["qc"], case["seconds"])
    if case["qc"]["verdict"] == "fail":
        raise SystemExit(QC_FAIL_STATUS)


def register_folder(
    dataset_dir,
    out,
    split: str = "holdout",
    direction: str = "mr2us",
    gland: str = "auto",
    config_file=None,
    checkpoint=None,
    use_rigid: bool = True,
    use_network: bool = True,
    pictures: bool = True,
    qc: dict | None = None,
    overwrite: bool = False,
) -> None:
    """Register every case of a μ-RegPro split (outputs in ``out/<case>/``) and write ``out/index.html``.

    Args:
        dataset_dir, split: the μ-RegPro folder and split; direction: "mr2us" or "us2mr".
        gland: the fixed gland for the QC Dice: "predicted" (segmentation network, needs models/seg_model.pt),
            "label" (the split's fixed label, channel 0), "none", or "auto" (predicted if possible, else label).
        Other arguments as for :func:`register`.
    """
    use_rigid, use_network, pictures, overwrite = _flags(
        use_rigid=use_rigid, use_network=use_network, pictures=pictures, overwrite=overwrite
    )
    dataset_dir, out, checkpoint = _paths(dataset_dir, out, checkpoint)
    qc = check_qc_settings(qc)
    if gland not in GLAND_SOURCES:
        raise InputError(f"gland must be one of {GLAND_SOURCES}, got {gland!r}")
    cases, settings_files = load_split(dataset_dir, split, direction), _settings_files(config_file, checkpoint)
    refuse_taken_case_folders(out, cases, overwrite, extra=[Path(out) / "index.html"], inputs=settings_files)
    registrar = cli_registrar(config_file, checkpoint, use_network, use_rigid)
    predicted = _predicts_masks(registrar)
    if gland == "predicted" and not predicted:
        raise InputError("gland='predicted' needs the gland segmenter's weights (models/seg_model.pt)")
    source = {"auto": "predicted" if predicted else "label", "none": None}.get(gland, gland)
    done = []
    for case in tqdm(cases, desc="register", unit="case"):
        fixed_gland = case["fixed_label"] if source == "label" else None
        pair = {"moving_image": case["moving_image"], "fixed_image": case["fixed_image"]}
        result = _register_case(
            registrar,
            {**pair, "moving_labels": case["moving_label"]},
            Path(out) / case["case"],
            direction,
            fixed_gland,
            source,
            None,
            None,
            pictures,
            qc,
            overwrite,
            settings_files=settings_files,
        )
        done.append({"case": case["case"], **result})
        _report(case["case"], result["qc"], result["seconds"], tqdm.write)
    index = write_index(out, done, overwrite)
    n = {v: sum(c["qc"]["verdict"] == v for c in done) for v in ("pass", "warn", "fail")}
    print(
        f"wrote {len(done)} case folders in {out} and the index {index}; QC: {n['pass']} pass, {n['warn']} warn, "
        f"{n['fail']} fail"
    )
    if n["fail"]:
        raise SystemExit(QC_FAIL_STATUS)


def map_points(
    transforms,
    out,
    points=None,
    labels=None,
    to: str = "fixed",
    frame: str | None = None,
    label_threshold: float = 0.5,
    overwrite: bool = False,
) -> None:
    """Map points (CSV label,x,y,z or 3D Slicer ``.mrk.json``) and label volumes through a registration's files.

    Args:
        transforms: a case output folder of ``register`` (holds the transform files).
        out: output folder; files are named ``<input>_to_<to>.<suffix>``.
        points, labels: a file or a comma-separated list of files in the other space.
        to: "fixed" (moving -> fixed, e.g. MR targets onto TRUS) or "moving" (back).
        frame: None, "LPS" or "RAS": the frame of CSV coordinates when the CSV does not state it (a 'frame'
            column or a '# frame: ...' first line); a CSV stating another frame is refused.
        label_threshold: binarisation of mapped labels.
    """
    transforms, out = _paths(transforms, out)
    split = lambda x: x.split(",") if isinstance(x, str) else x  # noqa: E731
    for path in map_files(
        transforms,
        out,
        points=split(points),
        labels=split(labels),
        to=to,
        frame=frame,
        label_threshold=label_threshold,
        overwrite=overwrite,
    ):
        print(f"wrote {path}")
