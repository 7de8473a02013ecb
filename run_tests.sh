#!/usr/bin/env bash
# Set up the test environment (once) and run the test suite: bash run_tests.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")"
source ./setup_env.sh requirements-dev.txt
python -m pytest "$@"
