# Sourced by run_demo.sh and run_tests.sh: create .venv on first use and install the pinned requirements file $1.
# Reinstalls only when that file changed since the last successful install.
req="${1:-requirements.txt}"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=".venv/.installed-$(basename "$req")"
if [ ! -f "$stamp" ] || ! cmp -s "$stamp" <(cat requirements*.txt); then
    .venv/bin/python -m pip install --quiet --no-cache-dir -r "$req"
    cat requirements*.txt > "$stamp"
fi
source .venv/bin/activate
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
