#!/usr/bin/env bash
# The GPU check: the one command a session runs on the GPU machine (see docs/gpu.md), with `.whl`
# (and `.gpu-data`) carried:
#
#   bash tests/gpu/run_check.sh              # on the GPU machine: install, then every check (~7 min)
#   bash tests/gpu/run_check.sh --dry-run    # here, on the CPU: the same wiring at tiny shapes
#
# On the GPU machine it installs the carried wheels and Loom itself (no network) into /tmp/site,
# puts that first on PYTHONPATH and runs `python -m tests.gpu.check` within the wall-clock budget
# GPU_CHECK_BUDGET (seconds, default 480, install included). Results go to $OUT (the device tool's
# folder; ./gpu-out when unset): results.json, summary.md, bench.md, logs.tar.gz. Other arguments
# (--budget, --jobs, --only, --data) pass through to tests/gpu/check.py.
#
# The dry run cannot install for Python 3.12 here, so it proves the install step by installing the
# wheels for Python 3.12 / manylinux into a temporary folder (tags and files checked, nothing used),
# then runs the checks with the project's .venv.
set -uo pipefail
cd "$(dirname "$0")/../.."
started=$(date +%s)
dry=0
for arg in "$@"; do [ "$arg" = "--dry-run" ] && dry=1; done
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export OUT
mkdir -p "$OUT/logs"
install_log="$OUT/logs/install.log"
: >"$install_log"

install_wheels() {  # $1: python, $2: target folder, rest: extra pip options
  local py=$1 target=$2
  shift 2
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "no .whl folder (run launch/scripts/gpu_wheels.sh first)" | tee -a "$install_log"
    return 1
  fi
  "$py" -m pip install -q --no-index --no-deps --no-compile --target "$target" "$@" .whl/*.whl >>"$install_log" 2>&1
}

if [ "$dry" = 1 ]; then
  PY=${PYTHON:-.venv/bin/python}
  budget=${GPU_CHECK_BUDGET:-1200}
  scratch=$(mktemp -d)
  if install_wheels "$PY" "$scratch" --only-binary=:all: --implementation cp --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64; then
    echo "install (dry run): $(ls .whl/*.whl | wc -l) wheels install for Python 3.12 / manylinux x86_64" |
      tee -a "$install_log"
  else
    echo "install (dry run): FAILED, see $install_log" | tee -a "$install_log"
  fi
  rm -rf "$scratch"
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  PY=${PYTHON:-python3}
  budget=${GPU_CHECK_BUDGET:-480}
  SITE=${GPU_CHECK_SITE:-/tmp/site}
  mkdir -p "$SITE"
  install_wheels "$PY" "$SITE" && echo "installed $(ls .whl/*.whl | wc -l) wheels into $SITE" | tee -a "$install_log"
  # Loom from the working tree, no network: setuptools from the machine builds it; where that cannot
  # work, the loom namespace is made of links to the repository's folders (what package_dir maps)
  if "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$SITE" . \
    >>"$install_log" 2>&1; then
    echo "installed Loom from the working tree into $SITE" | tee -a "$install_log"
  else
    echo "pip could not build Loom here (see $install_log); linking its folders as loom.* instead" |
      tee -a "$install_log"
    mkdir -p "$SITE/loom"
    for d in launch model techniques data; do ln -sfn "$PWD/$d" "$SITE/loom/$d"; done
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" LOOM_GPU_SITE="$SITE"
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
  nvidia-smi >"$OUT/logs/nvidia-smi.txt" 2>&1 || true
fi
export PYTORCH_NVML_BASED_CUDA_CHECK=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
left=$((budget - ($(date +%s) - started)))
echo "install step: $(($(date +%s) - started)) s; checks get ${left} s"
"$PY" -m tests.gpu.check --out "$OUT" --budget "$left" "$@"
