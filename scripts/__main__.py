"""Command line of the bundle: ``python -m scripts COMMAND --help``.

Commands are imported lazily so that ``--help`` and light commands do not pay for torch/ANTs imports.
"""

import importlib
import sys

import fire

# command name -> "module:function" inside this package
COMMANDS = {
    "synth": "phantom:synth",
    "datalist": "data:write_datalist",
    "evaluate": "evaluate:evaluate",
    "demo": "demo:demo",
    "export": "export:export",
    "package": "package:package",
    "make-model": "trained_model:make_model",
    "register": "cli:register",
    "register-folder": "cli:register_folder",
    "map-points": "cli:map_points",
    "run": "runner:run",
}


def _lazy(target: str):
    module, func = target.split(":")

    def command(*args, **kwargs):
        return getattr(importlib.import_module(f"scripts.{module}"), func)(*args, **kwargs)

    command.__doc__ = f"See scripts/{module}.py:{func} (run with --help after the command for its flags)."
    return command


def main(argv=None):
    from scripts.io import InputError

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:  # hand fire the real function so --help shows its docstring
        module, func = COMMANDS[argv[0]].split(":")
        component, name, argv = getattr(importlib.import_module(f"scripts.{module}"), func), f"python -m scripts {argv[0]}", argv[1:]
    else:
        component, name = {k: _lazy(v) for k, v in COMMANDS.items()}, "python -m scripts"
    try:
        fire.Fire(component, command=argv, name=name)
    except (InputError, FileExistsError) as err:  # expected user errors: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
