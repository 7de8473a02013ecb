#!/usr/bin/env bash
# Create the MONAI Label app's own virtual environment at <bundle root>/.venv-monailabel and install the
# pinned apps/monailabel/requirements.txt into it. Re-installs only when that file changed since the last
# successful install. Usage (from anywhere): bash apps/monailabel/setup_env.sh
set -euo pipefail
app_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$app_dir/../.." && pwd)"
venv="$root/.venv-monailabel"
req="$app_dir/requirements.txt"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
stamp="$venv/.installed-requirements.txt"
if [ ! -f "$stamp" ] || ! cmp -s "$stamp" "$req"; then
    "$venv/bin/python" -m pip install --quiet -r "$req"
    cp "$req" "$stamp"
fi
