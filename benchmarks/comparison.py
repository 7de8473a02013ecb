"""The comparison table: the full model, its ablations and the usual alternatives, on equal terms.

    python benchmarks/comparison.py --work /tmp/comparison --out docs/comparison_table.md

One command trains what needs training and writes the table. On the built-in synthetic phantom by
default (generated in ``<work>/data``); ``--data`` points it at a μ-RegPro-layout folder instead
(train/ trains, val/ picks the best epoch, ``--test_split`` is scored).

Equal terms, for every row:
- the same test pairs, the same gland segmenter (trained once, ``configs/seg_train.json``) and the same
  predicted masks, hence the same pre-alignment: the bundle's ANTs rigid on the predicted masks,
  computed once per case and direction and handed to :class:`scripts.inference.registrar.Registrar`;
- learned rows: ``configs/train.json`` plus the row's override files (``configs/ablations/``,
  ``configs/baselines/``, ...), the same grid, epochs, data, rigid-on-true-masks training geometry
  and, unless the row says "native loss", the same loss; each trained with every seed; registered by
  the same pipeline (one resampling of the moving image through rigid + field);
- classical rows (ANTs via antspyx) warp the moving labels onto the fixed grid themselves;
- every row is scored by :func:`scripts.evaluation.evaluate.evaluate` (μ-RegPro official and float modes, mm TRE).

Statistics (per direction): each learned row's mean over test cases per seed, then mean ± SD over
seeds; a paired Wilcoxon signed-rank test against the full model over the test cases, each case's
value averaged over the seeds both rows have (a deterministic row against the full model's seed mean);
a difference smaller than the larger of the two rows' seed SDs is reported as a tie whatever the p-value.

Every (row, seed, direction) result is kept in ``<work>/results/`` as it finishes: a stopped run
resumes. ``--jobs`` trainings run side by side, each with ``--threads`` torch threads.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the bundle root, for `scripts`

from scripts.data.datalist import case_name  # noqa: E402
from scripts.data.nifti import write_json, write_text  # noqa: E402
from scripts.tools.demo import bundle_run, small_segmenter  # noqa: E402

# learned rows: name -> (label, model files (train.json and inference.json), training-only files), in configs/
BASELINE = ["baselines/training.json"]
LEARNED = {
    "full": ("ours: full model (compact LSTM)", [], []),
    "full_paper_lstm": ("ours: full model (paper LSTM)", ["train_paper_lstm.json"], []),
    "fast_msfa": ("ours: full model, dilated 3³ MSFA (fast)", ["fast_msfa.json"], []),
    "cpu_net": ("ours: CPU-sized (full-resolution layers 8/16 channels, dilated MSFA)", ["cpu_net.json"], []),
    "cmca": ("ablation: CMCA (no MSFA, no DCA)", ["ablations/cmca.json"], []),
    "no_lstm": ("ablation: no LSTM", ["ablations/no_lstm.json"], []),
    "no_task_mask": ("ablation: no task mask", ["ablations/no_task_mask.json"], []),
    "plain_unet": ("ablation: plain U-Net", ["ablations/plain_unet.json"], []),
    "voxelmorph": ("MONAI VoxelMorph, our loss", ["baselines/voxelmorph.json"], BASELINE),
    "voxelmorph_native": (
        "MONAI VoxelMorph, native loss (MI, no label term)",
        ["baselines/voxelmorph.json"],
        BASELINE + ["baselines/loss_unsupervised.json"],
    ),
    "localnet": ("MONAI LocalNet, our loss", ["baselines/localnet.json"], BASELINE),
    "localnet_native": (
        "MONAI LocalNet, native loss (Dice + bending)",
        ["baselines/localnet.json"],
        BASELINE + ["baselines/loss_weakly_supervised.json"],
    ),
}
# deterministic rows: name -> label
CLASSICAL = {
    "identity": "no registration",
    "ants_rigid": "ANTs Rigid, images (MI)",
    "ants_syn": "ANTs affine + SyN, images (MI)",
    "ants_seg_syn": "ANTs affine + SyN on predicted gland masks",
    "bundle_rigid": "bundle rigid on predicted masks (no network)",
}
# classical rows run by benchmarks/phantom_difficulty.py's ants_transforms (the masks are the predicted ones here)
ANTS_METHODS = {"ants_rigid": "ants_rigid_mi", "ants_syn": "ants_syn_mi", "ants_seg_syn": "ants_syn_masks"}
DIRECTIONS = {"mr2us": ("mr", "us"), "us2mr": ("us", "mr")}  # direction -> (moving, fixed) modality


def _cases(data: Path, split: str) -> list[str]:
    return sorted(case_name(p.name) for p in (data / split / "mr_images").glob("*.nii.gz"))


def _env(threads: int) -> dict:
    n = str(threads)
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": n,
        "MKL_NUM_THREADS": n,
        "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": n,
    }


# ---------------------------------------------------------------- shared pre-stage (once per work folder)


def prepare(work: Path, data: Path, test_split: str, seg_epochs: int, seed: int, threads: int) -> None:
    """Train the gland segmenter, predict the test masks, and the bundle's rigid per case and direction."""
    seg_weights = work / "seg_model.pt"
    seg_net = small_segmenter()
    seg_grid = [32, 32, 32]
    if not seg_weights.is_file():
        print(f"training the gland segmenter ({seg_epochs} epochs)", flush=True)
        bundle_run(
            ["seg_train.json"],
            {
                "dataset_dir": str(data),
                "run_dir": str(work / "seg_run"),
                "checkpoint": str(seg_weights),
                "seed": seed,
                "seg_spatial_size": seg_grid,
                "max_epochs": seg_epochs,
                "learning_rate": 5e-3,
                "progress_bar": "False",
                **seg_net,
            },
            _env(threads),
            work / "seg_train.log",
        )
    write_json({"seg_spatial_size": seg_grid, **seg_net}, work / "seg_overrides.json", overwrite=True)

    masks, rigid_file = work / "masks", work / "rigid.json"
    if rigid_file.is_file():
        return
    from scripts.data.nifti import write_nifti
    from scripts.inference.segmentation import load_segmenter
    from scripts.spatial.rigid import rigid_prealign

    inference = _pair_stage()  # the rigid settings of configs/pair.json
    segmenter = load_segmenter(
        ROOT / "configs" / "seg_inference.json",
        seg_weights,
        "cpu",
        json.loads((work / "seg_overrides.json").read_text()),
    )
    rigid = {}
    for case in _cases(data, test_split):
        for modality in ("mr", "us"):
            path = masks / f"{case}_{modality}.nii.gz"
            if not path.is_file():
                mask, affine = segmenter(str(data / test_split / f"{modality}_images" / f"{case}.nii.gz"))
                write_nifti(mask.astype(np.uint8), affine, path)
        for direction, (mov, fix) in DIRECTIONS.items():
            matrix, info = rigid_prealign(
                str(data / test_split / f"{fix}_images" / f"{case}.nii.gz"),
                str(data / test_split / f"{mov}_images" / f"{case}.nii.gz"),
                str(masks / f"{case}_{fix}.nii.gz"),
                str(masks / f"{case}_{mov}.nii.gz"),
                **inference.rigid_args,
            )
            rigid[f"{direction}/{case}"] = {"matrix": np.asarray(matrix).tolist(), "method": info.get("method")}
    write_json(rigid, rigid_file)


