"""Registration of TRUS sequences: per-frame static network, post-hoc smoothing, sequence mode, rigid, SyN.

On a sequence folder (``python -m scripts synth --sequence T``), for each case of ``split``:

- ``rigid``: the pipeline's rigid stage alone (the static run's matrices; no deformable part);
- ``static``: the shipped network, every frame on its own (``configs/inference.json``; its LSTM is the paper's
  depth-chunk LSTM, compact form, so this row is also "the paper's LSTM per frame");
- ``smoothed``: ``static``'s fields smoothed over time (Gaussian, ``sigma`` frames, all frames: offline, not causal),
  labels re-warped through them;
- ``sequence``: the sequence mode, streaming (``configs/sequence_inference.json``, ``models/sequence_model.pt``);
- ``syn``: ANTs affine + SyN on the predicted gland masks of each frame (the first ``syn_cases`` cases).

Every method warps the case's analytic MR labels and is scored against each frame's analytic TRUS labels and
true field (scripts/evaluation/sequence_metrics.py), with the pipeline's predicted gland masks (no label is
given to any method). Per-case results go to ``<work>/results/<method>/<case>.json`` (a rerun skips those that
exist); ``report`` writes the table, the paired tests and the trajectory figure.

    python -m benchmarks.dynamic run --data data/sequences --work runs/dynamic
    python -m benchmarks.dynamic report --work runs/dynamic --out docs/dynamic_results.md
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
from scipy import ndimage, stats

METHODS = ("rigid", "static", "smoothed", "sequence", "syn")
LABELS = {
    "rigid": "rigid stage only",
    "static": "network per frame (static, depth-chunk LSTM)",
    "smoothed": "network per frame + temporal Gaussian smoothing",
    "sequence": "sequence mode (ConvGRU over frames, streaming)",
    "syn": "ANTs affine + SyN on predicted masks, per frame",
}


def _case_files(data: Path, split: str, case: str) -> dict:
    d = data / split
    return {
        "mr_image": d / "mr_images" / f"{case}.nii.gz",
        "mr_label": d / "truth" / "mr_labels" / f"{case}.nii.gz",
        "us_sequence": d / "us_sequences" / f"{case}.nii.gz",
        "us_labels": d / "us_sequence_labels" / f"{case}.nii.gz",
        "true_field": d / "ddf_mr2us_sequences" / f"{case}.nii.gz",
        "truth": d / "truth" / f"{case}.json",
    }


def _warp_labels(labels, mr_affine, field, us_affine) -> np.ndarray:
    from scripts.spatial.composed import warp

    return (warp(labels.astype(np.float32), mr_affine, field, us_affine) >= 0.5).astype(np.uint8)


def _run_pipeline(registrar, files: dict, out: Path) -> list[dict]:
    from scripts.inference.sequence import register_sequence

    if not (out / "sequence.json").is_file():
        register_sequence(registrar, files["mr_image"], files["us_sequence"], out, files["mr_label"], overwrite=True)
    return json.loads((out / "sequence.json").read_text())["per_frame"]


def _syn_field(fixed_path, moving_path, fixed_mask, moving_mask, seed: int = 0) -> np.ndarray:
    """ANTs affine + SyN on two gland masks; its fixed -> moving map as a (X, Y, Z, 3) LPS mm field on the fixed
    grid: the moving grid's LPS coordinates pulled through the transforms (linear interpolation of a linear
    function is exact), minus each fixed voxel's own."""
    import ants

    from benchmarks.phantom_difficulty import ants_transforms

    fixed, moving = ants.image_read(str(fixed_path)), ants.image_read(str(moving_path))
    masks = [ants.image_read(str(m)).astype("float32") for m in (fixed_mask, moving_mask)]
    transforms = ants_transforms("ants_syn_masks", fixed, moving, seed, *masks)
    from scripts.spatial.geometry import grid_points

    mr = nib.load(str(moving_path))
    coords = grid_points(mr.affine, mr.shape[:3]).reshape(*mr.shape[:3], 3)
    pulled = [
        ants.apply_transforms(fixed, moving.new_image_like(np.ascontiguousarray(coords[..., k])), transforms).numpy()
        for k in range(3)
    ]
    us = nib.load(str(fixed_path))
    return np.stack(pulled, -1) - grid_points(us.affine, us.shape[:3]).reshape(*us.shape[:3], 3)


def _score(method: str, fields: np.ndarray, warped: np.ndarray, truth: dict, seconds) -> dict:
    """fields (T, X, Y, Z, 3) LPS mm, warped (T, X, Y, Z, C) -> the sequence metrics, with the method's seconds."""
    from scripts.evaluation.evaluate_sequences import score_sequence

    m = score_sequence(fields, warped, truth["fields"], truth["labels"], truth["affine"], truth["motion"])
    return {**m, "motion_mm": list(truth["motion"]), "seconds_per_frame": seconds, "method": method}


