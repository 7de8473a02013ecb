"""Does the trained network register beyond its rigid pre-alignment? The test-split table of a trained run.

    python benchmarks/first_model.py --data data/realistic --model models/model.pt --seg_model models/seg_model.pt \\
        --run_dir "['runs/cpu_recipe','runs/cpu_recipe_long']" --baselines "{'voxelmorph': 'runs/voxelmorph_model.pt'}" \\
        --work /tmp/first_model --out docs/first_model.md

Rows, on the same test pairs (``--split``, MR -> TRUS by default), every registration through
:class:`scripts.inference.registrar.Registrar` (one resampling of the moving image) and scored by
:func:`scripts.evaluation.evaluate.evaluate` against the label files of the split:

- no registration;
- ideal rigid / ideal affine: least-squares fits of the phantom's true map over the gland, read from
  ``<split>/truth/<case>.json`` (TRE only: the phantom's own calibration, :mod:`scripts.phantom.fit`);
- the bundle's rigid stage on the gland channel of the label files (the masks training used);
- the trained network after that same rigid matrix (computed once per case, shared by both rows),
  ROI-masked by the same gland masks, on the grid and network variant stored with the weights;
- the same two rows on the masks the shipped gland segmenter predicts (``--seg_model``): what a user gets;
- other trained networks (``--baselines``: make-model files, e.g. MONAI VoxelMorph trained with the same loss,
  data and steps, or an earlier checkpoint), each after the same rigid matrix on the true masks;
- ANTs affine + SyN from the identity (``--ants``): on the images (Mattes MI) and on the true gland masks
  (mean squares), their transforms composed into one field on the fixed grid.

With ``--run_dir`` (the training run folder, or consecutive ones), a PNG of the validation gland Dice and
landmark TRE against optimiser steps.

Metrics: gland Dice, landmark TRE (mm), field error in the fixed gland against the phantom's true
field (mean and p95, mm), % non-positive Jacobian, the official μ-RegPro score, seconds per pair;
paired Wilcoxon signed-rank (two-sided) of the network against its rigid stage, and against every other row
after it, over the test cases.
Every registered case is kept in ``<work>/<row>/<case>/``: a stopped run resumes.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the bundle root, for `scripts`

from benchmarks.comparison import _cases, _float  # noqa: E402
from scripts.data.datalist import DIRECTIONS  # noqa: E402
from scripts.data.nifti import flag, read_gland_mask, write_nifti, write_text  # noqa: E402


def _gland_mask(label_path: Path, out: Path) -> Path:
    """Channel 0 of a label file as a binary NIfTI mask (written once)."""
    if not out.is_file():
        data, img = read_gland_mask(label_path, "label")
        write_nifti((data > 0.5).astype(np.uint8), img.affine, out)
    return out


def _register(
    row: str,
    network,
    parser,
    data: Path,
    split: str,
    direction: str,
    work: Path,
    segmenter=None,
    rigid_row: str = "rigid",
) -> None:
    """Register every test pair for one row, skipping cases already done; ``seconds.txt`` beside each.

    Masks: the label files' gland channel, or (``segmenter``) the segmenter's prediction; a network row reuses
    the rigid matrix and the predicted masks of ``rigid_row``.
    """
    from scripts.inference.registrar import MASK_OUTPUTS, Registrar

    mov, fix = DIRECTIONS[direction]
    d, seconds = data / split, []
    pair = parser.get_parsed_content("pair")
    postprocessing = parser.get_parsed_content("postprocessing") if network is not None else None
    registrar = Registrar(
        network,
        pair,
        segmenter=segmenter if network is None else None,
        postprocessing=postprocessing,
        direction=direction,
    )
    for case in _cases(data, split):
        out = work / row / case
        if (out / "result.json").is_file():
            continue
        masks, rigid = {}, None
        if segmenter is None:
            masks = {
                f"{k}_mask": _gland_mask(d / f"{m}_labels" / f"{case}.nii.gz", work / "masks" / f"{case}_{m}.nii.gz")
                for k, m in (("moving", mov), ("fixed", fix))
            }
        elif network is not None:
            masks = {k: work / rigid_row / case / name for k, name in MASK_OUTPUTS.items()}
        if network is not None:  # the rigid stage's own matrix: both rows share one pre-alignment
            rigid = json.loads((work / rigid_row / case / "result.json").read_text())["rigid"][
                "matrix_lps_fixed_to_moving"
            ]
        started = time.time()
        registrar.register(
            d / f"{mov}_images" / f"{case}.nii.gz",
            d / f"{fix}_images" / f"{case}.nii.gz",
            out,
            d / f"{mov}_labels" / f"{case}.nii.gz",
            rigid=rigid,
            **masks,
        )
        seconds.append(time.time() - started)
        (out / "seconds.txt").write_text(f"{seconds[-1]:.2f}\n")
        print(f"{row} {case} {seconds[-1]:.1f} s", flush=True)


# ANTs SyN rows (benchmarks/phantom_difficulty.py's calls): on the images (Mattes MI) and on the true gland masks
ANTS_ROWS = {"ants_syn": "ants_syn_mi", "ants_syn_masks": "ants_syn_masks"}


def _register_ants(row: str, data: Path, split: str, direction: str, work: Path, seed: int = 0) -> None:
    """ANTs affine + SyN from the identity for every test pair, written in the pipeline's layout.

    ``<work>/<row>/<case>/``: ``warped_label.nii.gz`` (each moving label channel through the ANTs transforms,
    linear, thresholded at 0.5) and ``transform_fixed_to_moving.nii.gz``, the ANTs transforms composed into one
    displacement field on the fixed grid by ``antsApplyTransforms`` (ITK convention, LPS mm, as the bundle's);
    ``seconds.txt``: the registration alone.
    """
    import shutil
    import tempfile

    import ants
    import nibabel as nib

    from benchmarks.phantom_difficulty import ants_transforms, ants_warp_labels

    mov, fix = DIRECTIONS[direction]
    d = data / split
    for case in _cases(data, split):
        out = work / row / case
        if (out / "result.json").is_file():
            continue
        fixed_path, moving_path = d / f"{fix}_images" / f"{case}.nii.gz", d / f"{mov}_images" / f"{case}.nii.gz"
        fixed, moving = ants.image_read(str(fixed_path)), ants.image_read(str(moving_path))
        masks = [
            ants.image_read(
                str(_gland_mask(d / f"{m}_labels" / f"{case}.nii.gz", work / "masks" / f"{case}_{m}.nii.gz"))
            ).astype("float32")
            for m in (fix, mov)
        ]
        started = time.time()
        transforms = ants_transforms(ANTS_ROWS[row], fixed, moving, seed, *masks)
        seconds = time.time() - started
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            field = ants.apply_transforms(fixed, moving, transforms, compose=str(Path(tmp) / "field_"))
            shutil.copyfile(field, out / "transform_fixed_to_moving.nii.gz")
        write_nifti(
            ants_warp_labels(fixed, moving, transforms, d / f"{mov}_labels" / f"{case}.nii.gz"),
            nib.load(str(fixed_path)).affine,
            out / "warped_label.nii.gz",
            overwrite=True,
        )
        (out / "seconds.txt").write_text(f"{seconds:.2f}\n")
        (out / "result.json").write_text(json.dumps({"method": ANTS_ROWS[row], "seconds": seconds}) + "\n")
        print(f"{row} {case} {seconds:.1f} s", flush=True)


def _trained_network(model: str):
    """(inference.json parser set to the settings stored in ``model``, the loaded network, those settings)."""
    import torch
    from monai.bundle import ConfigParser

    from scripts.weights.trained_model import load_weights, settings_of, stored_settings

    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    parser.update({"device": "cpu", "bundle_root": str(ROOT)})
    trained = stored_settings(torch.load(model, map_location="cpu", weights_only=True))
    parser.update({k: v for k, v in trained.items() if k not in ("network_def", "depth_crop")})
    parser["pair_overrides"] = {"depth_crop": trained["depth_crop"]}  # the pair stage's own setting
    parser["network_def"] = trained["network_def"]  # the trained variant, whole (another class for a baseline)
    network = load_weights(
        parser.get_parsed_content("network_def"), model, "cpu", required=True, settings=settings_of(parser)
    )
    return parser, network, trained


def _curve(run_dirs: list, out: Path, steps_per_epoch: int) -> Path:
    """PNG of the validation gland Dice and landmark TRE (network, and rigid stage alone) against optimiser steps.

    ``run_dirs`` are consecutive runs (each a fine-tune of the previous one's weights): their steps add up.
    A run logged before the TRE curve existed contributes to the Dice panel only.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    panels = (
        ("val_gland_dice", "validation gland Dice (network box)"),
        ("val_landmark_tre_mm", "validation landmark TRE (mm)"),
    )
    for ax, (tag, ylabel) in zip(axes, panels):
        offset = 0
        for i, run_dir in enumerate(run_dirs):
            acc = EventAccumulator(str(run_dir / "tensorboard"))
            acc.Reload()
            tags = acc.Tags()["scalars"]
            for suffix, label in (("", "rigid + network"), ("_rigid_only", "rigid stage alone")):
                if tag + suffix in tags:
                    events = acc.Scalars(tag + suffix)
                    ax.plot(
                        [offset + e.step * steps_per_epoch for e in events],
                        [e.value for e in events],
                        marker=".",
                        color="C0" if not suffix else "C1",
                        label=label if i == len(run_dirs) - 1 else None,
                    )
            offset += max(e.step for e in acc.Scalars("val_gland_dice")) * steps_per_epoch
            if i < len(run_dirs) - 1:
                ax.axvline(offset, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("optimiser steps (dotted: fine-tune restarts from the previous weights)")
        ax.set_ylabel(ylabel)
        ax.legend()
    fig.suptitle("CPU recipe on the realistic phantom (synthetic)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _score(data: Path, split: str, direction: str, work: Path, row: str) -> dict:
    """Official summary and float per-case metrics of one row."""
    from scripts.evaluation.evaluate import evaluate

    true_dir = data / split / f"ddf_{direction}"
    kwargs = (
        {"method": "identity"}
        if row == "none"
        else {"warped_dir": str(work / row), "ddf_dir": str(work / row), "true_ddf_dir": str(true_dir)}
    )
    out = {}
    for mode in ("official", "float"):
        out[mode] = evaluate(
            str(data),
            split=split,
            direction=direction,
            mode=mode,
            out=str(work / "scores" / row / mode),
            overwrite=True,
            **kwargs,
        )
    with open(work / "scores" / row / "float" / "per_case.csv") as fh:
        out["per_case"] = {r["case"]: r for r in csv.DictReader(fh)}
    return out


def _nan(value) -> float:
    return float("nan") if value is None else value


def _ideal(data: Path, split: str, direction: str) -> dict:
    """Per-case mean landmark error (mm) of the ideal rigid and affine fits, from the phantom's truth files."""
    out = {"rigid": {}, "affine": {}}
    for case in _cases(data, split):
        truth = json.loads((data / split / "truth" / f"{case}.json").read_text())["ideal_fits"][direction]
        for fit in out:
            out[fit][case] = float(np.mean(truth["landmark_error_mm"][fit]))
    return out


def main(
    data: str,
    model: str = "models/model.pt",
    seg_model: str | None = "models/seg_model.pt",
    run_dir: str | list | None = None,
    work: str = "/tmp/first_model",
    out: str = "docs/first_model.md",
    split: str = "holdout",
    direction: str = "mr2us",
    threads: int = 2,
    baselines: dict | None = None,
    ants: bool = True,
    overwrite: bool = False,
) -> str:
    """Register the test split with the rigid stage and with the trained network, score the rows, write ``out``.

    ``configs/inference.json`` runs with the grid, depth crop, ROI switch and network settings stored in
    ``model`` (written by ``python -m scripts make-model``), so inference repeats the training's.

    Args:
        run_dir: the training run folder, or a list of them run one after the other (a fine-tune from the
            previous one's weights): the curve's steps add up.
        baselines: ``{row name: weights file}`` of other trained networks (make-model files, e.g. MONAI
            VoxelMorph, the synthetic pre-training), each run after the same rigid matrix on the true masks.
        ants: add the ANTs SyN rows (images, Mattes MI; true gland masks, mean squares).
    """
    import torch
    from scipy.stats import wilcoxon

    from scripts.inference.segmentation import load_segmenter

    torch.set_num_threads(threads)
    data, work = Path(data), Path(work)
    (work / "masks").mkdir(parents=True, exist_ok=True)
    segmenter = None if seg_model is None else load_segmenter(ROOT / "configs" / "seg_inference.json", seg_model, "cpu")
    # the rigid rows need no registration weights (they can run while the network trains)
    from monai.bundle import ConfigParser

    rigid_parser = ConfigParser()
    rigid_parser.read_config(str(ROOT / "configs" / "inference.json"))
    rigid_parser["device"] = "cpu"
    _register("rigid", None, rigid_parser, data, split, direction, work)
    if segmenter is not None:
        _register("rigid_pred", None, rigid_parser, data, split, direction, work, segmenter)
    if not Path(model).is_file():
        raise SystemExit(f"{model}: no registration weights yet; the rigid rows are done in {work}")
    parser, network, trained = _trained_network(model)
    rows = ["none", "rigid", "network"]
    _register("network", network, parser, data, split, direction, work)
    if segmenter is not None:
        _register("network_pred", network, parser, data, split, direction, work, segmenter, rigid_row="rigid_pred")
        rows += ["rigid_pred", "network_pred"]
    for name, path in (baselines or {}).items():
        b_parser, b_network, _ = _trained_network(path)
        _register(name, b_network, b_parser, data, split, direction, work)
        rows.append(name)
    if flag(ants, "ants"):
        for row in ANTS_ROWS:
            _register_ants(row, data, split, direction, work)
        rows += list(ANTS_ROWS)
    curve = None
    if run_dir is not None:
        steps = len(_cases(data, "train"))
        curve = _curve(
            [Path(r) for r in ([run_dir] if isinstance(run_dir, str) else run_dir)],
            Path(out).with_suffix(".png"),
            steps,
        )

    scores = {row: _score(data, split, direction, work, row) for row in rows}
    ideal = _ideal(data, split, direction)
    cases = _cases(data, split)

    def column(row, key):
        return np.array([_nan(_float(scores[row]["per_case"][c].get(key, ""))) for c in cases])

    def secs(row):
        return np.mean([float((work / row / c / "seconds.txt").read_text()) for c in cases])

    lines = [
        "# The trained network against its rigid stage — **synthetic data**\n",
        f"{len(cases)} `{split}` pairs of `{data}` ({direction}); weights `{model}` (segmenter `{seg_model}`); "
        f"grid {trained['spatial_size']}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{threads} torch threads. Written by `python benchmarks/first_model.py --data {data} --model {model} "
        f"--seg_model {seg_model} --run_dir {run_dir!r} --baselines {baselines!r} --ants {ants}`.\n",
        "Float-mode means over the cases (± SD); official score from μ-RegPro's integer mode. "
        "Ideal rows: least-squares rigid / affine fits of the true map over the gland (TRE at the true landmark centres only).\n",
        "| row | gland Dice | TRE mm | field error mean mm | field error p95 mm | % det J <= 0 | official score | s/pair |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for fit in ("rigid", "affine"):
        v = np.array([ideal[fit][c] for c in cases])
        lines.append(f"| ideal {fit} (fitted to the truth) | - | {v.mean():.2f} ± {v.std():.2f} | - | - | - | - | - |")
    names = {
        "none": "no registration",
        "rigid": "bundle rigid stage (true gland masks)",
        "network": "rigid + trained network (true gland masks)",
        "rigid_pred": "bundle rigid stage (predicted gland masks)",
        "network_pred": "rigid + trained network (predicted gland masks)",
        "ants_syn": "ANTs affine + SyN, images (Mattes MI)",
        "ants_syn_masks": "ANTs affine + SyN, true gland masks (mean squares)",
        **{name: f"rigid + {name} (true gland masks)" for name in (baselines or {})},
    }
    for row in rows:
        cells = []
        for key in ("dsc", "tre_mm", "ddf_error_mean_mm", "ddf_error_p95_mm", "jacobian_nonpositive_pct"):
            v = column(row, key)
            cells.append("-" if np.all(np.isnan(v)) else f"{np.nanmean(v):.3f} ± {np.nanstd(v):.3f}")
        score = scores[row]["official"].get("score", scores[row]["official"].get("metrics", {}).get("score"))
        lines.append(
            f"| {names[row]} | "
            + " | ".join(cells)
            + f" | {'-' if score is None else f'{float(score):.3f}'} | "
            + ("-" if row == "none" else f"{secs(row):.1f}")
            + " |"
        )
    pairs = [("network", "rigid"), ("network_pred", "rigid_pred")] + [
        ("network", row) for row in rows if row in ANTS_ROWS or row in (baselines or {})
    ]
    for net_row, rigid_row in pairs:
        if net_row not in rows or rigid_row not in rows:
            continue
        lines += ["", f"Paired two-sided Wilcoxon signed-rank, {names[net_row]} vs {names[rigid_row]}:", ""]
        for key, label, better in (
            ("dsc", "gland Dice", 1),
            ("tre_mm", "TRE", -1),
            ("ddf_error_mean_mm", "field error mean", -1),
            ("ddf_error_p95_mm", "field error p95", -1),
        ):
            a, b = column(net_row, key), column(rigid_row, key)
            ok = ~(np.isnan(a) | np.isnan(b))
            diff = a[ok] - b[ok]
            p = wilcoxon(a[ok], b[ok]).pvalue if np.any(diff != 0) else 1.0
            wins = int(np.sum(better * diff > 0))
            lines.append(
                f"- {label}: mean difference {diff.mean():+.3f}, {net_row} better in {wins}/{ok.sum()} cases, p = {p:.2g}"
            )
    if curve is not None:
        lines += ["", f"![validation gland Dice and landmark TRE against steps]({curve.name})"]
    lines += [
        "",
        "s/pair: the rigid row includes computing the rigid; the network rows reuse that matrix; "
        "the ANTs rows count the registration alone.",
    ]
    text = "\n".join(lines) + "\n"
    write_text(text, out, overwrite=overwrite)
    print(text)
    return out


if __name__ == "__main__":
    import fire

    fire.Fire(main)
