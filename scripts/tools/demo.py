"""The synthetic demo (``python -m scripts demo``; ``bash run_demo.sh``): the shipped weights on new pairs.

1. make fresh phantom MR–TRUS pairs (``scripts.phantom.synth``, ``realistic`` preset, ``full`` μ-RegPro grids,
   a seed the shipped weights never saw), unless the data folder exists;
2. register them twice with the shipped models (``models/seg_model.pt`` for the gland masks,
   ``models/model.pt`` for the network; ``python -m scripts register-folder``): the rigid stage alone
   (``use_network=False``) and rigid + network, with QC, pictures and an HTML index;
3. score both, and no registration, with the μ-RegPro metrics (``scripts.evaluation.evaluate``) and print the
   network's gain over its rigid stage, pair by pair.

Everything here is SYNTHETIC: the numbers show what the shipped weights do on the phantom they were
trained for, not how well the method registers real patients.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

BUNDLE_ROOT = Path(__file__).resolve().parents[2]


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
    """Overrides of ``configs/seg_train.json`` / ``seg_inference.json`` for a U-Net with these channels."""
    channels = [int(c) for c in channels]
    return {
        "seg_network_def#channels": channels,
        "seg_network_def#strides": [2] * (len(channels) - 1),
        "seg_network_def#num_res_units": 1,
    }


def _stage(title: str, start: float) -> None:
    print(f"\n=== [{time.time() - start:6.0f} s] {title}", flush=True)


def demo(
    workdir: str = "demo",
    data: str | None = None,
    cases: int = 4,
    seed: int = 1000,
    jobs: int = 2,
    overwrite: bool = False,
) -> None:
    """Run the demo and print the metrics (the summaries are in ``<workdir>/eval/*/summary.json``).

    Args:
        workdir: output folder (registrations, pictures, metrics).
        data: phantom data folder (default ``<workdir>/data``); generated when absent (all cases in ``holdout``).
        cases: phantom pairs to generate. seed: their seed (the shipped weights were trained on seed 0).
        jobs: cases generated in parallel.
        overwrite: start again in an existing ``workdir`` (the data folder is kept).
    """
    from scripts.evaluation.evaluate import evaluate
    from scripts.phantom.synth import synth
    from scripts.tools.cli import register_folder

    start = time.time()
    work = Path(workdir).resolve()
    data = Path(data).resolve() if data is not None else work / "data"
    if work.exists() and any(p.resolve() != data for p in work.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{work}: a demo was already run here; pass --overwrite to run it again")
        for path in work.iterdir():
            if path.resolve() != data:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    for weights in ("models/model.pt", "models/seg_model.pt"):
        if not (BUNDLE_ROOT / weights).is_file():
            raise FileNotFoundError(
                f"{BUNDLE_ROOT / weights}: the shipped weights are missing (see docs/model_card.md)"
            )

    if not data.exists():
        _stage(f"1. generating {cases} new synthetic phantom pairs (realistic preset, seed {seed}) in {data}", start)
        synth(
            str(data), cases=cases, seed=seed, size="full", splits="0,0,1", preset="realistic", preview=False, jobs=jobs
        )
    else:
        _stage(f"1. using the existing phantom data in {data}", start)

    rows = {"rigid stage only": work / "rigid_only", "rigid + network": work / "registered"}
    for i, (name, out) in enumerate(rows.items()):
        _stage(
            f"2{'ab'[i]}. registering the pairs, {name} (python -m scripts register-folder"
            f"{' --use_network false' if i == 0 else ''})",
            start,
        )
        register_folder(str(data), str(out), split="holdout", gland="predicted", use_network=i == 1, pictures=i == 1)

    _stage("3. μ-RegPro metrics (SYNTHETIC data)", start)
    summaries = {}
    for name, kwargs in (
        ("no registration", {"method": "identity"}),
        *((n, {"method": "warped", "warped_dir": str(o), "ddf_dir": str(o)}) for n, o in rows.items()),
    ):
        for mode in ("official", "float"):
            out = work / "eval" / f"{name.replace(' ', '_').replace('+', 'and')}_{mode}"
            summaries[(name, mode)] = evaluate(str(data), split="holdout", mode=mode, out=str(out), **kwargs)
    _print_table(summaries)
    _print_gain(work / "eval")
    print(f"\npictures: {rows['rigid + network'] / 'index.html'}; metrics: {work / 'eval'}")
    _stage("done — synthetic phantom data, not a clinical result", start)


def _print_gain(eval_dir: Path) -> None:
    """Per pair: gland Dice and landmark TRE (mm) of rigid + network against the rigid stage (float mode)."""
    import csv

    def table(name):
        with open(eval_dir / f"{name}_float" / "per_case.csv") as fh:
            return {r["case"]: r for r in csv.DictReader(fh)}

    rigid, net = table("rigid_stage_only"), table("rigid_and_network")
    print("\nper pair, rigid stage -> rigid + network (float mode):")
    for case in sorted(rigid):
        print(
            f"  {case}: gland Dice {float(rigid[case]['dsc']):.3f} -> {float(net[case]['dsc']):.3f}, "
            f"TRE {float(rigid[case]['tre_mm']):.2f} -> {float(net[case]['tre_mm']):.2f} mm"
        )


def _print_table(summaries: dict) -> None:
    """One line per (method, mode) with the official metrics and the mm / regularity metrics."""
    keys = ("DSC", "RDSC", "TRE", "RTRE", "RTs", "HD95", "score")
    print(f"{'method':28s} {'mode':8s} " + " ".join(f"{k:>7s}" for k in keys) + f" {'TRE mm':>7s} {'%|J|<=0':>7s}")
    for (name, mode), s in summaries.items():
        values = [s["metrics"].get(k) for k in keys]
        extra = [s["clinical"]["tre_mm_mean"], s.get("regularity", {}).get("jacobian_nonpositive_pct_mean")]
        cells = [f"{v:7.3f}" if isinstance(v, (int, float)) else f"{'-':>7s}" for v in values + extra]
        print(f"{name:28s} {mode:8s} " + " ".join(cells))
