"""Does the trained network register beyond its rigid pre-alignment? The test-split table of a trained run.

    python benchmarks/first_model.py --data data/realistic --model models/model.pt \\
        --seg_model models/seg_model.pt --run_dir runs/cpu_recipe --work /tmp/first_model --out docs/first_model.md

Rows, on the same test pairs (``--split``, MR -> TRUS by default), every registration through
:func:`scripts.pipeline.register_pair` (one resampling of the moving image) and scored by
:func:`scripts.evaluate.evaluate` against the label files of the split:

- no registration;
- ideal rigid / ideal affine: least-squares fits of the phantom's true map over the gland, read from
  ``<split>/truth/<case>.json`` (TRE only: the phantom's own calibration, :mod:`scripts.phantom_fit`);
- the bundle's rigid stage on the gland channel of the label files (the masks training used);
- the trained network after that same rigid matrix (computed once per case, shared by both rows),
  ROI-masked by the same gland masks, on the grid and network variant stored with the weights;
- the same two rows on the masks the shipped gland segmenter predicts (``--seg_model``): what a user gets.

With ``--run_dir`` (the training run folder), a PNG of the validation gland Dice against optimiser steps.

Metrics: gland Dice, landmark TRE (mm), field error in the fixed gland against the phantom's true
field (mean and p95, mm), % non-positive Jacobian, the official μ-RegPro score, seconds per pair;
paired Wilcoxon signed-rank (two-sided) of the network against its rigid stage over the test cases.
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
from scripts.data import DIRECTIONS  # noqa: E402
from scripts.io import write_nifti, write_text  # noqa: E402


def _gland_mask(label_path: Path, out: Path) -> Path:
    """Channel 0 of a label file as a binary NIfTI mask (written once)."""
    import nibabel as nib

    if not out.is_file():
        img = nib.load(str(label_path))
        data = np.asarray(img.dataobj)
        write_nifti(((data if data.ndim == 3 else data[..., 0]) > 0.5).astype(np.uint8), img.affine, out)
    return out


def _register(row: str, network, parser, data: Path, split: str, direction: str, work: Path, segmenter=None,
              rigid_row: str = "rigid") -> None:
    """Register every test pair for one row, skipping cases already done; ``seconds.txt`` beside each.

    Masks: the label files' gland channel, or (``segmenter``) the segmenter's prediction; a network row reuses
    the rigid matrix and the predicted masks of ``rigid_row``.
    """
    from scripts.pipeline import MASK_OUTPUTS, register_pair

    mov, fix = DIRECTIONS[direction]
    d, seconds = data / split, []
    for case in _cases(data, split):
        out = work / row / case
        if (out / "result.json").is_file():
            continue
        if segmenter is None:
            masks = {f"{k}_mask": _gland_mask(d / f"{m}_labels" / f"{case}.nii.gz", work / "masks" / f"{case}_{m}.nii.gz")
                     for k, m in (("moving", mov), ("fixed", fix))}
        elif network is None:
            masks = {"seg_network": segmenter}
        else:
            masks = {k: work / rigid_row / case / name for k, name in MASK_OUTPUTS.items()}
        kwargs = {}
        if network is not None:  # the rigid stage's own matrix: both rows share one pre-alignment
            rigid = json.loads((work / rigid_row / case / "result.json").read_text())["rigid"]["matrix_lps_fixed_to_moving"]
            kwargs = {"rigid": rigid, "preprocessing": parser.get_parsed_content("preprocessing"),
                      "postprocessing": parser.get_parsed_content("postprocessing"),
                      "int_steps": parser.get_parsed_content("int_steps"), "roi_mask": parser["roi_mask"]}
        started = time.time()
        register_pair(d / f"{mov}_images" / f"{case}.nii.gz", d / f"{fix}_images" / f"{case}.nii.gz", out,
                      moving_labels=d / f"{mov}_labels" / f"{case}.nii.gz", network=network, direction=direction,
                      spatial_size=parser["spatial_size"], depth_crop=parser["depth_crop"], axcodes=parser["axcodes"],
                      rigid_args=parser.get_parsed_content("rigid_args"), **masks, **kwargs)
        seconds.append(time.time() - started)
        (out / "seconds.txt").write_text(f"{seconds[-1]:.2f}\n")
        print(f"{row} {case} {seconds[-1]:.1f} s", flush=True)


def _curve(run_dir: Path, out: Path, steps_per_epoch: int) -> Path:
    """PNG of the validation gland Dice (network, and rigid stage alone) against optimiser steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for tag, label in (("val_gland_dice", "rigid + network"), ("val_gland_dice_rigid_only", "rigid stage alone")):
        events = acc.Scalars(tag)
        ax.plot([e.step * steps_per_epoch for e in events], [e.value for e in events], marker=".", label=label)
    ax.set_xlabel("optimiser steps")
    ax.set_ylabel("validation gland Dice (network box)")
    ax.set_title("CPU recipe on the realistic phantom (synthetic)")
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _score(data: Path, split: str, direction: str, work: Path, row: str) -> dict:
    """Official summary and float per-case metrics of one row."""
    from scripts.evaluate import evaluate

    true_dir = data / split / f"ddf_{direction}"
    kwargs = {"method": "identity"} if row == "none" else {
        "warped_dir": str(work / row), "ddf_dir": str(work / row), "true_ddf_dir": str(true_dir)}
    out = {}
    for mode in ("official", "float"):
        out[mode] = evaluate(str(data), split=split, direction=direction, mode=mode,
                             out=str(work / "scores" / row / mode), overwrite=True, **kwargs)
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


