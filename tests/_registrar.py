"""Test helper: a :class:`scripts.inference.registrar.Registrar` from keyword settings, and one registration."""

from __future__ import annotations

from scripts.inference.pair import PairStage
from scripts.inference.registrar import Registrar

PAIR_KEYS = ("spatial_size", "depth_crop", "axcodes", "use_rigid", "rigid_args", "roi_mask", "intensity")
REGISTRAR_KEYS = ("segmenter", "inferer", "postprocessing", "label_threshold", "device", "amp", "direction")
CALL_KEYS = ("moving_mask", "fixed_mask", "rigid", "overwrite", "publish")


def make_registrar(network=None, spatial_size=(128, 128, 120), **settings) -> Registrar:
    """A registrar whose pair stage and other settings come from ``settings`` (names as in the configs)."""
    pair = PairStage(spatial_size, **{k: v for k, v in settings.items() if k in PAIR_KEYS})
    return Registrar(network, pair, **{k: v for k, v in settings.items() if k in REGISTRAR_KEYS})


def register_pair(moving, fixed, out_dir, moving_labels=None, network=None, **settings) -> dict:
    """Register one pair with a registrar made from ``settings``; call-time arguments passed through."""
    unknown = set(settings) - {"spatial_size", *PAIR_KEYS, *REGISTRAR_KEYS, *CALL_KEYS}
    assert not unknown, f"unknown settings {unknown}"
    registrar = make_registrar(network, **{k: v for k, v in settings.items() if k not in CALL_KEYS})
    call = {k: v for k, v in settings.items() if k in CALL_KEYS}
    return registrar.register(moving, fixed, out_dir, moving_labels, **call)
