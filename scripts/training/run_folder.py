"""Run-folder logic and checkpoint objects of ``configs/train.json``.

A run folder (``run_dir``) holds ``run_config.json`` (the config fingerprint and content),
``last.pt`` (written after every epoch), ``best.pt`` (written when the validation key metric
improves) and ``tensorboard/``. :func:`prepare_run_dir` decides at the start of ``run`` whether a
training starts fresh, resumes from ``last.pt``, or stops with an error that asks for an explicit
overwrite. Checkpoints hold only tensors and plain Python values, so ``torch.load(...,
weights_only=True)`` reads them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser
from monai.handlers import CheckpointLoader

from scripts.data.nifti import InputError, atomic_write, flag, write_json  # noqa: F401 (flag: used by the configs)

__all__ = [
    "RUN_CONFIG",
    "LAST",
    "BEST",
    "TENSORBOARD",
    "RESUME_IGNORE",
    "RngState",
    "BestMetric",
    "AtomicCheckpointSaver",
    "flag",
    "active_config",
    "config_fingerprint",
    "prepare_run_dir",
    "attach_resume",
]

logger = logging.getLogger(__name__)

RUN_CONFIG = "run_config.json"
LAST = "last.pt"
BEST = "best.pt"
TENSORBOARD = "tensorboard"
REPLACED = "replaced_run"  # where --overwrite keeps the previous run until the new one saves a checkpoint
# ids that may change between a run and its resumption (``#`` separates nested keys)
RESUME_IGNORE = ("overwrite", "device", "max_epochs", "run_dir", "bundle_root", "resume_ignore", "_meta_")


class RngState:
    """The global random states (Python ``random``, NumPy, torch CPU and CUDA) as a checkpointable object.

    ``state_dict()`` holds tensors, ints, floats and None only, so that ``torch.load(weights_only=True)``
    restores it; ``load_state_dict`` puts every state back.
    """

    def state_dict(self) -> dict:
        py_version, py_state, py_gauss = random.getstate()
        _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
        return {
            "python_version": int(py_version),
            "python_state": torch.tensor(py_state, dtype=torch.int64),
            "python_gauss": py_gauss,
            "numpy_keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "numpy_pos": int(np_pos),
            "numpy_has_gauss": int(np_has_gauss),
            "numpy_gauss": float(np_gauss),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def load_state_dict(self, state: Mapping) -> None:
        random.setstate((state["python_version"], tuple(state["python_state"].tolist()), state["python_gauss"]))
        np.random.set_state(
            (
                "MT19937",
                state["numpy_keys"].numpy().astype(np.uint32),
                state["numpy_pos"],
                state["numpy_has_gauss"],
                state["numpy_gauss"],
            )
        )
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class BestMetric:
    """The best key-metric value and its epoch of a MONAI evaluator, as a checkpointable object.

    Restoring it on resume keeps ``best.pt`` from being replaced by a worse model after a restart.
    """

    def __init__(self, evaluator: Engine):
        self.evaluator = evaluator

    def state_dict(self) -> dict:
        return {
            "best_metric": float(self.evaluator.state.best_metric),
            "best_metric_epoch": int(self.evaluator.state.best_metric_epoch),
        }

    def load_state_dict(self, state: Mapping) -> None:
        self.evaluator.state.best_metric = state["best_metric"]
        self.evaluator.state.best_metric_epoch = state["best_metric_epoch"]


# hand-written: MONAI's CheckpointSaver deletes the old file before writing the new one (a kill can leave none)
class AtomicCheckpointSaver:
    """Write the state dicts of ``save_dict`` and of the trainer to ``save_dir/filename`` after trainer epochs.

    Hand-written because MONAI's ``CheckpointSaver`` (and ignite's ``Checkpoint`` under it) deletes the
    previous file before writing the next one, with ignite's atomic mode switched off, so an
    interruption can leave no checkpoint at all. Here the new file is written under a temporary name
    and renamed over the old one (:func:`scripts.data.nifti.atomic_write`): a readable checkpoint always exists.

    Attach it to the TRAINER, after the ``ValidationHandler`` (handlers run in list order). The trainer
    is stored under the key ``"trainer"`` (epoch and iteration); ``None`` entries of ``save_dict``
    (e.g. a disabled optimiser) are skipped.

    Args:
        save_dir: the run folder.
        save_dict: name -> object with ``state_dict()``.
        filename: file name inside ``save_dir`` ("last.pt" or "best.pt").
        validator: with a MONAI evaluator, save only after epochs in which its key metric reached a new
            best (``evaluator.state.best_metric_epoch`` equals the trainer's epoch); without, every
            ``interval`` epochs.
        interval: epochs between saves when there is no ``validator``.
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: Mapping[str, Any],
        filename: str = LAST,
        validator: Engine | None = None,
        interval: int = 1,
    ):
        self.path = Path(save_dir) / filename
        self.save_dict = {k: v for k, v in save_dict.items() if v is not None}
        if "trainer" in self.save_dict:
            raise ValueError(
                "save_dict must not contain 'trainer': the engine the saver is attached to is stored there"
            )
        self.validator = validator
        self.interval = int(interval)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        if self.validator is not None:
            if self.validator.state.best_metric_epoch != epoch:
                return
        elif epoch % self.interval:
            return
        self.save(engine)
        engine.logger.info(f"saved checkpoint {self.path} at epoch {epoch}")

    def save(self, engine: Engine) -> None:
        """Write the checkpoint now (atomically)."""
        state = {name: obj.state_dict() for name, obj in self.save_dict.items()}
        state["trainer"] = engine.state_dict()
        atomic_write(self.path, lambda tmp: torch.save(state, tmp), overwrite=True)