def _pair_stage(spatial_size=(128, 128, 120), roi_mask: bool = True):
    """The pair stage of configs/pair.json (rigid settings, box, intensities) for the comparison's own runs."""
    from scripts.inference.pair import load_pair_stage

    settings = {"spatial_size": list(spatial_size), "use_rigid": True, "roi_mask": roi_mask}
    return load_pair_stage(ROOT / "configs" / "pair.json", settings)


# ---------------------------------------------------------------- rows


def _pair(data: Path, split: str, case: str, direction: str) -> dict:
    mov, fix = DIRECTIONS[direction]
    d = data / split
    return {
        "moving": d / f"{mov}_images" / f"{case}.nii.gz",
        "fixed": d / f"{fix}_images" / f"{case}.nii.gz",
        "moving_label": d / f"{mov}_labels" / f"{case}.nii.gz",
        "moving_mask_modality": mov,
        "fixed_mask_modality": fix,
    }


def _masks(work: Path, case: str, pair: dict) -> dict:
    """The predicted gland masks of one test pair: {"moving_mask": path, "fixed_mask": path}."""
    return {k: work / "masks" / f"{case}_{pair[k + '_modality']}.nii.gz" for k in ("moving_mask", "fixed_mask")}


def _ants_row(name: str, work: Path, data: Path, split: str, direction: str, out: Path, seed: int) -> None:
    """Write ``out/<case>.nii.gz``, the moving labels warped onto the fixed grid by one classical method."""
    import ants
    import nibabel as nib

    from benchmarks.phantom_difficulty import ants_transforms, ants_warp_labels
    from scripts.data.nifti import write_nifti
    from scripts.inference.registrar import Registrar

    rigid = json.loads((work / "rigid.json").read_text())
    registrar = Registrar(None, _pair_stage(), direction=direction, overwrite=True)  # no network: the rigid alone
    for case in _cases(data, split):
        p = _pair(data, split, case, direction)
        masks = _masks(work, case, p)
        if name == "bundle_rigid":  # the pipeline with no network: the rigid alone, one resampling
            matrix = rigid[f"{direction}/{case}"]["matrix"]
            registrar.register(p["moving"], p["fixed"], out / case, p["moving_label"], rigid=matrix, **masks)
            continue
        fixed, moving = ants.image_read(str(p["fixed"])), ants.image_read(str(p["moving"]))
        gland = [ants.image_read(str(masks[k])).astype("float32") for k in ("fixed_mask", "moving_mask")]
        transforms = ants_transforms(ANTS_METHODS[name], fixed, moving, seed, *gland)
        write_nifti(
            ants_warp_labels(fixed, moving, transforms, p["moving_label"]),
            nib.load(str(p["fixed"])).affine,
            out / f"{case}.nii.gz",
            overwrite=True,
        )


