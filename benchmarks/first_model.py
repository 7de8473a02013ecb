"""Does the trained network register beyond its rigid pre-alignment? The test-split table of a trained run.

    python benchmarks/first_model.py --data /work/data/realistic --run_dir runs/cpu_recipe \\
        --work /tmp/first_model --out docs/first_model.md

Rows, on the same test pairs (``--split``, MR -> TRUS by default), every registration through
:func:`scripts.pipeline.register_pair` (one resampling of the moving image) and scored by
:func:`scripts.evaluate.evaluate` against the label files of the split:

- no registration;
- ideal rigid / ideal affine: least-squares fits of the phantom's true map over the gland, read from
  ``<split>/truth/<case>.json`` (TRE only: the phantom's own calibration, :mod:`scripts.phantom_fit`);
- the bundle's rigid stage on the gland channel of the label files (the masks training used);
- the trained network after that same rigid matrix (computed once per case, shared by both rows),
  ROI-masked by the same gland masks, on the grid and network variant of the run's configs.

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


def _register(row: str, network, parser, data: Path, split: str, direction: str, work: Path) -> None:
    """Register every test pair for one row, skipping cases already done; ``seconds.txt`` beside each."""
    from scripts.pipeline import register_pair

    mov, fix = DIRECTIONS[direction]
    d, seconds = data / split, []
    for case in _cases(data, split):
        out = work / row / case
        if (out / "result.json").is_file():
            continue
        masks = {f"{k}_mask": _gland_mask(d / f"{m}_labels" / f"{case}.nii.gz", work / "masks" / f"{case}_{m}.nii.gz")
                 for k, m in (("moving", mov), ("fixed", fix))}
        kwargs = {}
        if network is not None:  # the rigid stage's own matrix: both rows share one pre-alignment
            rigid = json.loads((work / "rigid" / case / "result.json").read_text())["rigid"]["matrix_lps_fixed_to_moving"]
            kwargs = {"rigid": rigid, "preprocessing": parser.get_parsed_content("preprocessing"),
                      "postprocessing": parser.get_parsed_content("postprocessing"),
                      "int_steps": parser.get_parsed_content("int_steps"), "roi_mask": parser["roi_mask"]}
        started = time.time()
        register_pair(d / f"{mov}_images" / f"{case}.nii.gz", d / f"{fix}_images" / f"{case}.nii.gz", out,
                      moving_labels=d / f"{mov}_labels" / f"{case}.nii.gz", network=network, direction=direction,
                      spatial_size=parser["spatial_size"], depth_crop=parser["depth_crop"], axcodes=parser["axcodes"],
                      **masks, **kwargs)
        seconds.append(time.time() - started)
        (out / "seconds.txt").write_text(f"{seconds[-1]:.2f}\n")
        print(f"{row} {case} {seconds[-1]:.1f} s", flush=True)


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


def main(data: str, run_dir: str, work: str = "/tmp/first_model", out: str = "docs/first_model.md",
         split: str = "holdout", direction: str = "mr2us", checkpoint: str = "best.pt", threads: int = 2,
         overwrite: bool = False) -> str:
    """Register the test split with the rigid stage and with the trained network, score both, write ``out``.

    ``configs/inference.json`` takes the run's grid, depth crop and network settings from its
    ``run_config.json``, so that inference repeats the training geometry and variant.
    """
    import torch
    from monai.bundle import ConfigParser
    from scipy.stats import wilcoxon

    from scripts.pipeline import load_weights

    torch.set_num_threads(threads)
    data, work = Path(data), Path(work)
    (work / "masks").mkdir(parents=True, exist_ok=True)
    trained = json.loads((Path(run_dir) / "run_config.json").read_text())["config"]
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    parser.update({"device": "cpu", "spatial_size": trained["spatial_size"], "depth_crop": trained["depth_crop"]})
    for key, value in trained["network_def"].items():  # the trained variant
        parser[f"network_def#{key}"] = value
    _register("rigid", None, parser, data, split, direction, work)
    network = load_weights(parser.get_parsed_content("network"), Path(run_dir) / checkpoint, "cpu", required=True)
    _register("network", network, parser, data, split, direction, work)

    scores = {row: _score(data, split, direction, work, row) for row in ("none", "rigid", "network")}
    ideal = _ideal(data, split, direction)
    cases = _cases(data, split)

    def column(row, key):
        return np.array([_nan(_float(scores[row]["per_case"][c].get(key, ""))) for c in cases])

    def secs(row):
        return np.mean([float((work / row / c / "seconds.txt").read_text()) for c in cases])

    lines = [
        f"# The trained network against its rigid stage — **synthetic data**\n",
        f"{len(cases)} `{split}` pairs of `{data}` ({direction}); weights `{Path(run_dir) / checkpoint}`; "
        f"grid {trained['spatial_size']}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{threads} torch threads. Written by `python benchmarks/first_model.py --data {data} --run_dir {run_dir}`.\n",
        "Float-mode means over the cases (± SD); official score from μ-RegPro's integer mode. "
        "Ideal rows: least-squares rigid / affine fits of the true map over the gland (TRE at the true landmark centres only).\n",
        "| row | gland Dice | TRE mm | field error mean mm | field error p95 mm | % det J <= 0 | official score | s/pair |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for fit in ("rigid", "affine"):
        v = np.array([ideal[fit][c] for c in cases])
        lines.append(f"| ideal {fit} (fitted to the truth) | - | {v.mean():.2f} ± {v.std():.2f} | - | - | - | - | - |")
    names = {"none": "no registration", "rigid": "bundle rigid stage (true gland masks)",
             "network": "rigid + trained network (true gland masks)"}
    for row in ("none", "rigid", "network"):
        cells = []
        for key in ("dsc", "tre_mm", "ddf_error_mean_mm", "ddf_error_p95_mm", "jacobian_nonpositive_pct"):
            v = column(row, key)
            cells.append("-" if np.all(np.isnan(v)) else f"{np.nanmean(v):.3f} ± {np.nanstd(v):.3f}")
        score = scores[row]["official"].get("score", scores[row]["official"].get("metrics", {}).get("score"))
        lines.append(f"| {names[row]} | " + " | ".join(cells) + f" | {'-' if score is None else f'{float(score):.3f}'} | "
                     + ("-" if row == "none" else f"{secs(row):.1f}") + " |")
    lines += ["", "Paired two-sided Wilcoxon signed-rank, network vs its rigid stage:", ""]
    for key, label, better in (("dsc", "gland Dice", 1), ("tre_mm", "TRE", -1), ("ddf_error_mean_mm", "field error mean", -1),
                               ("ddf_error_p95_mm", "field error p95", -1)):
        a, b = column("network", key), column("rigid", key)
        ok = ~(np.isnan(a) | np.isnan(b))
        diff = a[ok] - b[ok]
        p = wilcoxon(a[ok], b[ok]).pvalue if np.any(diff != 0) else 1.0
        wins = int(np.sum(better * diff > 0))
        lines.append(f"- {label}: mean difference {diff.mean():+.3f}, network better in {wins}/{ok.sum()} cases, p = {p:.2g}")
    lines += ["", "s/pair: the rigid row includes computing the rigid; the network row reuses that matrix."]
    text = "\n".join(lines) + "\n"
    write_text(text, out, overwrite=overwrite)
    print(text)
    return out


if __name__ == "__main__":
    import fire

    fire.Fire(main)
