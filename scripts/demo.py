"""The synthetic smoke demo (``python -m scripts demo``; ``bash run_demo.sh``): every stage of the bundle, small.

1. make phantom MR–TRUS pairs in the μ-RegPro layout (``scripts.phantom``), unless the data folder exists;
2. train the gland segmenter (``configs/seg_train.json``) and the registration network
   (``configs/train.json``), briefly, on a small network grid, through MONAI's bundle runner;
3. register the held-out pairs (``python -m scripts register-folder``: rigid + network, QC, pictures,
   an HTML index);
4. score them with the μ-RegPro metrics (``scripts.evaluate``) next to no registration, and print both.

Everything here is SYNTHETIC and deliberately small (a few minutes on 2 CPU cores): the numbers show
that the parts work together, not how well the method registers real patients.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from scripts.io import write_json

BUNDLE_ROOT = Path(__file__).resolve().parent.parent


def bundle_run(config_files, overrides: dict, env: dict | None = None, log=None) -> None:
    """``python -m monai.bundle run training`` from the bundle root, with ``--key value`` overrides.

    ``config_files``: names inside ``configs/`` or paths. Output goes to the console, or to the file ``log``
    (then a failure raises ``RuntimeError`` naming it).
    """
    files = "[" + ",".join(f"'{BUNDLE_ROOT / 'configs' / f}'" for f in config_files) + "]"
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", files]
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    if log is None:
        subprocess.run(command, cwd=BUNDLE_ROOT, env=env, check=True)
        return
    with open(log, "w") as fh:
        if subprocess.run(command, cwd=BUNDLE_ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode:
            raise RuntimeError(f"training failed ({' '.join(command)}); see {log}")


def small_segmenter(channels=(8, 16, 32, 64)) -> dict:
    """Overrides of ``configs/seg_train.json`` / ``seg_inference.json`` for the small U-Net the demo trains."""
    channels = [int(c) for c in channels]
    return {"seg_network_def#channels": channels, "seg_network_def#strides": [2] * (len(channels) - 1),
            "seg_network_def#num_res_units": 1}


def _stage(title: str, start: float) -> None:
    print(f"\n=== [{time.time() - start:6.0f} s] {title}", flush=True)


def demo(
    workdir: str = "demo",
    data: str | None = None,
    cases: int = 14,
    seed: int = 0,
    grid=(32, 32, 32),
    epochs: int = 25,
    seg_epochs: int = 60,
    seg_channels=(8, 16, 32, 64),
    overwrite: bool = False,
) -> None:
    """Run the synthetic smoke demo; print the metrics (the summaries are in ``<workdir>/eval/*/summary.json``).

    Args:
        workdir: output folder (trained weights, registrations, pictures, metrics).
        data: phantom data folder (default ``<workdir>/data``); generated when absent.
        cases: phantom cases to generate (70 / 15 / 15 % train / val / holdout).
        grid: network grid (the paper's is 128 x 128 x 120; small here so a CPU trains in minutes).
        epochs, seg_epochs: training epochs of the registration network and of the gland segmenter.
        seg_channels: U-Net channels of the segmenter (smaller than ``configs/seg_train.json``'s default).
        overwrite: start again in an existing ``workdir`` (the data folder is kept).
    """
    from scripts.cli import register_folder
    from scripts.evaluate import evaluate
    from scripts.phantom import synth

    start = time.time()
    work = Path(workdir).resolve()
    data = Path(data).resolve() if data is not None else work / "data"
    if work.exists() and any(p.name != "data" for p in work.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{work}: a demo was already run here; pass --overwrite to run it again")
        for path in work.iterdir():
            if path.resolve() != data:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    grid = [int(g) for g in grid]

    if not data.exists():
        _stage(f"1. generating {cases} synthetic phantom cases in {data}", start)
        synth(str(data), cases=cases, seed=seed, size="small")
    else:
        _stage(f"1. using the existing phantom data in {data}", start)

    _stage("2a. training the gland segmenter (configs/seg_train.json)", start)
    seg_weights = work / "seg_model.pt"
    seg_net = small_segmenter(seg_channels)
    bundle_run(["seg_train.json"], {
        "dataset_dir": data, "run_dir": work / "seg_run", "checkpoint": seg_weights, "seed": seed,
        "seg_spatial_size": grid, "max_epochs": seg_epochs, "learning_rate": 5e-3, **seg_net,
    })

    _stage("2b. training the registration network (configs/train.json)", start)
    bundle_run(["train.json"], {
        "dataset_dir": data, "run_dir": work / "run", "seed": seed, "spatial_size": grid, "max_epochs": epochs,
        "progress_bar": "false",
    })

    _stage("3. registering the held-out pairs (python -m scripts register-folder)", start)
    # the inference config, with the demo's grid and weights
    overrides = write_json({
        "spatial_size": grid, "checkpoint": str(work / "run" / "best.pt"), "seg_checkpoint": str(seg_weights),
        "seg_overrides": {"seg_spatial_size": grid, **seg_net},
    }, work / "inference_overrides.json")
    register_folder(str(data), str(work / "registered"), split="holdout", gland="predicted",
                    config_file=[str(BUNDLE_ROOT / "configs" / "inference.json"), str(overrides)])

    _stage("4. μ-RegPro metrics on the held-out pairs (SYNTHETIC data)", start)
    summaries = {}
    for name, kwargs in (("no registration", {"method": "identity"}),
                         ("bundle (rigid + network)", {"method": "warped", "warped_dir": str(work / "registered"),
                                                       "ddf_dir": str(work / "registered")})):
        for mode in ("official", "float"):
            out = work / "eval" / f"{kwargs['method']}_{mode}"
            summaries[(name, mode)] = evaluate(str(data), split="holdout", mode=mode, out=str(out), **kwargs)
    _print_table(summaries)
    print(f"\npictures: {work / 'registered' / 'index.html'}; metrics: {work / 'eval'}")
    _stage("done — a synthetic smoke demo, not a clinical or benchmark result", start)


def _print_table(summaries: dict) -> None:
    """One line per (method, mode) with the official metrics and the mm / regularity metrics."""
    keys = ("DSC", "RDSC", "TRE", "RTRE", "RTs", "HD95", "score")
    print(f"{'method':28s} {'mode':8s} " + " ".join(f"{k:>7s}" for k in keys) + f" {'TRE mm':>7s} {'%|J|<=0':>7s}")
    for (name, mode), s in summaries.items():
        values = [s["metrics"].get(k) for k in keys]
        extra = [s["clinical"]["tre_mm_mean"], s.get("regularity", {}).get("jacobian_nonpositive_pct_mean")]
        cells = [f"{v:7.3f}" if isinstance(v, (int, float)) else f"{'-':>7s}" for v in values + extra]
        print(f"{name:28s} {mode:8s} " + " ".join(cells))
