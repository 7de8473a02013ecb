"""Refuse command-line overrides that name no id of the config files (``--max_epoch 3`` for ``max_epochs``),
and yes/no overrides that would be read wrongly (``--use_rigid false``: fire passes the text "false", which is true).

``python -m monai.bundle run`` adds an unknown ``--key value`` to the config as a new id that nothing
reads, so a typo silently runs the defaults. MONAI keeps the override list to itself, so the check reads
the command line of ``python -m monai.bundle run ...`` or ``python -m scripts run ...`` and compares each
``--key`` with the ids of the ``--config_file`` files (before overrides); a new key inside a component
(a dict with ``_target_``) is allowed: it becomes a keyword argument, which the constructor checks. Called
first in the configs' ``initialize``; other callers (``monai.bundle.run`` from Python, MONAI Label, tests)
are left alone.
"""

from __future__ import annotations

import ast
import difflib
import sys
from pathlib import Path

from monai.bundle import ConfigParser

from scripts.data.nifti import InputError, flag

__all__ = ["check_overrides", "config_ids", "bool_ids", "config_files"]

# arguments of monai.bundle's ``run`` itself, not config ids
RUN_ARGUMENTS = {
    "config_file",
    "meta_file",
    "logging_file",
    "args_file",
    "run_id",
    "init_id",
    "final_id",
    "tracking",
    "workflow_type",
    "workflow_name",
    "properties_path",
}


def config_ids(content, prefix: str = "") -> list[str]:
    """Every id of a config's content: ``a``, ``a#b``, ``a#0``... (dict keys and list indices, nested)."""
    items = content.items() if isinstance(content, dict) else enumerate(content) if isinstance(content, list) else ()
    ids = []
    for key, value in items:
        ident = f"{prefix}{key}"
        ids += [ident, *config_ids(value, ident + "#")]
    return ids


def _bundle_command(argv: list[str]) -> list[str] | None:
    """The arguments after ``run`` when ``argv`` is ``python -m monai.bundle run ...`` or ``python -m scripts run ...``."""
    program = Path(argv[0]).as_posix() if argv else ""
    if program.endswith(("monai/bundle/__main__.py", "scripts/__main__.py")) and argv[1:2] == ["run"]:
        return argv[2:]
    return None


def _options(args: list[str]) -> dict[str, str | None]:
    """``--key value`` / ``--key=value`` pairs of a command line (fire's spelling: ``-`` read as ``_``)."""
    options, i = {}, 0
    while i < len(args):
        if args[i].startswith("--"):
            key, _, value = args[i][2:].partition("=")
            if not value and i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
            options[key] = value or None
        i += 1
    return options


def bool_ids(files) -> set[str]:
    """The ids whose value in the config ``files`` (merged) is a bool: their overrides must read as yes/no."""
    parser = ConfigParser()
    parser.read_config(list(files))
    return {i for i in config_ids(parser.get()) if isinstance(parser.get(i), bool)}


def config_files(value) -> list[str]:
    """``--config_file`` as fire reads it: one path, a comma-separated list, or a Python list literal."""
    if isinstance(value, (list, tuple)):
        return [str(f) for f in value]
    if value.strip().startswith("["):
        return [str(f) for f in ast.literal_eval(value)]
    return [f for f in value.split(",") if f]


def check_overrides(argv: list[str] | None = None) -> None:
    """Raise :class:`InputError` for each ``--key`` of the bundle command line (default ``sys.argv``) that is
    not an id of its config files nor an argument of ``run``, naming the nearest id; no-op for other commands."""
    args = _bundle_command(sys.argv if argv is None else argv)
    if args is None:
        return
    options = _options(args)
    if not options.get("config_file"):
        return
    files = config_files(options["config_file"])
    parser = ConfigParser()
    parser.read_config(files)
    known = set(config_ids(parser.get()))

    def new_argument(key: str) -> bool:  # a new keyword of a component: its constructor checks the name
        parent = key.rpartition("#")[0]
        return parent in known and isinstance(parser.get(parent), dict) and "_target_" in parser.get(parent)

    unknown = [
        k
        for k in options
        if k not in RUN_ARGUMENTS and k not in known and k.replace("-", "_") not in known and not new_argument(k)
    ]
    if unknown:
        lines = []
        for key in unknown:
            near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            lines.append(f"--{key}" + (f" (did you mean --{near[0]}?)" if near else ""))
        raise InputError(
            f"{', '.join(files)}: no config id for the override(s) {'; '.join(lines)}; a typo would be "
            "added as a new id and ignored"
        )
    wrapper = Path(argv[0] if argv else sys.argv[0]).as_posix().endswith("scripts/__main__.py")
    for key in sorted(set(options) & bool_ids(files)):
        raw = options[key]
        if raw is None or raw in ("True", "False", "0", "1"):  # fire turns these (and a bare --key) into bool / int
            continue
        # anything but a yes/no word is refused; a "no" word would reach the config as text, which reads as yes
        # (python -m scripts run turns the words into bools before the run, scripts/tools/runner.py)
        if not flag(raw, f"--{key}") and not wrapper:
            raise InputError(
                f"--{key} {raw}: python -m monai.bundle run passes {raw!r} on as text, which Python reads "
                "as yes; write True or False (or run through python -m scripts run, which reads yes/no, "
                "true/false, 1/0 in any case)"
            )
