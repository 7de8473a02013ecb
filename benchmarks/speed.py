"""Speed benchmark: our registration network, MONAI VoxelMorph and ANTs SyN, side by side, one process.

``python benchmarks/speed.py --device cuda`` (or ``--device cpu``) times, on the same synthetic pair(s)
(seeded smooth noise plus a gland-like ellipsoid, in [0, 1]; timing does not depend on image content):

* ``ours infer``: ``RegistrationNet.forward`` (network + LSTM refinement + VecInt) and MONAI ``Warp`` of
  the moving image with the field, under ``torch.inference_mode``; per MSFA variant ("paper" 3/5/7^3
  kernels, "dilated" 3^3 kernels), precision (fp32 / bf16 autocast; VecInt, the warp and the MI stay
  fp32), memory layout (contiguous / channels-last-3d) and ``torch.compile`` on/off;
* ``ours train``: one full training step at ``train_batch`` through ``RegistrationIteration`` (forward,
  fp32 loss, backward, Adam step, and the task-mask subnet's own step) inside a MONAI SupervisedTrainer;
* ``ours infer ... onnxruntime``: the same network exported to ONNX (``scripts.tools.export.write_onnx``, fp32)
  and run by ONNX Runtime's CPU provider (``scripts.networks.onnx_runtime.OnnxRegistrationNet``), then the same warp;
* ``ours infer ... net HxWxD`` (``--net_grid``): the network on a coarser grid than the images (what a model
  trained with ``spatial_size`` = that grid costs), the field resampled back, the warp at full resolution;
* ``voxelmorph``: MONAI ``VoxelMorph`` (its documented 3-D U-Net backbone, 7 integration steps),
  inference with its own warp;
* ``ants syn``: antspyx ``registration(type_of_transform="SyN")`` with its defaults (Mattes mutual
  information for the affine and the SyN stage, written out explicitly), CPU only, with
  ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` = the threads used (set before ants is imported).

Printed per unit: median ms per pair (time of one call / pairs in the call), pairs per second, peak
memory and the ratio to the reference row (ours, paper MSFA, fp32, eager, contiguous) timed in the same
process. GPU memory: ``torch.cuda.max_memory_allocated`` of the unit. CPU memory: the process's peak
resident set size (Linux ``VmHWM``, reset before each unit through ``/proc/self/clear_refs``), absolute,
so it includes the interpreter and libraries. bf16 rows also give the relative difference of their
field from the fp32 field of the same variant (random-initialised weights; a numerical check, not an
accuracy metric). ``--profile`` adds a per-part breakdown and the top operators of one inference.
A benchmark, not a test: nothing here asserts a time.
"""

from __future__ import annotations

import io
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the bundle root, for `scripts`

from monai.engines import SupervisedTrainer  # noqa: E402
from monai.networks.blocks import Warp  # noqa: E402
from monai.networks.nets import VoxelMorph, VoxelMorphUNet  # noqa: E402

from scripts.data.nifti import read_json, write_text  # noqa: E402
from scripts.networks.blocks import GridCachedWarp  # noqa: E402
from scripts.networks.onnx_runtime import OnnxRegistrationNet  # noqa: E402
from scripts.networks.registration import RegistrationNet  # noqa: E402
from scripts.networks.task_mask import TaskMaskNet  # noqa: E402
from scripts.tools.export import write_onnx  # noqa: E402
from scripts.training.iteration import RegistrationIteration  # noqa: E402
from scripts.training.losses import RegistrationLoss  # noqa: E402

AMP = {"fp32": None, "bf16": torch.bfloat16}
REFERENCE = "ours infer paper fp32"


