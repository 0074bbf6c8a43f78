#!/usr/bin/env bash
# The test suite, from a fresh clone: installs what it needs, then runs every test (slow ones too).
set -euo pipefail
cd "$(dirname "$0")/../.."
bash launch/scripts/install.sh
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
