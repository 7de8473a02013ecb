#!/usr/bin/env bash
# Set up the test environment (once) and run the tests: bash run_tests.sh [--full] [pytest args]
# (without --full, the fast tier: tests marked full in tests/ are left out; .ci/run passes --full)
set -euo pipefail
cd "$(dirname "$0")"
source ./setup_env.sh requirements-dev.txt
python -m pytest "$@"
