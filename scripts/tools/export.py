"""Export the bundle's networks: TorchScript (via ``monai.bundle ckpt_export``), ``torch.export`` and ONNX.

For each network (the registration network of ``configs/inference.json`` and, when its config and
checkpoint exist, the segmentation network of ``configs/seg_inference.json``) three files are written
next to the checkpoint, all for ONE input shape (1, C, *grid) with the grid of the config
(``spatial_size`` / ``seg_spatial_size``):

- ``<stem>.ts``: TorchScript with the metadata and config embedded (MONAI ``ckpt_export``). Scripting is
  tried first (both bundle networks script); if it fails the network is traced at the configured grid, and
  the reason is logged and returned.
- ``<stem>.pt2``: ``torch.export`` program (``torch.export.load(f).module()``).
- ``<stem>.onnx``: ONNX, opset >= 20 (5-D ``GridSample``); output ``pred`` (the network's output) and,
  for networks that integrate a velocity, ``velocity`` (N, 3, *grid) too, so that the inverse field can be
  integrated exactly. Run it with ONNX Runtime (``scripts.networks.onnx_runtime``, ``configs/inference_onnx.json``).

Exported (``.pt2``), ONNX and traced models are specialised to that input shape: feed exactly (1, C, *grid).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from monai.bundle import ConfigParser, ckpt_export

from scripts.data.nifti import InputError, atomic_write, refuse_existing
from scripts.networks.blocks import adaptive_avg_pool3d_as_matmul
from scripts.weights.manifest import read_checkpoint, verify_checkpoint
from scripts.weights.trained_model import load_weights, settings_of

__all__ = ["NETWORKS", "FORMATS", "export", "write_onnx", "adaptive_avg_pool3d_as_matmul"]

logger = logging.getLogger(__name__)

FORMATS = ("ts", "pt2", "onnx")
MIN_ONNX_OPSET = 20  # the first opset whose GridSample takes 5-D inputs
ONNX_FOLD_LIMIT = 4096  # largest constant (elements) the ONNX optimizer may fold into the file


@dataclass(frozen=True)
class NetworkSpec:
    """Where a network lives in the bundle (paths relative to the bundle root, ids of its config)."""

    config_file: str
    net_id: str
    checkpoint: str
    stem: str  # output name without suffix, in the checkpoint's folder unless out_dir is given
    grid_id: str  # config id of the (H, W, D) network grid
    channels_id: str  # config id of the number of input channels
    registration: bool  # follows scripts.networks.contract.RegistrationNetwork (its integrate is exported too)


NETWORKS = {
    "registration": NetworkSpec(
        "configs/inference.json",
        "network_def",
        "models/model.pt",
        "model",
        "spatial_size",
        "_meta_#network_data_format#inputs#image#num_channels",
        True,
    ),
    "segmentation": NetworkSpec(
        "configs/seg_inference.json",
        "seg_network_def",
        "models/seg_model.pt",
        "seg_model",
        "seg_spatial_size",
        "seg_network_def#in_channels",
        False,
    ),
}


class _FieldAndVelocity(torch.nn.Module):
    """``image -> (ddf, velocity)`` of a velocity network (``integrate`` not None: RegistrationNet, VoxelMorph)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net.forward_train(image)
        return out["ddf"], out["velocity"]


