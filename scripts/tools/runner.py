"""``python -m scripts run ...``: ``python -m monai.bundle run ...`` with one-line messages for bad input.

MONAI's ``ConfigParser`` wraps every error raised inside a config expression in ``RuntimeError("Failed
to evaluate ...")``, so a bad file named by a :class:`scripts.data.nifti.InputError` ends a long traceback.
This command takes the same arguments as ``monai.bundle run``, and when the root cause of a failure is
an expected user error (:class:`~scripts.data.nifti.InputError` or ``FileExistsError``) it re-raises that error
alone, which ``python -m scripts`` prints as ``error: <file>: <problem>`` with exit status 2. Any other
error keeps its full traceback.
"""

from __future__ import annotations

from monai.bundle import run as bundle_run

from scripts.data.nifti import InputError, flag, user_error
from scripts.overrides import bool_ids, config_files

__all__ = ["run"]


def run(*args, **kwargs) -> None:
    """Run a bundle config exactly as ``python -m monai.bundle run`` (same arguments, e.g. ``training
    --config_file configs/train.json --dataset_dir data``); expected user errors surface without the wrapping.

    An override of a yes/no config value is read with :func:`scripts.data.nifti.flag` (``--use_rigid false`` is False;
    fire would pass the text "false", which Python reads as yes)."""
    if not kwargs.get("config_file"):
        raise InputError(
            "no --config_file: python -m scripts run [RUN_ID] --config_file FILE [--id value ...] takes the arguments "
            "of python -m monai.bundle run"
        )
    try:
        if kwargs.get("config_file"):
            bools = bool_ids(config_files(kwargs["config_file"]))
            kwargs.update({k: flag(v, f"--{k}") for k, v in kwargs.items() if k in bools and isinstance(v, str)})
        bundle_run(*args, **kwargs)
    except Exception as err:
        root = user_error(err)
        if root is None:
            raise
        raise root from None