def _learned_row(
    name: str, work: Path, data: Path, split: str, direction: str, seed: int, grid, epochs: int, threads: int, out: Path
) -> dict:
    """Train one learned row with one seed, then register the test split through the pipeline."""
    import torch
    from monai.bundle import ConfigParser

    from scripts.inference.registrar import Registrar
    from scripts.weights.trained_model import load_weights

    files = [ROOT / "configs" / f for f in LEARNED[name][1]]
    train_files = [ROOT / "configs" / f for f in LEARNED[name][2]]
    run_dir = work / "runs" / direction / name / f"seed{seed}"
    cache = work / "cache" / f"{direction}_{'x'.join(map(str, grid))}"
    common = write_json(
        {  # cache the rigid + box preprocessing once per direction and grid for every row
            "train#dataset": {
                "_target_": "PersistentDataset",
                "data": "@train#dataset_data",
                "transform": "@train#preprocessing",
                "cache_dir": str(cache),
            },
            "train#dataset_data": "$scripts.data.datalist.load_split(@dataset_dir, 'train', @direction)",
            "validate#dataset": {
                "_target_": "PersistentDataset",
                "data": "@validate#dataset_data",
                "transform": "@validate#preprocessing",
                "cache_dir": str(cache),
            },
            "validate#dataset_data": "$scripts.data.datalist.load_split(@dataset_dir, 'val', @direction)",
        },
        work / f"persistent_cache_{cache.name}.json",
        overwrite=True,
    )
    started = time.time()
    if not (run_dir / "best.pt").is_file():
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        bundle_run(
            ["train.json", *files, *train_files, common],
            {
                "dataset_dir": str(data),
                "run_dir": str(run_dir),
                "seed": seed,
                "direction": direction,
                "spatial_size": list(grid),
                "max_epochs": epochs,
                "progress_bar": "False",
            },
            _env(threads),
            run_dir.parent / f"seed{seed}.log",
        )
    train_seconds = time.time() - started

    torch.set_num_threads(threads)
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / "inference.json"), *map(str, files)])
    parser.update({"spatial_size": list(grid), "device": "cpu", "bundle_root": str(ROOT)})
    network = load_weights(parser.get_parsed_content("network_def"), run_dir / "best.pt", "cpu", required=True)
    pair, postprocessing = parser.get_parsed_content("pair"), parser.get_parsed_content("postprocessing")
    registrar = Registrar(network, pair, postprocessing=postprocessing, direction=direction, overwrite=True)
    rigid = json.loads((work / "rigid.json").read_text())
    started = time.time()
    for case in _cases(data, split):
        p = _pair(data, split, case, direction)
        matrix, masks = rigid[f"{direction}/{case}"]["matrix"], _masks(work, case, p)
        registrar.register(p["moving"], p["fixed"], out / case, p["moving_label"], rigid=matrix, **masks)
    params = sum(p.numel() for p in network.parameters())
    return {
        "train_seconds": round(train_seconds, 1),
        "register_seconds_per_pair": round((time.time() - started) / len(_cases(data, split)), 2),
        "parameters": params,
    }