def _as_list(value) -> list[str]:
    """fire gives "a,b" as a string or a tuple; return a list of stripped strings."""
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def _switch(value) -> list[bool]:
    """'off' / 'on' / 'off,on' (or booleans) -> list of booleans."""
    words = {"off": False, "false": False, "0": False, "on": True, "true": True, "1": True}
    return [words[v.lower()] for v in _as_list(value)]


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (falls back to platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


class Memory:
    """Peak memory of one unit: CUDA allocator peak, or the process's peak RSS on the CPU (MiB)."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")


def synthetic_batch(batch: int, grid, labels: int, device, seed: int = 0) -> dict:
    """Seeded pair(s): images (N, 2, H, W, D) [moving, fixed] in [0, 1], labels (N, C, H, W, D) 0/1.

    Smooth noise (three 5^3 box filters of uniform noise) plus an ellipsoid "gland" of half-axes 0.3 of
    the grid, shifted by 2 voxels between moving and fixed; label channels 1.. are smaller ellipsoids.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    h, w, d = grid
    noise = torch.rand(batch, 2, h, w, d, generator=g)
    for _ in range(3):
        noise = F.avg_pool3d(noise, 5, stride=1, padding=2, count_include_pad=False)
    noise = (noise - noise.amin()) / (noise.amax() - noise.amin())
    axes = [torch.linspace(-1, 1, n) for n in (h, w, d)]
    x, y, z = torch.meshgrid(*axes, indexing="ij")

    def ellipsoid(shift, radius):
        return ((((x - shift) ** 2 + y**2 + z**2) / radius**2) <= 1.0).float()

    def label_stack(shift):
        chans = [ellipsoid(shift, 0.6)] + [ellipsoid(shift + 0.1 * c, 0.15) for c in range(1, labels)]
        return torch.stack(chans)[None].expand(batch, -1, -1, -1, -1)

    shift = 4.0 / h  # 2 voxels
    moving_label, fixed_label = label_stack(shift), label_stack(0.0)
    image = 0.5 * noise + 0.5 * torch.stack([moving_label[:, 0], fixed_label[:, 0]], dim=1)
    return {
        "image": image.contiguous().to(device),
        "moving_label": moving_label.contiguous().to(device),
        "fixed_label": fixed_label.contiguous().to(device),
    }


def time_unit(fn, device, warmup: int, repeats: int) -> list[float]:
    """Run ``fn`` warmup + repeats times; seconds of each timed run (device synchronised)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def checkpoint_mib(net: torch.nn.Module) -> float:
    """Size of ``torch.save(net.state_dict())`` in MiB (what the bundle's model.pt holds)."""
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    return buffer.getbuffer().nbytes / 2**20


def variant_kwargs(variant: str) -> dict:
    """``RegistrationNet`` arguments of a variant: an MSFA mode ("paper", "dilated") or a config override file
    of ``network_def#key`` entries (e.g. ``configs/cpu_net.json``, relative to the bundle root or absolute)."""
    if not variant.endswith(".json"):
        return {"msfa_mode": variant}
    path = Path(variant) if Path(variant).is_absolute() else Path(__file__).resolve().parents[1] / variant
    prefix = "network_def#"
    return {k[len(prefix) :]: v for k, v in read_json(path, "network override").items() if k.startswith(prefix)}


def variant_name(variant: str) -> str:
    return Path(variant).stem if variant.endswith(".json") else variant


def make_net(variant: str, grid, device, channels_last: bool, grid_cache: bool = False) -> RegistrationNet:
    torch.manual_seed(0)
    net = RegistrationNet(**variant_kwargs(variant), spatial_size=list(grid), grid_cache=grid_cache).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
    return net


def _layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last_3d) if channels_last else x.contiguous()


def inference_fn(net, warp, image, dtype, channels_last: bool, compile_mode: str = "off"):
    """A callable that registers the batch: ddf (fp32) and the warped moving image (fp32).

    ``compile_mode``: "off" (eager) or a ``torch.compile`` mode ("default", "reduce-overhead" = with CUDA
    graphs, "max-autotune", ...).
    """
    model = net if compile_mode == "off" else torch.compile(net, mode=compile_mode)
    image = _layout(image, channels_last)
    moving = image[:, :1].float()

    def run():
        with torch.inference_mode():
            with torch.autocast(image.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                ddf = model(image)
            return ddf, warp(moving, ddf.float())

    return run


def resize_field(ddf: torch.Tensor, size) -> torch.Tensor:
    """Field (N, 3, h, w, d) in voxels of a coarse grid -> (N, 3, *size) in voxels of the fine grid over the same box.

    Trilinear resampling with voxel centres aligned as ``F.interpolate(align_corners=False)`` places them; each
    component is multiplied by its axis's voxel ratio size / (h, w, d).
    """
    scale = torch.tensor([s / c for s, c in zip(size, ddf.shape[2:])], dtype=ddf.dtype, device=ddf.device)
    return F.interpolate(ddf, size=tuple(size), mode="trilinear", align_corners=False) * scale.view(1, 3, 1, 1, 1)


def coarse_inference_fn(net, warp, image, dtype, net_grid):
    """Like :func:`inference_fn` (eager, contiguous) with the network on a coarser grid: both images resampled
    (trilinear) to ``net_grid``, the field brought back with :func:`resize_field`, the moving image warped at
    full resolution. What ``spatial_size`` = net_grid does in the pipeline (a model trained at that grid)."""
    image = image.contiguous()
    moving = image[:, :1].float()

    def run():
        with torch.inference_mode():
            small = F.interpolate(image, size=tuple(net_grid), mode="trilinear", align_corners=False)
            with torch.autocast(image.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                ddf = net(small)
            ddf = resize_field(ddf.float(), image.shape[2:])
            return ddf, warp(moving, ddf)

    return run


def training_fn(variant: str, grid, device, batch: dict, dtype, channels_last: bool, grid_cache: bool):
    """A callable doing one SupervisedTrainer iteration (RegistrationIteration with the task-mask step)."""
    net = make_net(variant, grid, device, channels_last, grid_cache)
    task_mask = TaskMaskNet(net.flow.in_channels, device=device)  # reads the head features
    loss = RegistrationLoss(grid_cache=grid_cache)
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=1,
        train_data_loader=[batch],
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), lr=1e-4),
        loss_function=loss,
        iteration_update=RegistrationIteration(
            loss,
            task_mask=task_mask,
            mask_optimizer=torch.optim.Adam(task_mask.parameters(), lr=1e-4),
            amp="bfloat16" if dtype is torch.bfloat16 else False,
        ),
        decollate=False,
    )
    batch = dict(batch, image=_layout(batch["image"], channels_last))
    return lambda: trainer._process_function(trainer, batch)