def active_config() -> dict:
    """The config content of the ``monai.bundle`` parser that is evaluating the calling expression.

    MONAI gives config expressions no handle on their parser, so this walks up the call stack to the
    ``ConfigParser`` frame. The content has the command-line overrides applied and ``%`` macros
    expanded (``ConfigParser.parse`` runs before any expression).
    """
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, ConfigParser):
            return owner.get()
        frame = frame.f_back
    raise RuntimeError("active_config() must be called from an expression of a monai.bundle config; pass config=")


def _without(config: Mapping, ignore: Sequence[str]) -> dict:
    """A deep copy of ``config`` without the ids in ``ignore`` (``a#b`` removes key ``b`` of ``a``)."""
    content = json.loads(json.dumps(config, default=str))
    for ident in ignore:
        *parents, last = str(ident).split("#")
        node = content
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return content


def config_fingerprint(config: Mapping, ignore: Sequence[str] = RESUME_IGNORE) -> str:
    """SHA-256 of the JSON of ``config`` (keys sorted) without the ids in ``ignore``."""
    text = json.dumps(_without(config, ignore), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Config ids whose values differ between two JSON-like trees, as ``id: old -> new`` lines."""
    if isinstance(old, dict) and isinstance(new, dict):
        lines = []
        for key in sorted(set(old) | set(new), key=str):
            ident = f"{prefix}#{key}" if prefix else str(key)
            if key not in old:
                lines.append(f"{ident}: added")
            elif key not in new:
                lines.append(f"{ident}: removed")
            else:
                lines.extend(_differences(old[key], new[key], ident))
        return lines
    return [] if old == new else [f"{prefix or '<config>'}: {json.dumps(old)} -> {json.dumps(new)}"]


def _checkpoint_epoch(path: Path, required: Sequence[str]) -> int:
    """Epoch stored in a checkpoint, after checking it loads with ``weights_only=True`` and has ``required``."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise InputError(f"{path}: checkpoint cannot be read ({type(err).__name__}: {err})") from None
    if not isinstance(checkpoint, dict):
        raise InputError(f"{path}: checkpoint holds a {type(checkpoint).__name__}, not a training checkpoint dict")
    missing = [k for k in required if k not in checkpoint]
    if missing:
        raise InputError(f"{path}: checkpoint lacks {missing}")
    trainer = checkpoint["trainer"]  # ignite stores the iteration count and the epoch length
    try:
        return int(trainer["iteration"]) // int(trainer["epoch_length"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        raise InputError(f"{path}: checkpoint has no trainer iteration and epoch length") from None


def _set_aside(run_dir: Path) -> None:
    """Move what a training wrote into ``run_dir`` (nothing else) to ``run_dir/replaced_run``, deleted by
    :func:`drop_replaced_run` once the new training has saved a checkpoint: a new run that fails first loses nothing."""
    ours = [run_dir / name for name in (RUN_CONFIG, LAST, BEST, TENSORBOARD) if (run_dir / name).exists()]
    kept = run_dir / REPLACED
    if kept.exists():  # an earlier --overwrite whose training never saved a checkpoint
        if any(p.name in (LAST, BEST) for p in ours):
            raise InputError(
                f"{run_dir}: holds checkpoints and, in {kept}, an earlier replaced run; move or delete "
                "one of them first"
            )
        for path in ours:  # a run config and logs without checkpoints: nothing to keep
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        return
    if ours:
        kept.mkdir()
        for path in ours:
            path.rename(kept / path.name)
        logger.info(f"the previous run is kept in {kept} until this training saves its first checkpoint")


def drop_replaced_run(trainer: Engine, run_dir: str) -> None:
    """Delete ``run_dir/replaced_run`` (:func:`_set_aside`) at the end of the first epoch, after its checkpoints
    are saved (attach after the checkpoint savers, e.g. in the config's ``run`` list)."""
    kept = Path(run_dir) / REPLACED

    def drop(_):
        if kept.is_dir():
            shutil.rmtree(kept)
            logger.info(f"deleted the replaced run {kept}: this training has saved its checkpoints")

    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), drop)


