#!/usr/bin/env bash
# Create the MONAI Label app's own virtual environment at <bundle root>/.venv-monailabel (or $1) and install the
# pinned apps/monailabel/requirements.txt, then requirements-no-deps.txt without dependencies (see
# requirements.txt why). When either file changed since the last successful install, the environment is
# rebuilt from scratch (packages of an older pin set would linger otherwise); else nothing is done.
# Usage (from anywhere): bash apps/monailabel/setup_env.sh [environment folder]
set -euo pipefail
app_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$app_dir/../.." && pwd)"
venv="${1:-$root/.venv-monailabel}"
reqs=("$app_dir/requirements.txt" "$app_dir/requirements-no-deps.txt")
stamp="$venv/.installed-requirements.txt"
if [ ! -f "$stamp" ] || ! cmp -s "$stamp" <(cat "${reqs[@]}"); then
    if [ -e "$venv" ]; then
        if [ ! -f "$venv/pyvenv.cfg" ]; then
            echo "setup_env: $venv exists and is not a virtual environment; refusing to replace it" >&2
            exit 1
        fi
        echo "setup_env: $venv is out of date; rebuilding it"
        rm -rf "$venv"
    fi
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --no-cache-dir -r "${reqs[0]}"
    "$venv/bin/python" -m pip install --quiet --no-cache-dir --no-deps -r "${reqs[1]}"
    cat "${reqs[@]}" > "$stamp"
fi
