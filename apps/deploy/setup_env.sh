#!/usr/bin/env bash
# Create .venv-deploy at the bundle root (once) with the bundle's and the MONAI Deploy app's pinned requirements.
# Reinstalls only when either requirements file changed since the last successful install. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/../.."
env_dir=".venv-deploy"
reqs=(requirements.txt apps/deploy/requirements.txt)
stamp="$env_dir/.installed-deploy"
if [ ! -x "$env_dir/bin/python" ]; then
    echo "setup_env: creating $env_dir (python3 -m venv)"
    python3 -m venv "$env_dir"
fi
if [ -f "$stamp" ] && cmp -s "$stamp" <(cat "${reqs[@]}"); then
    echo "setup_env: $env_dir is up to date"
else
    echo "setup_env: installing ${reqs[*]} into $env_dir (a few minutes the first time)"
    start=$SECONDS
    "$env_dir/bin/python" -m pip install --quiet --no-cache-dir -r "${reqs[0]}" -r "${reqs[1]}"
    cat "${reqs[@]}" > "$stamp"
    echo "setup_env: installed in $((SECONDS - start)) s"
fi