def _score(data: Path, split: str, direction: str, warped_dir: Path | None, out: Path) -> dict:
    """Per-case float-mode metrics and the official-mode summary of one set of registrations."""
    from scripts.evaluation.evaluate import evaluate

    kwargs = {"method": "identity"} if warped_dir is None else {"warped_dir": str(warped_dir)}
    if warped_dir is not None and any(warped_dir.glob("*/transform_fixed_to_moving.nii.gz")):
        kwargs["ddf_dir"] = str(warped_dir)
    result = {}
    for mode in ("float", "official"):
        summary = evaluate(
            str(data), split=split, direction=direction, mode=mode, out=str(out / mode), overwrite=True, **kwargs
        )
        result[mode] = {
            "metrics": summary["metrics"],
            "clinical": summary["clinical"],
            "regularity": summary.get("regularity", {}),
        }
    with open(out / "float" / "per_case.csv") as fh:
        result["per_case"] = {
            r["case"]: {"dsc": float(r["dsc"]), "tre_mm": _float(r["tre_mm"]), "hd95": float(r["hd95"])}
            for r in csv.DictReader(fh)
        }
    return result


def _float(text: str):
    return float(text) if text not in ("", "nan", "None") else None


def run_one(
    name: str, seed: int, direction: str, work: Path, data: Path, split: str, grid, epochs: int, threads: int
) -> Path:
    """One (row, seed, direction): register (training first for learned rows), score, store the result."""
    result_file = work / "results" / direction / f"{name}_seed{seed}.json"
    if result_file.is_file():
        return result_file
    out = work / "registrations" / direction / f"{name}_seed{seed}"
    started = time.time()
    info = {}
    if name in LEARNED:
        info = _learned_row(name, work, data, split, direction, seed, grid, epochs, threads, out)
    elif name != "identity":
        _ants_row(name, work, data, split, direction, out, seed)
    seconds = time.time() - started
    scores = _score(
        data, split, direction, None if name == "identity" else out, work / "eval" / direction / f"{name}_seed{seed}"
    )
    write_json(
        {"row": name, "seed": seed, "direction": direction, "seconds": round(seconds, 1), **info, **scores},
        result_file,
        overwrite=True,
    )
    print(f"done {direction} {name} seed {seed} in {seconds:.0f} s", flush=True)
    return result_file


def task(
    name: str, seed: int, direction: str, work: str, data: str, split: str, grid, epochs: int, threads: int = 1
) -> None:
    """Entry of one subprocess (``python benchmarks/comparison.py task ...``)."""
    import torch

    torch.set_num_threads(int(threads))
    run_one(
        name, int(seed), direction, Path(work), Path(data), split, [int(g) for g in grid], int(epochs), int(threads)
    )


# ---------------------------------------------------------------- statistics and the table


def _case_means(seeds: dict, metric: str) -> dict:
    """case -> the metric averaged over the given seeds ({seed: {case: {metric: value}}}; None skipped)."""
    values = {}
    for cases in seeds.values():
        for case, v in cases.items():
            if v[metric] is not None:
                values.setdefault(case, []).append(v[metric])
    return {case: float(np.mean(v)) for case, v in values.items()}