def prepare_run_dir(
    run_dir: str,
    overwrite: bool = False,
    ignore: Sequence[str] = RESUME_IGNORE,
    config: Mapping | None = None,
    required: Sequence[str] = ("model", "trainer"),
) -> str | None:
    """Start, resume or refuse a training in ``run_dir``; return the checkpoint to resume from, or None.

    * missing or empty folder: start fresh, write ``run_config.json``;
    * ``run_config.json`` with the same fingerprint and a readable ``last.pt``: resume from it (logged
      as "resuming from <ckpt> at epoch N"); same fingerprint and no ``last.pt`` yet: start fresh;
    * ``best.pt`` without ``last.pt``: :class:`InputError` (starting again would replace that model);
    * anything else (different config, unreadable checkpoint or run config, a folder this bundle did
      not write): :class:`InputError` naming the folder and the problem, unless ``overwrite``, which
      moves the previous checkpoints, run config and TensorBoard logs to ``replaced_run/`` (deleted by
      :func:`drop_replaced_run` after the new run's first epoch) and starts fresh.

    Args:
        run_dir: the run folder.
        overwrite: replace a previous, incompatible run (a bool, or "true"/"false").
        ignore: config ids left out of the fingerprint (changing them does not block a resume).
        config: the config content; default: that of the running ``monai.bundle`` parser.
        required: keys a checkpoint must hold to be resumed from.
    """
    folder, overwrite = Path(run_dir), flag(overwrite, "overwrite")
    content = _without(active_config() if config is None else config, ignore)
    fingerprint = config_fingerprint(content, ())
    record = folder / RUN_CONFIG
    advice = "pass --overwrite true to replace the previous run, or choose another --run_dir"

    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: run_dir exists and is not a folder")
    if overwrite and folder.is_dir():
        _set_aside(folder)
    elif folder.is_dir() and any(folder.iterdir()):
        if not record.is_file():
            raise InputError(f"{folder}: run folder is not empty but has no {RUN_CONFIG} of this bundle; {advice}")
        try:
            previous = json.loads(record.read_text())
            previous_fingerprint, previous_config = previous["fingerprint"], previous["config"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise InputError(f"{record}: unreadable run config ({err}); {advice}") from None
        if previous_fingerprint != fingerprint:
            changes = _differences(previous_config, content) or ["(the stored fingerprint does not match)"]
            shown = "\n  ".join(changes[:20]) + (f"\n  ... {len(changes) - 20} more" if len(changes) > 20 else "")
            raise InputError(f"{folder}: the config differs from the run in this folder:\n  {shown}\n{advice}")
        last = folder / LAST
        if last.is_file():
            try:
                epoch = _checkpoint_epoch(last, required)
            except InputError as err:
                raise InputError(f"{err}; {advice}") from None
            logger.info(f"resuming from {last} at epoch {epoch}")
            return str(last)
        if (folder / BEST).is_file():
            raise InputError(
                f"{folder}: holds {BEST} but no {LAST} to resume from; starting again would replace "
                f"that model; {advice}"
            )
        logger.info(f"{folder}: same config and no checkpoint yet, starting fresh")
        return None
    write_json({"fingerprint": fingerprint, "config": content}, record, overwrite=True)
    logger.info(f"starting a new training in {folder}")
    return None


def attach_resume(trainer: Engine, checkpoint: str | None, load_dict: Mapping[str, Any]) -> None:
    """Attach MONAI's ``CheckpointLoader`` to restore ``load_dict`` and the trainer from ``checkpoint``.

    Called in the config's ``run`` list, after the trainer exists (the trainer cannot appear in its
    own handler list). The loader fires at the trainer's start and keeps the configured
    ``max_epochs``, so raising ``max_epochs`` extends a finished training. No-op when ``checkpoint`` is None.
    """
    if checkpoint is None:
        return
    objects = {k: v for k, v in load_dict.items() if v is not None}
    CheckpointLoader(load_path=checkpoint, load_dict={**objects, "trainer": trainer}, map_location="cpu").attach(
        trainer
    )
