"""Command line of the bundle: ``python -m scripts COMMAND --help``.

Commands are imported lazily so that ``--help`` and light commands do not pay for torch/ANTs imports.
"""

import difflib
import importlib
import inspect
import sys

import fire

# command name -> "module:function" inside this package
COMMANDS = {
    "synth": "phantom.synth:synth",
    "frames": "phantom.sequence:write_frames",
    "datalist": "data.datalist:write_datalist",
    "evaluate": "evaluation.evaluate:evaluate",
    "demo": "tools.demo:demo",
    "export": "tools.export:export",
    "package": "tools.package:package",
    "make-model": "weights.trained_model:make_model",
    "make-sequence-model": "weights.sequence_model:make_sequence_model",
    "evaluate-sequences": "evaluation.evaluate_sequences:evaluate_sequences",
    "register": "tools.cli:register",
    "register-folder": "tools.cli:register_folder",
    "map-points": "tools.cli:map_points",
    "run": "tools.runner:run",
}


def _function(module: str, func: str):
    """``scripts.<module>.<func>``; a repository tool missing from a packaged bundle is one error line."""
    try:
        return getattr(importlib.import_module(f"scripts.{module}"), func)
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("scripts.tools"):
            sys.exit(
                f"error: {module} is a repository tool, not shipped in the packaged bundle; run the configs with "
                "python -m monai.bundle run (configs/inference.json, configs/train.json)"
            )
        raise


def _lazy(target: str):
    module, func = target.split(":")

    def command(*args, **kwargs):
        return _function(module, func)(*args, **kwargs)

    command.__doc__ = (
        f"See scripts/{module.replace('.', '/')}.py:{func} (run with --help after the command for its flags)."
    )
    return command


FIRE_FLAGS = {"help", "h", "interactive", "i", "separator", "completion", "trace", "t", "verbose", "v"}


def check_flags(function, argv) -> None:
    """Refuse a ``--flag`` that names no argument of ``function``, with the nearest one, before anything runs.

    fire runs the command first and complains about an argument it could not use only afterwards, when every
    output is written (``--overwirte``, ``--moving-label``); a mistyped optional input was silently dropped.
    """
    from scripts.data.nifti import InputError

    parameters = inspect.signature(function).parameters
    if any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        return
    known = {name.replace("_", "-") for name in parameters}
    for arg in argv:
        if arg == "--":
            break
        if not arg.startswith("--") or len(arg) == 2:
            continue
        key = arg[2:].split("=", 1)[0].replace("_", "-")
        negated = key[2:] if key.startswith("no") else None  # fire's --noflag for a boolean
        if key in known or key in FIRE_FLAGS or negated in known:
            continue
        near = difflib.get_close_matches(key, sorted(known), n=1)
        raise InputError(
            f"--{key}: not an argument of this command"
            + (f" (did you mean --{near[0]}?)" if near else "")
            + f"; its arguments: {', '.join('--' + k for k in sorted(known))}"
        )


def main(argv=None):
    from scripts.data.nifti import InputError

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:  # hand fire the real function so --help shows its docstring
        module, func = COMMANDS[argv[0]].split(":")
        component, name, argv = (_function(module, func), f"python -m scripts {argv[0]}", argv[1:])
    else:
        component, name = {k: _lazy(v) for k, v in COMMANDS.items()}, "python -m scripts"
    if name == "python -m scripts run" and {"--help", "-h"} & set(argv):  # fire would call run() without a config
        print(f"usage: {name} [RUN_ID] --config_file FILE [--id value ...]\n\n{inspect.getdoc(component)}")
        return
    try:
        if callable(component):
            check_flags(component, argv)
        fire.Fire(component, command=argv, name=name)
    except (InputError, FileExistsError) as err:  # expected user errors: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
