"""End-to-end latency of one registration, stage by stage, against ANTs SyN's whole registration of the same pair.

    python benchmarks/latency.py --data data/realistic --cases 3 --repeats 3 --threads 2 --out docs/latency.md

What a user waits for, on the first ``--cases`` pairs of a μ-RegPro-layout split (``--direction``, MR -> TRUS by
default), in one process:

- **ours**: :func:`scripts.tools.cli.register` as ``python -m scripts register`` runs it (network and segmenter
  loaded from ``configs/inference.json`` and the shipped weights, gland masks predicted, rigid, network, one
  resampling, every output file, QC; pictures only with ``--pictures``), ``--repeats`` times per pair into fresh
  folders; the seconds per stage are those ``result.json`` records. The first call of the process (imports,
  allocator warm-up) is run once before timing and not counted;
- **ours, fresh process**: the same command started as a new Python process, once per pair: the wall time
  includes the interpreter start and the imports of torch, MONAI, ANTs and ITK;
- **ANTs SyN**: the whole registration with antspyx as a user would run it: read both images, affine + SyN
  (Mattes MI, antspyx defaults, from the identity), the moving image and each label channel through the
  transforms, both written as NIfTI; ``--ants_repeats`` times per pair.

Threads: ``--threads`` for torch, OpenMP and ITK (set before ANTs/ITK load). Printed: the per-stage table
(median over pairs and repeats), the totals, and the ratio ANTs / ours of the medians. A benchmark, not a test.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the bundle root, for `scripts` and `benchmarks`

STAGES = ("load", "read", "segmentation", "rigid", "box", "network", "resampling", "writing", "qc", "pictures")


def _pair(data: Path, split: str, case: str, direction: str) -> dict:
    from scripts.data.datalist import DIRECTIONS

    mov, fix = DIRECTIONS[direction]
    d = data / split
    return {
        "moving": d / f"{mov}_images" / f"{case}.nii.gz",
        "fixed": d / f"{fix}_images" / f"{case}.nii.gz",
        "moving_labels": d / f"{mov}_labels" / f"{case}.nii.gz",
    }


def _ours(pair: dict, out: Path, pictures: bool, config_file, checkpoint) -> dict:
    """One in-process ``register`` call; its ``result.json`` seconds."""
    import contextlib
    import io
    import json

    from scripts.tools.cli import register

    with contextlib.redirect_stdout(io.StringIO()):
        register(
            str(pair["moving"]),
            str(pair["fixed"]),
            str(out),
            moving_labels=str(pair["moving_labels"]),
            config_file=config_file,
            checkpoint=checkpoint,
            pictures=pictures,
        )
    return json.loads((out / "result.json").read_text())["seconds"]


def _fresh_process(pair: dict, out: Path, pictures: bool, threads: int) -> float:
    command = [
        sys.executable,
        "-m",
        "scripts",
        "register",
        "--moving",
        str(pair["moving"]),
        "--fixed",
        str(pair["fixed"]),
        "--out",
        str(out),
        "--moving-labels",
        str(pair["moving_labels"]),
        "--pictures",
        str(pictures),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": str(threads)}
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def _ants_syn(pair: dict, out: Path, seed: int = 0) -> float:
    """ANTs affine + SyN, whole: read, register, warp image and labels, write; wall seconds."""
    import ants
    import nibabel as nib

    from benchmarks.phantom_difficulty import ants_transforms, ants_warp_labels
    from scripts.data.nifti import write_nifti

    started = time.perf_counter()
    fixed, moving = ants.image_read(str(pair["fixed"])), ants.image_read(str(pair["moving"]))
    transforms = ants_transforms("ants_syn_mi", fixed, moving, seed)
    ants.image_write(
        ants.apply_transforms(fixed, moving, transforms, interpolator="linear"), str(out / "warped_image.nii.gz")
    )
    write_nifti(
        ants_warp_labels(fixed, moving, transforms, pair["moving_labels"]),
        nib.load(str(pair["fixed"])).affine,
        out / "warped_label.nii.gz",
    )
    return time.perf_counter() - started


def main(
    data: str,
    split: str = "holdout",
    direction: str = "mr2us",
    cases: int = 3,
    repeats: int = 3,
    ants_repeats: int = 1,
    threads: int = 2,
    pictures: bool = False,
    fresh_process: bool = True,
    config_file=None,
    checkpoint=None,
    out: str | None = None,
    overwrite: bool = False,
) -> str:
    """Time the pipeline per stage and ANTs SyN on the same pairs; print (and with ``out``, write) the tables."""
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)  # read when ITK loads
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    from benchmarks.comparison import _cases
    from benchmarks.speed import cpu_name
    from scripts.data.nifti import InputError, flag, write_text

    torch.set_num_threads(threads)
    pictures, data = flag(pictures, "pictures"), Path(data)
    names = _cases(data, split)[:cases]
    if not names:
        raise InputError(f"{data / split}: no cases (expected a μ-RegPro split with {direction} image folders)")
    pairs = {c: _pair(data, split, c, direction) for c in names}
    runs, fresh, syn = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _ours(pairs[names[0]], tmp / "warmup", pictures, config_file, checkpoint)
        for case, pair in pairs.items():
            for r in range(repeats):
                runs.append(_ours(pair, tmp / f"{case}_{r}", pictures, config_file, checkpoint))
                print(f"ours {case} #{r}: {runs[-1]['total']:.2f} s", flush=True)
            if flag(fresh_process, "fresh_process"):
                fresh.append(_fresh_process(pair, tmp / f"{case}_fresh", pictures, threads))
                print(f"ours, fresh process, {case}: {fresh[-1]:.2f} s", flush=True)
            for r in range(ants_repeats):
                (tmp / f"{case}_ants_{r}").mkdir()
                syn.append(_ants_syn(pair, tmp / f"{case}_ants_{r}"))
                print(f"ANTs SyN {case} #{r}: {syn[-1]:.2f} s", flush=True)
    median = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    ours_total = median([r["total"] for r in runs])
    service = median([r["total"] - r.get("load", 0.0) for r in runs])
    lines = [
        f"Machine: {cpu_name()}, {threads} threads (torch, OpenMP, ITK); torch {torch.__version__}; "
        f"{platform.python_implementation()} {platform.python_version()}.",
        f"Pairs: {len(names)} of {data / split} ({direction}), {repeats} timed repeats each (ours), "
        f"{ants_repeats} (ANTs SyN); pictures {'on' if pictures else 'off'}; QC on.",
        "",
        "| stage | median s | share of total |",
        "|---|---|---|",
    ]
    for stage in STAGES:
        values = [r.get(stage, 0.0) for r in runs]
        if any(values):
            lines.append(f"| {stage} | {median(values):.3f} | {100 * median(values) / ours_total:.0f} % |")
    lines += [
        f"| **total (in process)** | **{ours_total:.2f}** (min {min(r['total'] for r in runs):.2f}, "
        f"max {max(r['total'] for r in runs):.2f}) | |",
        "",
        "| whole registration of one pair | median s | ANTs SyN / this |",
        "|---|---|---|",
        f"| ours, in process, network loaded per call | {ours_total:.2f} | {median(syn) / ours_total:.1f}x |",
        f"| ours, in process, network already loaded (a running service) | {service:.2f} | {median(syn) / service:.1f}x |",
    ]
    if fresh:
        lines.append(
            f"| ours, `python -m scripts register` as a new process | {median(fresh):.2f} | "
            f"{median(syn) / median(fresh):.1f}x |"
        )
    lines.append(
        f"| ANTs affine + SyN (antspyx, read, register, warp image and labels, write) | {median(syn):.2f} | 1.0x |"
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GB (Linux)
    lines += ["", f"Peak resident memory of this process (ours and ANTs, every pair): {peak:.2f} GB."]
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        write_text(text, out, overwrite=flag(overwrite, "overwrite"))
    return text


if __name__ == "__main__":
    import fire

    fire.Fire(main)
