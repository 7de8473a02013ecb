#!/usr/bin/env bash
# Set up the environment (once) and run the synthetic smoke demo: bash run_demo.sh [demo flags]
set -euo pipefail
cd "$(dirname "$0")"
source ./setup_env.sh requirements.txt
python -m scripts demo "$@"
