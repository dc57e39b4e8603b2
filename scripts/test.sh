#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the whole test suite on the real models and data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export CANAO_DATA=${CANAO_DATA:-$(cd .. && pwd)/shared/data}
exec .venv/bin/python -m pytest -q "$@"
