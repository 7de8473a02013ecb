"""MONAI Label app of the MRI–TRUS registration bundle (``docs/monailabel.md``).

Start from the bundle root, in the app's own environment (``apps/monailabel/setup_env.sh``)::

    source .venv-monailabel/bin/activate   # bin/monailabel runs the `python` found on PATH
    monailabel start_server --app apps/monailabel --studies DATASTORE --host 127.0.0.1

Options (``--conf KEY VALUE``): ``config_files`` comma-separated bundle configs merged in order (relative paths
from the bundle root; default ``configs/inference.json``), ``checkpoint`` registration weights (default: the config's),
``label_names`` comma-separated names of the label channels (default ``DEFAULT_LABEL_NAMES``).
"""

from __future__ import annotations

import sys
from pathlib import Path

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
if str(BUNDLE_ROOT) not in sys.path:  # the bundle's scripts.* package (pipeline, configs loader)
    sys.path.insert(0, str(BUNDLE_ROOT))

from lib.registration import DEFAULT_LABEL_NAMES, MRLabelsOnTRUS  # noqa: E402
from monailabel.interfaces.app import MONAILabelApp  # noqa: E402

TASK = "mr_labels_on_trus"  # the model name shown by MONAI Label (REST: POST /infer/mr_labels_on_trus?image=<case>)


def _list(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _from_root(path: str) -> str:
    """A ``--conf`` path: absolute as given, relative from the bundle root."""
    return str(Path(path) if Path(path).is_absolute() else BUNDLE_ROOT / path)


class RegistrationApp(MONAILabelApp):
    """One inference task, :class:`lib.registration.MRLabelsOnTRUS`, on a local datastore of TRUS images."""

    def __init__(self, app_dir, studies, conf):
        configs = _list(conf.get("config_files")) or ["configs/inference.json"]
        self.config_files = [_from_root(p) for p in configs]
        self.checkpoint = _from_root(conf["checkpoint"]) if conf.get("checkpoint") else None
        self.label_names = _list(conf.get("label_names")) or list(DEFAULT_LABEL_NAMES)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="MRI-TRUS registration",
            description="MR gland and landmark labels registered onto TRUS images",
            version="1.0",
        )

    def init_infers(self):
        return {TASK: MRLabelsOnTRUS(self.studies, self.config_files, self.checkpoint, self.label_names)}