def voxelmorph_fn(image):
    """MONAI VoxelMorph with the backbone of its documentation example; returns (warped, ddf)."""
    backbone = VoxelMorphUNet(
        spatial_dims=3,
        in_channels=2,
        unet_out_channels=32,
        channels=(16, 32, 32, 32, 32, 32),
        final_conv_channels=(16, 16),
    )
    net = VoxelMorph(backbone=backbone, integration_steps=7).to(image.device).eval()
    moving, fixed = image[:, :1].contiguous(), image[:, 1:].contiguous()

    def run():
        with torch.inference_mode():
            return net(moving, fixed)

    return run


def ants_syn_fn(image, threads: int):
    """antspyx SyN on sample 0 of the batch (CPU); returns a callable doing one registration."""
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)  # read when ants/ITK loads
    import ants

    arr = image[0].float().cpu().numpy()
    moving, fixed = ants.from_numpy(arr[0].copy()), ants.from_numpy(arr[1].copy())

    def run():
        return ants.registration(
            fixed=fixed, moving=moving, type_of_transform="SyN", aff_metric="mattes", syn_metric="mattes"
        )

    return run


def stage_profile(net: RegistrationNet, run, device) -> list[tuple[str, float]]:
    """Milliseconds per part of one ``run()`` (forward hooks with CUDA events / host clocks), summed."""
    parts = {
        "encoder convs": list(net.encoder_moving) + list(net.encoder_fixed),
        "E-CMCA MSFA": [m for e in net.ecmca for m in e.msfa],
        "E-CMCA DCA": [m for e in net.ecmca for m in e.dca],
        "E-CMCA gates": [m for e in net.ecmca for m in e.gates],
        "FuseConv": list(net.fuse),
        "decoder": list(net.decoder),
        "head": [net.head],
        "flow conv": [net.flow],
        "LSTM refiner": [net.refiner],
        "VecInt": [net.integrate],
    }
    cuda = device.type == "cuda"
    records: dict[str, list] = {k: [] for k in parts}
    handles = []
    for name, modules in parts.items():
        for module in modules:

            def pre(_m, _i, name=name):
                if cuda:
                    ev = torch.cuda.Event(enable_timing=True)
                    ev.record()
                    records[name].append([ev, None])
                else:
                    records[name].append([time.perf_counter(), None])

            def post(_m, _i, _o, name=name):
                if cuda:
                    ev = torch.cuda.Event(enable_timing=True)
                    ev.record()
                    records[name][-1][1] = ev
                else:
                    records[name][-1][1] = time.perf_counter()

            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    if cuda:
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        stop.record()
        torch.cuda.synchronize()
        total = start.elapsed_time(stop)
    else:
        t0 = time.perf_counter()
        run()
        total = 1000 * (time.perf_counter() - t0)
    for h in handles:
        h.remove()
    out = []
    for name, pairs in records.items():
        ms = sum(a.elapsed_time(b) if cuda else 1000 * (b - a) for a, b in pairs)
        out.append((name, ms))
    out.append(("rest (pool, upsample, concat, pad, warp)", total - sum(ms for _, ms in out)))
    out.append(("total", total))
    return out