def write_onnx(
    net: torch.nn.Module,
    example: torch.Tensor,
    path,
    opset: int = MIN_ONNX_OPSET,
    program=None,
    integrate: torch.nn.Module | None = None,
) -> list[str]:
    """Write ``net`` at ``example``'s shape as ONNX to ``path``; returns the output names.

    ``net`` in eval mode. Outputs: ``pred`` (the network's output) and, given ``integrate`` (the ``integrate``
    module of a :class:`scripts.networks.contract.RegistrationNetwork` that integrates a velocity, MONAI
    ``DVF2DDF``: RegistrationNet, VoxelMorph; None for any other network), ``velocity`` too, with that
    integration's settings in the file's metadata (``int_steps``, ``int_mode``, ``int_padding``) so that
    the inverse is integrated as the network does. ``program``: ``net``'s ``torch.export`` program at
    ``example`` when already made (used when there is no velocity output).
    """
    import onnxscript  # only the ONNX format needs onnx/onnxscript installed

    outputs = ["pred"]
    if integrate is not None:  # a velocity network: export it too, for the exact inverse
        outputs.append("velocity")
        program = None
    if program is None:
        with torch.no_grad():
            program = torch.export.export(_FieldAndVelocity(net) if len(outputs) == 2 else net, (example,))
    table = dict.fromkeys(
        (torch.ops.aten.adaptive_avg_pool3d.default, torch.ops.aten._adaptive_avg_pool3d.default),
        adaptive_avg_pool3d_as_matmul,
    )
    onnx_program = torch.onnx.export(
        program.run_decompositions(table),
        (example,),
        dynamo=True,
        opset_version=opset,
        input_names=["image"],
        output_names=outputs,
        optimize=False,
    )
    # fold only small constants: folding Warp's grid-sized index tensors would bloat the file
    onnxscript.optimizer.optimize_ir(onnx_program.model, output_size_limit=ONNX_FOLD_LIMIT)
    if len(outputs) == 2:
        warp = integrate.warp_layer  # MONAI Warp: the grid_sample settings it resolved
        onnx_program.model.metadata_props.update(
            int_steps=str(integrate.num_steps),
            int_mode=str(warp._interp_mode_native),
            int_padding=str(warp._padding_mode_native),
        )
    onnx_program.save(str(path), external_data=False)
    return outputs


def _checkpoint_key(path) -> str:
    """ "model" for a training checkpoint ``{"model": state_dict, ...}``, "" for a bare state dict."""
    state = read_checkpoint(path)
    return "model" if isinstance(state, dict) and isinstance(state.get("model"), dict) else ""


def _parser(root: Path, spec: NetworkSpec, override: dict) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(root / spec.config_file))
    parser.read_meta(str(root / "configs" / "metadata.json"))
    for key, value in {"bundle_root": str(root), **override}.items():
        parser[key] = value
    return parser


def _write_torchscript(tmp, root, spec, ckpt, override, input_shape) -> str:
    """ckpt_export: script first; on failure trace at ``input_shape``. Returns how it was converted."""
    common = {
        "net_id": spec.net_id,
        "filepath": tmp,
        "ckpt_file": str(ckpt),
        "key_in_ckpt": _checkpoint_key(ckpt),
        "meta_file": str(root / "configs" / "metadata.json"),
        "config_file": str(root / spec.config_file),
        "bundle_root": str(root),
        **override,
    }
    try:
        ckpt_export(use_trace=False, **common)
        return "scripted"
    except Exception as err:  # torch.jit.script raises several types; any failure means "not scriptable"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    logger.warning(
        "%s: torch.jit.script failed (%s); tracing at input shape %s instead", spec.net_id, reason, input_shape
    )
    ckpt_export(use_trace=True, input_shape=list(input_shape), **common)
    return f"traced at {list(input_shape)} (torch.jit.script failed: {reason})"


def _export_one(root: Path, spec: NetworkSpec, ckpt: Path, out_dir: Path, formats, override, opset, overwrite) -> dict:
    parser = _parser(root, spec, override)
    input_shape = (
        1,
        int(parser.get_parsed_content(spec.channels_id)),
        *map(int, parser.get_parsed_content(spec.grid_id)),
    )
    paths = {fmt: out_dir / f"{spec.stem}.{fmt}" for fmt in formats}
    result: dict = {"input_shape": list(input_shape)}
    if "ts" in paths:

        def write_ts(tmp):
            result["ts_mode"] = _write_torchscript(tmp, root, spec, ckpt, override, input_shape)

        atomic_write(paths["ts"], write_ts, overwrite)
    if "pt2" in paths or "onnx" in paths:
        kind = {"keys": (spec.grid_id,), "network": spec.net_id}
        net = load_weights(
            parser.get_parsed_content(spec.net_id),
            str(ckpt),
            "cpu",
            bundle_root=root,
            settings=settings_of(parser, kind),
        )
        example = torch.rand(input_shape, generator=torch.Generator().manual_seed(0))
        program = None
        if "pt2" in paths:
            with torch.no_grad():
                program = torch.export.export(net, (example,))
            atomic_write(paths["pt2"], lambda tmp: torch.export.save(program, tmp), overwrite)
        if "onnx" in paths:
            integrate = net.integrate if spec.registration else None
            atomic_write(paths["onnx"], lambda tmp: write_onnx(net, example, tmp, opset, program, integrate), overwrite)
    result.update({fmt: str(p) for fmt, p in paths.items()})
    return result