def _stats(results: dict, direction: str, metric: str, higher_is_better: bool = True, reference: str = "full") -> dict:
    """Per row: seeds, mean ± SD (sample SD) over seeds of the per-seed case means, in the metric's units (DSC
    unitless, TRE mm); a paired Wilcoxon signed-rank p against ``reference`` over the test cases, each case's
    value averaged over the seeds the two rows share (a deterministic row against the reference's mean over
    all its seeds); and the verdict "better" / "worse" / "tie" (for TRE, where lower is better, a negative
    gap is better). Without a ``reference`` result the rows get no p and no verdict."""
    from scipy.stats import wilcoxon

    def per_seed(row):
        return {seed: r["per_case"] for seed, r in results[direction].get(row, {}).items()}

    ref = per_seed(reference)
    table = {}
    for row in sorted([*CLASSICAL, *LEARNED], key=lambda r: r != reference):  # the reference first
        seeds = per_seed(row)
        if not seeds:
            continue
        means = [np.mean(list(_case_means({s: cases}, metric).values())) for s, cases in seeds.items()]
        entry = {
            "seeds": sorted(seeds),
            "mean": float(np.mean(means)),
            "sd": float(np.std(means, ddof=1)) if len(means) > 1 else 0.0,
        }
        if row != reference and ref:
            shared = ref.keys() if row in CLASSICAL else seeds.keys() & ref.keys()
            ref_cases = _case_means({s: ref[s] for s in shared}, metric)
            row_cases = _case_means(seeds if row in CLASSICAL else {s: seeds[s] for s in shared}, metric)
            cases = sorted(ref_cases.keys() & row_cases.keys())
            diff = np.array([row_cases[c] - ref_cases[c] for c in cases])
            p = float(wilcoxon(diff).pvalue) if np.any(diff != 0) else 1.0
            gap = float(diff.mean()) if len(cases) else 0.0
            tie = abs(gap) <= max(entry["sd"], table[reference]["sd"]) or p >= 0.05
            entry.update(
                p=p,
                n_cases=len(cases),
                gap=gap,
                verdict="tie" if tie else ("better" if (gap > 0) == higher_is_better else "worse"),
            )
        table[row] = entry
    return table


def _official(results: dict, direction: str, row: str) -> tuple:
    """Mean over seeds of the official-mode score and of the % non-positive Jacobian."""
    runs = results[direction].get(row, {}).values()
    score = [r["official"]["metrics"]["score"] for r in runs]
    jac = [r["float"]["regularity"].get("jacobian_nonpositive_pct_mean") for r in runs]
    jac = [j for j in jac if j is not None]
    return float(np.mean(score)), (float(np.mean(jac)) if jac else None)


def _compute_minutes(results: dict) -> float:
    return sum(r["seconds"] for rows in results.values() for seeds in rows.values() for r in seeds.values()) / 60