def _frames_of(folder: Path, frames: int, key: str) -> np.ndarray:
    from scripts.inference.registrar import OUTPUTS

    arrays = [np.asarray(nib.load(str(folder / f"frame{t:03d}" / OUTPUTS[key])).dataobj) for t in range(frames)]
    return np.stack([a.reshape(*a.shape[:3], -1) for a in arrays])


def run(
    data="data/sequences",
    work="runs/dynamic",
    split: str = "holdout",
    syn_cases: int = 4,
    sigma: float = 1.0,
    methods=METHODS,
    seed: int = 0,
    sequence_checkpoint=None,
) -> None:
    """Register and score every case of ``split`` with each of ``methods`` (results kept per case).
    ``sequence_checkpoint``: the sequence mode's weights (default ``models/sequence_model.pt``)."""
    from scripts.inference.registrar import load_registrar
    from scripts.spatial.composed import compose_field

    data, work = Path(data), Path(work)
    root = Path(__file__).resolve().parents[1]
    configs = {"static": [root / "configs/inference.json"]}
    configs["sequence"] = configs["static"] + [root / "configs/sequence_inference.json"]
    overrides = {"sequence_checkpoint": str(Path(sequence_checkpoint).absolute())} if sequence_checkpoint else None
    needed = {"sequence"} & set(methods) | ({"static"} if set(methods) - {"sequence"} else set())
    registrars = {
        name: load_registrar(configs[name], overrides if name == "sequence" else None, rigid_without_weights=False)
        for name in needed
    }
    cases = sorted(p.name[: -len(".nii.gz")] for p in (data / split / "us_sequences").glob("*.nii.gz"))
    for index, case in enumerate(cases):
        files = _case_files(data, split, case)
        mr, us = nib.load(str(files["mr_image"])), nib.load(str(files["us_sequence"]))
        labels = np.asarray(nib.load(str(files["mr_label"])).dataobj)
        frames = us.shape[3]
        truth_json = json.loads(files["truth"].read_text())["sequence"]
        true_field = np.asarray(nib.load(str(files["true_field"])).dataobj, np.float64)
        truth = {
            "affine": us.affine,
            "labels": np.moveaxis(np.asarray(nib.load(str(files["us_labels"])).dataobj), 3, 0),
            "fields": np.moveaxis(true_field, 3, 0),
            "motion": [f["motion_p95_mm"] for f in truth_json["frames_truth"]],
        }
        done = {m: work / "results" / m / f"{case}.json" for m in methods}
        todo = [m for m in methods if not done[m].is_file() and (m != "syn" or index < syn_cases)]
        if not todo:
            continue
        per = {}
        for name in ("static", "sequence"):
            if name in todo or (name == "static" and {"rigid", "smoothed", "syn"} & set(todo)):
                per[name] = _run_pipeline(registrars[name], files, work / name / case)
        results = {}
        for name in ("static", "sequence"):
            if name in todo:
                fields = _frames_of(work / name / case, frames, "forward_field")
                warped = _frames_of(work / name / case, frames, "warped_label")
                results[name] = _score(name, fields, warped, truth, [r["seconds_total"] for r in per[name]])
        if "rigid" in todo or "smoothed" in todo:
            static_fields = _frames_of(work / "static" / case, frames, "forward_field").astype(np.float64)
        if "rigid" in todo:
            fields = np.stack(
                [
                    compose_field(None, None, r["rigid"]["matrix_lps_fixed_to_moving"], us.affine, us.shape[:3])
                    for r in per["static"]
                ]
            )
            warped = np.stack([_warp_labels(labels, mr.affine, f, us.affine) for f in fields])
            results["rigid"] = _score("rigid", fields, warped, truth, None)
        if "smoothed" in todo:
            fields = ndimage.gaussian_filter1d(static_fields, sigma, axis=0, mode="nearest")
            warped = np.stack([_warp_labels(labels, mr.affine, f, us.affine) for f in fields])
            results["smoothed"] = _score("smoothed", fields, warped, truth, None)
        if "syn" in todo:
            fields, seconds = [], []
            for t in range(frames):
                folder = work / "static" / case / f"frame{t:03d}"
                start = time.perf_counter()
                fields.append(
                    _syn_field(
                        work / "static" / case / "inputs" / f"frame{t:03d}.nii.gz",
                        files["mr_image"],
                        folder / "fixed_gland.nii.gz",
                        work / "static" / case / "frame000" / "moving_gland.nii.gz",  # predicted once, at frame 0
                        seed,
                    )
                )
                seconds.append(time.perf_counter() - start)
            fields = np.stack(fields)
            warped = np.stack([_warp_labels(labels, mr.affine, f, us.affine) for f in fields])
            results["syn"] = _score("syn", fields, warped, truth, seconds)
        for name, result in results.items():
            done[name].parent.mkdir(parents=True, exist_ok=True)
            done[name].write_text(json.dumps({"case": case, **result}, indent=1, default=float) + "\n")
        print(f"{case}: " + ", ".join(f"{k} TRE {v['tre_mean_mm']:.2f} mm" for k, v in results.items()), flush=True)


