#!/usr/bin/env bash
# Create the MONAI Label app's own virtual environment at <bundle root>/.venv-monailabel (or $1) and install the
# pinned apps/monailabel/requirements.txt, then requirements-no-deps.txt without dependencies (see
# requirements.txt why). Re-installs only when either file changed since the last successful install.
# Usage (from anywhere): bash apps/monailabel/setup_env.sh
set -euo pipefail
app_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$app_dir/../.." && pwd)"
venv="${1:-$root/.venv-monailabel}"
reqs=("$app_dir/requirements.txt" "$app_dir/requirements-no-deps.txt")
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
stamp="$venv/.installed-requirements.txt"
if [ ! -f "$stamp" ] || ! cmp -s "$stamp" <(cat "${reqs[@]}"); then
    "$venv/bin/python" -m pip install --quiet --no-cache-dir -r "${reqs[0]}"
    "$venv/bin/python" -m pip install --quiet --no-cache-dir --no-deps -r "${reqs[1]}"
    cat "${reqs[@]}" > "$stamp"
fi
