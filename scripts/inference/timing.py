"""Seconds per stage of one registration, for ``result.json`` and the one-line summary the CLI prints.

Hand-written (a dozen lines): neither MONAI nor ignite times plain function stages outside an engine.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

__all__ = ["StageTimer", "summary"]


class StageTimer:
    """Wall-clock seconds per named stage (``time.perf_counter``); a stage entered twice adds up.

    ``with timer("rigid"): ...`` times one stage; ``timer.seconds`` is ``{stage: seconds}`` in the order the
    stages first ran, plus ``"total"``: the wall time since the timer was made (or :meth:`restart`).
    """

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        self.start, self.stages = time.perf_counter(), {}

    @contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stages[stage] = self.stages.get(stage, 0.0) + time.perf_counter() - t0

    @property
    def seconds(self) -> dict:
        return {**{k: round(v, 4) for k, v in self.stages.items()}, "total": round(time.perf_counter() - self.start, 4)}


def summary(seconds: dict) -> str:
    """``"12.3 s: rigid 9.1, network 0.8, ..."``: the total, then the stages from the longest."""
    stages = sorted(((k, v) for k, v in seconds.items() if k != "total"), key=lambda kv: -kv[1])
    return f"{seconds['total']:.1f} s: " + ", ".join(f"{k} {v:.1f}" for k, v in stages)