METRICS = (
    ("dice_mean", "gland Dice", True),
    ("tre_mean_mm", "TRE mm", False),
    ("tre_sd_mm", "TRE SD over frames mm", False),
    ("interframe_error_mean_mm", "inter-frame error mm", False),
    ("consistency", "consistency", True),
    ("jitter_mm", "jitter mm", False),
)


def _load(work: Path) -> dict:
    out = {}
    for m in METHODS:
        files = sorted((work / "results" / m).glob("*.json"))
        out[m] = {f.stem: json.loads(f.read_text()) for f in files}
    return out


def report(work="runs/dynamic", out="docs/dynamic_results.md", figure="docs/dynamic_trajectory.png") -> None:
    """The table (mean ± SD over cases), paired Wilcoxon tests over cases and the trajectory figure."""
    work = Path(work)
    res = _load(work)
    lines = [
        "| method | cases | "
        + " | ".join(label for _, label, _ in METRICS)
        + " | success (frames > 5 mm) | s per frame |",
        "|---|---|" + "---|" * (len(METRICS) + 2),
    ]
    for m in METHODS:
        rows = list(res[m].values())
        if not rows:
            continue
        cells = []
        for key, _, _ in METRICS:
            v = np.array([r[key] for r in rows], float)
            cells.append(f"{np.nanmean(v):.3f} ± {np.nanstd(v):.3f}")
        large = sum(r.get("large_motion_frames", 0) for r in rows)
        ok = sum(r.get("large_motion_successes", 0) for r in rows)
        success = f"{ok}/{large} ({100 * ok / large:.0f} %)" if large else "no such frame"
        secs = [s for r in rows for s in (r["seconds_per_frame"] or [])]
        latency = f"{np.median(secs):.2f}" if secs else "-"
        lines.append(f"| {LABELS[m]} | {len(rows)} | " + " | ".join(cells) + f" | {success} | {latency} |")
    tests = ["", "Paired Wilcoxon signed-rank tests over cases (two-sided; per-case values):", ""]
    for a, b in (("static", "rigid"), ("sequence", "static"), ("smoothed", "static"), ("sequence", "smoothed")):
        shared = sorted(set(res[a]) & set(res[b]))
        if len(shared) < 5:
            continue
        for key, label, higher in METRICS:
            x = np.array([res[a][c][key] for c in shared], float)
            y = np.array([res[b][c][key] for c in shared], float)
            ok = np.isfinite(x) & np.isfinite(y)
            if ok.sum() < 5 or np.all(x[ok] == y[ok]):
                continue
            p = stats.wilcoxon(x[ok], y[ok]).pvalue
            better = (np.median(x[ok] - y[ok]) > 0) == higher
            tests.append(
                f"- {a} vs {b}, {label}: median difference {np.median(x[ok] - y[ok]):+.3f} "
                f"({'better' if better else 'worse'}), p = {p:.2g}, n = {int(ok.sum())}"
            )
    motion = [r["motion_mm"] for r in res["static"].values()]
    frames = [v for m in motion for v in m[1:]]
    share = f"{sum(v > 5 for v in frames)} of {len(frames)} frames after the first"
    peaks = f"{sum(max(m) > 5 for m in motion)} of {len(motion)} cases peak above 5 mm"
    text = "\n".join(lines + tests + ["", f"Frames with true motion above 5 mm: {share}; {peaks}.", ""])
    Path(out).write_text(text)
    _figure(res, Path(figure))
    print(text)


def _figure(res: dict, path: Path) -> None:
    """One landmark's trajectory (its coordinate along the case's largest motion axis) for each method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    static = res["static"]
    if not static:
        return
    case = max(static, key=lambda c: max(static[c]["motion_mm"]))
    true = np.array(static[case]["true_points_ras_mm"])  # (T, N, 3)
    lm = int(np.nanargmax(np.nanmax(np.abs(true - true[:1]), axis=(0, 2))))
    axis = int(np.nanargmax(np.nanmax(np.abs(true[:, lm] - true[0, lm]), axis=0)))
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(true[:, lm, axis], "k-o", label="truth", linewidth=2)
    for m, style in zip(METHODS, ("--", "-s", "-^", "-d", ":x")):
        if case in res[m]:
            pts = np.array(res[m][case]["pred_points_ras_mm"])
            ax.plot(pts[:, lm, axis], style, label=LABELS[m], alpha=0.8)
    ax.set_xlabel("frame (0.5 s apart)")
    ax.set_ylabel(f"landmark {lm} {'RAS'[axis]} coordinate (mm)")
    ax.set_title(f"SYNTHETIC phantom sequence {case}: a landmark over time")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    fire.Fire({"run": run, "report": report})