def report(work: Path, out: Path, settings: dict, overwrite: bool) -> str:
    results = {}
    for path in sorted((work / "results").glob("*/*.json")):
        r = json.loads(path.read_text())
        results.setdefault(r["direction"], {}).setdefault(r["row"], {})[r["seed"]] = r
    labels = {**CLASSICAL, **{k: v[0] for k, v in LEARNED.items()}}
    lines = [
        "# Comparison: the full model, its ablations and the usual alternatives"
        + (" (SYNTHETIC phantom)" if settings["data"].startswith("synthetic") else ""),
        "",
        "Made by `benchmarks/comparison.py`; docs/comparison.md says how every row is run and how to read this table.",
        "",
        f"Command: `{settings['command']}`",
        "",
        f"Machine: {settings['machine']}; {settings['jobs']} run(s) side by side, {settings['threads']} torch "
        f"thread(s) each; {_compute_minutes(results):.0f} min of run time in all (the sum over rows, seeds and "
        f"directions of training + registration, without scoring). Data: {settings['data']}; {settings['n_train']} training, "
        f"{settings['n_val']} validation and {settings['n_test']} test ({settings['split']}) pairs. Network grid "
        f"{settings['grid']}, {settings['epochs']} epochs per learned row, seeds {settings['seeds']}.",
        "",
        "DSC: gland Dice (float mode). TRE: Euclidean landmark centroid error in mm. Both: mean over test cases per"
        " seed, then mean ± SD (sample SD) over seeds. p: paired Wilcoxon signed-rank test against the full model over"
        " the test cases (each case averaged over the seeds both rows have); verdict: better / worse than the full"
        " model, or 'tie' when p ≥ 0.05 or the gap is inside the"
        " larger seed SD. score: the μ-RegPro"
        " official-mode score (mean over seeds). |J|≤0: % voxels with a non-positive Jacobian determinant.",
    ]
    for direction in DIRECTIONS:
        if direction not in results:
            continue
        dsc, tre = _stats(results, direction, "dsc"), _stats(results, direction, "tre_mm", higher_is_better=False)
        lines += [
            "",
            f"## {direction} ({'MR moving, TRUS fixed' if direction == 'mr2us' else 'TRUS moving, MR fixed'})",
            "",
            "| row | seeds | DSC | p (DSC) | verdict | TRE mm | p (TRE) | verdict | score | \\|J\\|≤0 % | train s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in [*CLASSICAL, *LEARNED]:
            if row not in dsc:
                continue
            d, t = dsc[row], tre[row]
            score, jac = _official(results, direction, row)
            runs = results[direction][row].values()
            train = np.mean([r.get("train_seconds", 0) for r in runs]) if row in LEARNED else None

            def cell(e, digits):
                return (
                    f"{e['mean']:.{digits}f} ± {e['sd']:.{digits}f}"
                    if len(e["seeds"]) > 1
                    else f"{e['mean']:.{digits}f}"
                )

            def p(e):
                if "p" in e:
                    return f"{e['p']:.3f}", e["verdict"]
                return ("reference", "") if row == "full" else ("–", "")

            seeds = ",".join(map(str, d["seeds"])) if row in LEARNED else "deterministic"
            lines.append(
                f"| {labels[row]} | {seeds} | {cell(d, 3)} | {p(d)[0]} | {p(d)[1]} | {cell(t, 2)} | "
                f"{p(t)[0]} | {p(t)[1]} | {score:.3f} | {'-' if jac is None else f'{jac:.2f}'} | "
                f"{'-' if train is None else f'{train:.0f}'} |"
            )
    text = "\n".join(lines) + "\n"
    write_text(text, out, overwrite=overwrite)
    write_json(results, work / "results_all.json", overwrite=True)
    return text


# ---------------------------------------------------------------- the command


def _check_work(work: Path, fixed: dict) -> None:
    """Stored results are reused: refuse a work folder made with other data, split, grid or epochs."""
    path = work / "settings.json"
    if path.is_file():
        made = json.loads(path.read_text())
        if made != fixed:
            raise FileExistsError(
                f"{path}: this work folder was made with {made}, not {fixed}; use a new --work folder"
            )
    else:
        write_json(fixed, path)


def main(
    work: str = "/tmp/comparison",
    out: str = "docs/comparison_table.md",
    data: str | None = None,
    cases: int = 24,
    preset: str = "realistic",
    test_split: str | None = None,
    seeds=(0, 1, 2),
    directions=("mr2us", "us2mr"),
    grid=(24, 24, 20),
    epochs: int = 6,
    seg_epochs: int = 60,
    rows=None,
    jobs: int = 2,
    threads: int = 1,
    overwrite: bool = False,
    report_only: bool = False,
) -> str:
    """Train, register and score every row; write the table to ``out``.

    Args:
        work: working folder (data, segmenter, runs, registrations, per-run results; resumable).
        data: a μ-RegPro-layout folder; default: ``cases`` synthetic phantom cases of ``preset`` in
            ``<work>/data`` (60 / 15 / 25 % train / val / holdout).
        preset: the phantom preset when ``data`` is not given ("realistic", the benchmark default; "basic" made
            the tables before it existed: docs/comparison_table.md).
        test_split: the split that is scored; default "holdout" on the phantom, "val" with ``data`` (μ-RegPro's
            holdout labels are not public).
        seeds: training seeds of every learned row (the ANTs rows are seeded with the first).
        grid: the network grid (the paper's 128 x 128 x 120 on a GPU; small on a CPU). Its depth must be a
            multiple of 10 for the paper LSTM.
        epochs, seg_epochs: training epochs of each learned row and of the gland segmenter.
        rows: subset of rows (default all: ``CLASSICAL`` and ``LEARNED``).
        jobs, threads: runs side by side, and torch/ITK threads per run.
        overwrite: replace an existing ``out`` (the work folder always resumes).
        report_only: write the table from the results already in ``work``.
    """
    from scripts.data.nifti import refuse_existing

    work, out = Path(work).resolve(), Path(out)
    overwrite = refuse_existing([out], overwrite, advice="pass --overwrite to replace it")
    seeds = [int(s) for s in ([seeds] if isinstance(seeds, (int, str)) else seeds)]
    grid = [int(g) for g in grid]
    directions = [directions] if isinstance(directions, str) else list(directions)
    rows = list(CLASSICAL) + list(LEARNED) if rows is None else ([rows] if isinstance(rows, str) else list(rows))
    unknown = [r for r in rows if r not in CLASSICAL and r not in LEARNED]
    if unknown:
        raise ValueError(f"unknown rows {unknown}; choose from {list(CLASSICAL) + list(LEARNED)}")
    test_split = test_split or ("holdout" if data is None else "val")
    work.mkdir(parents=True, exist_ok=True)
    _check_work(
        work,
        {
            "data": str(Path(data).resolve()) if data else f"phantom, {cases} cases, preset {preset}",
            "test_split": test_split,
            "grid": grid,
            "epochs": epochs,
            "seg_epochs": seg_epochs,
        },
    )
    if data is None:
        data_dir = work / "data"
        if not (data_dir / "phantom.json").is_file():
            from scripts.phantom.synth import synth

            synth(
                str(data_dir), cases=cases, seed=0, size="small", splits="0.6,0.15,0.25", preview=False, preset=preset
            )
        data_label = f"synthetic phantom, {cases} `small` cases of preset `{preset}` (seed 0)"
    else:
        data_dir, data_label = Path(data).resolve(), f"`{data}`"
    if not report_only:
        prepare(work, data_dir, test_split, seg_epochs, seeds[0], threads * jobs)
        tasks = [
            (r, s if r in LEARNED else seeds[0], d)
            for s in seeds
            for d in directions
            for r in rows
            if r in LEARNED or s == seeds[0]
        ]

        def launch(t):
            name, seed, direction = t
            command = [
                sys.executable,
                str(Path(__file__).resolve()),
                "task",
                name,
                str(seed),
                direction,
                str(work),
                str(data_dir),
                test_split,
                json.dumps(grid),
                str(epochs),
                str(threads),
            ]
            log = work / "logs" / f"{direction}_{name}_seed{seed}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a") as fh:  # a resumed run appends: the first run's log stays
                code = subprocess.run(
                    command, cwd=ROOT, env=_env(threads), stdout=fh, stderr=subprocess.STDOUT
                ).returncode
            print(f"{'ok' if code == 0 else 'FAILED'}: {direction} {name} seed {seed} ({log})", flush=True)
            return code

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            codes = list(pool.map(launch, tasks))
        if any(codes):
            print(f"{sum(c != 0 for c in codes)} run(s) failed; the table shows the others", flush=True)
    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    import torch

    settings = {
        "command": "python benchmarks/comparison.py " + " ".join(sys.argv[1:]),
        "machine": (
            f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} (CPU)"
            if not torch.cuda.is_available()
            else torch.cuda.get_device_name(0)
        ),
        "jobs": jobs,
        "threads": threads,
        "data": data_label,
        "split": test_split,
        "grid": "×".join(map(str, grid)),
        "epochs": epochs,
        "seeds": seeds,
        **{f"n_{k}": len(_cases(data_dir, s)) for k, s in (("train", "train"), ("val", "val"), ("test", test_split))},
    }
    text = report(work, out, settings, overwrite)
    print(text)
    return str(out)


if __name__ == "__main__":
    import fire

    from scripts.data.nifti import InputError

    try:
        fire.Fire({"main": main, "task": task} if len(sys.argv) > 1 and sys.argv[1] == "task" else main)
    except (InputError, FileExistsError, ValueError) as err:  # bad options or a taken folder: one line
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