def main(data: str, model: str = "models/model.pt", seg_model: str | None = "models/seg_model.pt",
         run_dir: str | None = None, work: str = "/tmp/first_model", out: str = "docs/first_model.md",
         split: str = "holdout", direction: str = "mr2us", threads: int = 2, overwrite: bool = False) -> str:
    """Register the test split with the rigid stage and with the trained network, score the rows, write ``out``.

    ``configs/inference.json`` runs with the grid, depth crop, ROI switch and network settings stored in
    ``model`` (written by ``python -m scripts make-model``), so inference repeats the training's.
    """
    import torch
    from monai.bundle import ConfigParser
    from scipy.stats import wilcoxon

    from scripts.pipeline import load_weights
    from scripts.segmentation import load_segmenter
    from scripts.trained_model import settings_of

    torch.set_num_threads(threads)
    data, work = Path(data), Path(work)
    (work / "masks").mkdir(parents=True, exist_ok=True)
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    parser["device"] = "cpu"
    segmenter = None if seg_model is None else load_segmenter(ROOT / "configs" / "seg_inference.json", seg_model, "cpu")
    # the rigid rows need no registration weights (they can run while the network trains)
    _register("rigid", None, parser, data, split, direction, work)
    if segmenter is not None:
        _register("rigid_pred", None, parser, data, split, direction, work, segmenter)
    if not Path(model).is_file():
        raise SystemExit(f"{model}: no registration weights yet; the rigid rows are done in {work}")
    trained = torch.load(model, map_location="cpu", weights_only=True)["settings"]
    parser.update({k: v for k, v in trained.items() if k != "network_def"})
    for key, value in trained["network_def"].items():  # the trained variant
        parser[f"network_def#{key}"] = value
    network = load_weights(parser.get_parsed_content("network"), model, "cpu", required=True,
                           settings=settings_of(parser))
    rows = ["none", "rigid", "network"]
    _register("network", network, parser, data, split, direction, work)
    if segmenter is not None:
        _register("network_pred", network, parser, data, split, direction, work, segmenter, rigid_row="rigid_pred")
        rows += ["rigid_pred", "network_pred"]
    curve = None
    if run_dir is not None:
        steps = len(_cases(data, "train"))
        curve = _curve(Path(run_dir), Path(out).with_suffix(".png"), steps)

    scores = {row: _score(data, split, direction, work, row) for row in rows}
    ideal = _ideal(data, split, direction)
    cases = _cases(data, split)

    def column(row, key):
        return np.array([_nan(_float(scores[row]["per_case"][c].get(key, ""))) for c in cases])

    def secs(row):
        return np.mean([float((work / row / c / "seconds.txt").read_text()) for c in cases])

    lines = [
        f"# The trained network against its rigid stage — **synthetic data**\n",
        f"{len(cases)} `{split}` pairs of `{data}` ({direction}); weights `{model}` (segmenter `{seg_model}`); "
        f"grid {trained['spatial_size']}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{threads} torch threads. Written by `python benchmarks/first_model.py --data {data} --model {model} "
        f"--seg_model {seg_model} --run_dir {run_dir}`.\n",
        "Float-mode means over the cases (± SD); official score from μ-RegPro's integer mode. "
        "Ideal rows: least-squares rigid / affine fits of the true map over the gland (TRE at the true landmark centres only).\n",
        "| row | gland Dice | TRE mm | field error mean mm | field error p95 mm | % det J <= 0 | official score | s/pair |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for fit in ("rigid", "affine"):
        v = np.array([ideal[fit][c] for c in cases])
        lines.append(f"| ideal {fit} (fitted to the truth) | - | {v.mean():.2f} ± {v.std():.2f} | - | - | - | - | - |")
    names = {"none": "no registration", "rigid": "bundle rigid stage (true gland masks)",
             "network": "rigid + trained network (true gland masks)",
             "rigid_pred": "bundle rigid stage (predicted gland masks)",
             "network_pred": "rigid + trained network (predicted gland masks)"}
    for row in rows:
        cells = []
        for key in ("dsc", "tre_mm", "ddf_error_mean_mm", "ddf_error_p95_mm", "jacobian_nonpositive_pct"):
            v = column(row, key)
            cells.append("-" if np.all(np.isnan(v)) else f"{np.nanmean(v):.3f} ± {np.nanstd(v):.3f}")
        score = scores[row]["official"].get("score", scores[row]["official"].get("metrics", {}).get("score"))
        lines.append(f"| {names[row]} | " + " | ".join(cells) + f" | {'-' if score is None else f'{float(score):.3f}'} | "
                     + ("-" if row == "none" else f"{secs(row):.1f}") + " |")
    for net_row, rigid_row in (("network", "rigid"), ("network_pred", "rigid_pred")):
        if net_row not in rows:
            continue
        lines += ["", f"Paired two-sided Wilcoxon signed-rank, {names[net_row]} vs {names[rigid_row]}:", ""]
        for key, label, better in (("dsc", "gland Dice", 1), ("tre_mm", "TRE", -1),
                                   ("ddf_error_mean_mm", "field error mean", -1), ("ddf_error_p95_mm", "field error p95", -1)):
            a, b = column(net_row, key), column(rigid_row, key)
            ok = ~(np.isnan(a) | np.isnan(b))
            diff = a[ok] - b[ok]
            p = wilcoxon(a[ok], b[ok]).pvalue if np.any(diff != 0) else 1.0
            wins = int(np.sum(better * diff > 0))
            lines.append(f"- {label}: mean difference {diff.mean():+.3f}, network better in {wins}/{ok.sum()} cases, p = {p:.2g}")
    if curve is not None:
        lines += ["", f"![validation gland Dice against steps]({curve.name})"]
    lines += ["", "s/pair: the rigid row includes computing the rigid; the network row reuses that matrix."]
    text = "\n".join(lines) + "\n"
    write_text(text, out, overwrite=overwrite)
    print(text)
    return out


if __name__ == "__main__":
    import fire

    fire.Fire(main)
