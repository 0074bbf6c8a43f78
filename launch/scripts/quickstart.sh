#!/usr/bin/env bash
# The main job on built-in defaults, from a fresh clone: install, build the Linux-kernel-docs corpus,
# train a SentencePiece tokenizer and shards, train a small GPT with all five techniques on 2
# processes, evaluate on the held-out Python docs, print a sample and where logs and checkpoints are.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash launch/scripts/install.sh
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/torchrun --standalone --nproc-per-node 2 -m loom.launch.cli train configs/quickstart.yaml "$@"