def export(
    bundle_root: str = ".",
    networks=tuple(NETWORKS),
    formats=FORMATS,
    out_dir: str | None = None,
    checkpoints: dict | None = None,
    override: dict | None = None,
    opset: int = MIN_ONNX_OPSET,
    overwrite: bool = False,
) -> dict:
    """Export the bundle's networks as TorchScript, ``torch.export`` program and ONNX at their configured grid.

    Args:
        bundle_root: the bundle folder (configs/, models/).
        networks: names in :data:`NETWORKS` to export; a network whose config or checkpoint is missing is
            skipped with a warning (an error when nothing is left).
        formats: any of "ts", "pt2", "onnx".
        out_dir: folder of the exported files (default: each checkpoint's folder, i.e. ``models/``).
        checkpoints: ``{network: checkpoint path}`` replacing the default ``models/*.pt``.
        override: ``{network: {config id: value}}`` applied to that network's config (e.g. a smaller grid).
        opset: ONNX opset, at least 20.
        overwrite: replace existing exports; otherwise an existing one raises ``FileExistsError`` before
            anything is written.

    Returns:
        ``{network: {"input_shape": [...], "ts": path, "ts_mode": "scripted" or "traced ... (why)",
        "pt2": path, "onnx": path}}``, or ``{network: {"skipped": why}}``.
    """
    root = Path(bundle_root).resolve()
    networks, formats = ([x] if isinstance(x, str) else list(x) for x in (networks, formats))
    unknown = [n for n in networks if n not in NETWORKS] + [f for f in formats if f not in FORMATS]
    if unknown:
        raise InputError(f"unknown network or format {unknown}: choose from {list(NETWORKS)} and {list(FORMATS)}")
    if int(opset) < MIN_ONNX_OPSET:
        raise InputError(f"opset {opset}: ONNX needs opset >= {MIN_ONNX_OPSET} for 5-D grid sampling")
    checkpoints, override = dict(checkpoints or {}), dict(override or {})

    jobs, results = [], {}
    for name in networks:
        spec = NETWORKS[name]
        ckpt = Path(checkpoints.get(name) or root / spec.checkpoint)
        ckpt = ckpt if ckpt.is_absolute() else root / ckpt
        missing = [p for p in (root / spec.config_file, ckpt) if not p.is_file()]
        if missing:
            results[name] = {"skipped": f"{missing[0]} does not exist"}
            logger.warning("not exporting the %s network: %s does not exist", name, missing[0])
            continue
        jobs.append((name, spec, ckpt, Path(out_dir) if out_dir else ckpt.parent))
    if not jobs:
        raise InputError(
            f"nothing to export: {'; '.join(r['skipped'] for r in results.values()) or 'no network given'}"
        )
    overwrite = refuse_existing([d / f"{s.stem}.{f}" for _, s, _, d in jobs for f in formats], overwrite, "exports")
    for (
        _,
        _,
        ckpt,
        _,
    ) in jobs:  # every manifest check before MONAI's ckpt_export or torch reads a byte, or a file is written
        verify_checkpoint(ckpt, root)

    for name, spec, ckpt, folder in jobs:
        results[name] = _export_one(root, spec, ckpt, folder, formats, override.get(name, {}), int(opset), overwrite)
        logger.info("exported the %s network: %s", name, results[name])
    return results