def _fmt_row(name, per_pair_ms, peak_mib, ref_ms, extra=""):
    ratio = per_pair_ms / ref_ms if ref_ms else float("nan")
    return f"{name:<44s} {per_pair_ms:>10.1f} {1000 / per_pair_ms:>9.2f} {peak_mib:>10.0f} {ratio:>8.2f}x  {extra}"


def main(
    grid="128,128,120",
    device="cpu",
    batch: int = 1,
    train_batch: int = 2,
    warmup: int = 2,
    repeats: int = 10,
    variants="paper,dilated",
    amp="fp32,bf16",
    channels_last="off",
    grid_cache="off",
    compile="",
    compile_variants="dilated:bf16",
    train: bool = True,
    train_amp="fp32,bf16",
    onnx: bool = False,
    net_grid: str | None = None,
    voxelmorph: bool = True,
    ants: bool = True,
    ants_repeats: int = 1,
    threads: int | None = None,
    profile: bool = False,
    labels: int = 6,
    out: str | None = None,
    overwrite: bool = False,
):
    """Time the alternatives on one machine and print the table (and write it to ``out`` if given).

    Args:
        grid: network grid "H,W,D" (voxels). device: "cpu" or "cuda".
        batch: pairs per inference call; train_batch: pairs per training step.
        warmup, repeats: untimed and timed calls per unit (median reported; training uses repeats // 2).
        variants: MSFA modes ("paper", "dilated") or network override files (``configs/cpu_net.json``, rows
            named by the file's stem); amp: "fp32" and/or "bf16" (inference); train_amp: the same for training.
        channels_last: "off", "on" or "off,on" (each layout is a row, inference and training).
        grid_cache: "off", "on" or "off,on": ``RegistrationNet(grid_cache=...)`` and the same cached-grid
            warp for the moving image (inference rows) or in ``RegistrationLoss(grid_cache=...)`` (training
            rows); training and compiled rows use the last value.
        compile: ``torch.compile`` modes to add as rows, e.g. "default,reduce-overhead" (empty: none);
            applied to the "variant:amp" entries of ``compile_variants`` with the last layout of
            ``channels_last`` and ``grid_cache``; timed last (compilation takes minutes), its first call reported apart.
        train, voxelmorph, ants: include these units (ANTs runs on the CPU even with --device cuda).
        onnx: add an ONNX Runtime (CPU provider, fp32) inference row per variant (export not timed).
        net_grid: e.g. "64,64,60": add inference rows per variant and amp with the network on this coarser grid
            (:func:`coarse_inference_fn`: resampling in and out and the full-resolution warp are timed).
        ants_repeats: timed ANTs registrations (no warm-up: nothing to warm).
        threads: CPU threads for torch and ITK (default: all cores of this process's affinity).
        profile: per-part times and the top operators of one eager inference (first variant, last amp,
            last layout).
        labels: label channels of the synthetic batch (6 as in mu-RegPro).
        out: also write the report to this text file (``overwrite`` to replace it).
    """
    device = torch.device(device)
    grid = tuple(int(v) for v in _as_list(grid))
    threads = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    lines: list[str] = []

    def say(text=""):
        print(text, flush=True)
        lines.append(text)

    say(f"torch {torch.__version__}, python {platform.python_version()}")
    say(f"CPU: {cpu_name()}, torch threads {threads}, amx_bf16: {'amx_bf16' in cpu_flags()}")
    if device.type == "cuda":
        say(f"GPU: {torch.cuda.get_device_name(device)}")
        torch.backends.cudnn.benchmark = True
    say(f"grid {grid}, inference batch {batch}, training batch {train_batch}, warmup {warmup}, repeats {repeats}")
    nets = {variant_name(v): v for v in _as_list(variants)}  # row name -> variant
    for mode, variant in nets.items():
        net = RegistrationNet(**variant_kwargs(variant))
        params = sum(p.numel() for p in net.parameters())
        say(f"checkpoint {mode}: {checkpoint_mib(net):.1f} MiB ({params:,} parameters, fp32 state dict)")
    say()

    data = synthetic_batch(max(batch, train_batch), grid, labels, device)
    image = data["image"][:batch]
    warps = {
        False: Warp(mode="bilinear", padding_mode="border"),
        True: GridCachedWarp(mode="bilinear", padding_mode="border"),
    }
    memory = Memory(device)
    layouts, caches = _switch(channels_last), _switch(grid_cache)
    rows: list[tuple] = []  # (name, per-pair ms, peak MiB, note)
    fp32_fields: dict[str, torch.Tensor] = {}

    def record(name, fn, pairs, note="", n_warm=warmup, n_rep=repeats):
        memory.reset()
        times = time_unit(fn, device, n_warm, n_rep)
        per_pair = 1000 * statistics.median(times) / pairs
        rows.append((name, per_pair, memory.peak_mib(), note))
        say(
            f"  {name}: {per_pair:.1f} ms/pair (min {1000 * min(times) / pairs:.1f}, {len(times)} runs), "
            f"peak {rows[-1][2]:.0f} MiB {note}"
        )

    def field_note(mode, ddf, note=""):
        """Relative and max difference of a field from the eager fp32 contiguous field of its variant."""
        ref = fp32_fields.get(mode)
        if ref is None:
            return note
        rel = ((ddf - ref).norm() / ref.norm()).item()
        diff = f"ddf rel.diff vs fp32 {rel:.1e}, max {(ddf - ref).abs().max().item():.1e} vox"
        return f"{note}; {diff}" if note else diff

    def table():
        ref_ms = next((ms for n, ms, _, _ in rows if n == REFERENCE), None)
        say()
        mem = "CUDA max_memory_allocated" if device.type == "cuda" else "process peak RSS (VmHWM)"
        say(f"reference row: '{REFERENCE}'; memory: {mem}")
        say(f"{'unit':<44s} {'ms/pair':>10s} {'pairs/s':>9s} {'peak MiB':>10s} {'vs ref':>9s}  notes")
        for name, ms, peak, note in rows:
            say(_fmt_row(name, ms, peak, ref_ms, note))
        ants_ms = next((ms for n, ms, _, _ in rows if n.startswith("ANTs")), None)
        if ants_ms:
            say()
            for name, ms, _, _ in rows:
                if name.startswith("ours infer"):
                    say(f"ANTs SyN / {name}: {ants_ms / ms:.1f}x")

    say("timing ...")
    for mode, variant in nets.items():
        for cl in layouts:
            for gc in caches:
                net = make_net(variant, grid, device, cl, gc).eval()
                for amp_name in _as_list(amp):
                    fn = inference_fn(net, warps[gc], image, AMP[amp_name], cl)
                    ddf = fn()[0].float()
                    if amp_name == "fp32" and not cl and not gc:
                        fp32_fields[mode] = ddf.clone()
                        note = ""
                    else:
                        note = field_note(mode, ddf)
                    name = f"ours infer {mode} {amp_name}" + (" cl" if cl else "") + (" gc" if gc else "")
                    record(name, fn, batch, note)
                del net
    if onnx:
        for mode, variant in nets.items():
            net = make_net(variant, grid, "cpu", False).eval()
            with tempfile.TemporaryDirectory() as folder:
                write_onnx(net, image.cpu(), Path(folder) / "model.onnx", integrate=net.integrate)
                ort_net = OnnxRegistrationNet(Path(folder) / "model.onnx", threads=threads)
            moving = image[:, :1].float()

            def ort_run(ort_net=ort_net, moving=moving):
                ddf = ort_net(image)
                return ddf, warps[False](moving, ddf)

            record(f"ours infer {mode} onnxruntime fp32", ort_run, batch, field_note(mode, ort_run()[0]))
            del net, ort_net
    if net_grid:
        coarse = tuple(int(v) for v in _as_list(net_grid))
        for mode, variant in nets.items():
            net = make_net(variant, coarse, device, False).eval()
            for amp_name in _as_list(amp):
                fn = coarse_inference_fn(net, warps[False], image, AMP[amp_name], coarse)
                name = f"ours infer {mode} {amp_name} net {'x'.join(map(str, coarse))}"
                record(name, fn, batch, "field resampled to the grid, full-resolution warp")
            del net
    if train:
        steps = -(-65 // train_batch)  # one epoch of the 65 training pairs
        for mode, variant in nets.items():
            for cl in layouts:
                for amp_name in _as_list(train_amp):
                    name = f"ours train step {mode} {amp_name}" + (" cl" if cl else "") + (" gc" if caches[-1] else "")
                    subset = {k: v[:train_batch] for k, v in data.items()}
                    fn = training_fn(variant, grid, device, subset, AMP[amp_name], cl, caches[-1])
                    record(name, fn, train_batch, f"batch {train_batch}", max(warmup, 1), max(repeats // 2, 1))
                    step_ms = rows[-1][1] * train_batch
                    minutes = 100 * steps * step_ms / 60000
                    note = f"batch {train_batch}: {step_ms:.0f} ms/step; 100 epochs x 65 pairs ~ {minutes:.1f} min"
                    rows[-1] = rows[-1][:3] + (note,)
                    del fn
    if voxelmorph:
        for amp_name in _as_list(amp):
            vm, dtype = voxelmorph_fn(image), AMP[amp_name]

            def vm_run(vm=vm, dtype=dtype):
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    return vm()

            record(f"MONAI VoxelMorph infer {amp_name}", vm_run, batch)
    if ants:
        try:
            fn = ants_syn_fn(image, threads)
        except ImportError as err:
            say(f"  ANTs SyN skipped: {err}")
        else:
            record(f"ANTs SyN (CPU, {threads} threads)", fn, 1, "Mattes MI, antspyx defaults", 0, ants_repeats)
    table()

    if profile:
        (mode, variant), amp_name, cl, gc = next(iter(nets.items())), _as_list(amp)[-1], layouts[-1], caches[-1]
        net = make_net(variant, grid, device, cl, gc).eval()
        fn = inference_fn(net, warps[gc], image, AMP[amp_name], cl)
        time_unit(fn, device, 2, 1)
        say()
        name = f"ours infer {mode} {amp_name}" + (" cl" if cl else "") + (" gc" if gc else "")
        say(f"profile: {name}, batch {batch}, per part (ms)")
        for part, ms in stage_profile(net, fn, device):
            say(f"  {part:<42s} {ms:>9.1f}")
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        say(prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=40))

    if _as_list(compile):
        say("compiled ...")
        for entry in _as_list(compile_variants):
            mode, amp_name = entry.split(":")
            net = make_net(nets.get(mode, mode), grid, device, layouts[-1], caches[-1]).eval()
            for compile_mode in _as_list(compile):
                name = f"ours infer {mode} {amp_name}" + (" cl" if layouts[-1] else "") + (" gc" if caches[-1] else "")
                name += f" compile {compile_mode}"
                try:
                    fn = inference_fn(net, warps[caches[-1]], image, AMP[amp_name], layouts[-1], compile_mode)
                    t0 = time.perf_counter()
                    ddf = fn()[0].float()
                    note = field_note(mode, ddf, f"compile+first call {time.perf_counter() - t0:.0f} s")
                    record(name, fn, batch, note)
                except Exception as err:  # report and go on: one failed compile must not lose the other rows
                    say(f"  {name}: failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
            del net
        table()

    if out:
        write_text("\n".join(lines) + "\n", out, overwrite=overwrite)
    return None


if __name__ == "__main__":
    import fire

    fire.Fire(main)
