#!/usr/bin/env bash
# Loom through the DeepSpeed launcher (`deepspeed` = python -m deepspeed.launcher.runner).
#
#   launch/deepspeed/run_deepspeed.sh CONFIG [dotted.overrides...] [--resume auto]
#
# Single node (no HOSTFILE):   NUM_GPUS=8 launch/deepspeed/run_deepspeed.sh configs/tiny.yaml
#   CPU (gloo):                NUM_GPUS=2 launch/deepspeed/run_deepspeed.sh configs/tiny.yaml
# Multi-node over pdsh/ssh:    HOSTFILE=hostfile launch/deepspeed/run_deepspeed.sh configs/tiny.yaml
#   (run on the first host; passwordless ssh to every host; the repository and Python at the same path
#   on every host, e.g. a shared filesystem: the runner sends `cd <this dir>; <this python> ...`)
# One launcher per node, no ssh (Slurm, Kubernetes): every node runs
#                              HOSTFILE=hf NODE_RANK=<i> MASTER_ADDR=<host 0> launch/deepspeed/run_deepspeed.sh ...
#   (launch/slurm/train_deepspeed.sbatch does this under srun)
#
# Environment:
#   HOSTFILE        DeepSpeed hostfile, one "hostname slots=N" line per host (launch/deepspeed/hostfile.example).
#                   A single localhost line is a local launch (no ssh).
#   NUM_GPUS        ranks per node (--num_gpus). Default: every GPU DeepSpeed sees, respecting
#                   CUDA_VISIBLE_DEVICES; on a CPU-only machine 1 (DeepSpeed would count NUMA nodes). With a
#                   HOSTFILE the slots decide unless NUM_GPUS is set.
#   NUM_NODES       use only the first N hosts of the hostfile
#   MASTER_ADDR     rank 0's address (default: 127.0.0.1 on one node, else the first hostfile host)
#   MASTER_PORT     default 29500
#   NODE_RANK       launch only this node's ranks (--no_ssh); needs HOSTFILE and MASTER_ADDR
#   DS_LAUNCHER     multi-node backend: pdsh (default), openmpi, mvapich, mpich, impi, slurm
#   DS_SSH_PORT     ssh port for pdsh/ssh
#   DS_FORWARD_VARS extra variable names to forward to the other hosts (space separated)
#   DS_EXTRA_ARGS   extra runner arguments, e.g. "--bind_cores_to_rank --enable_each_rank_log=logs"
#   PYTHON          interpreter (default ./.venv/bin/python if present, else python3)
#
# Forwarded to the other hosts (through a generated .deepspeed_env, DS_ENV_FILE): GLOO_SOCKET_IFNAME,
# NCCL_*, TORCH_NCCL_*, TORCH_DISTRIBUTED_DEBUG, OMP_NUM_THREADS, CUDA_DEVICE_MAX_CONNECTIONS, LOOM_*, HF_*,
# TOKENIZERS_PARALLELISM and DS_FORWARD_VARS, plus what DeepSpeed forwards itself (PYTHON*, NCCL*, UCX*).
# Lines of an existing ./.deepspeed_env or ~/.deepspeed_env are kept.
#
# Notes:
# - DeepSpeed passes `--local_rank=N` right after the script; with `-m loom.launch.cli` that would land before
#   the `train` subcommand, so --no_local_rank is used: the ranks read LOCAL_RANK from the environment.
# - To stop a run with a checkpoint, send SIGTERM or SIGUSR1 to the rank processes: they checkpoint and exit
#   75 (passed through as this script's exit code; resume with `--resume auto`) and the launchers follow.
#   Signalling the multi-node runner itself (Ctrl-C/SIGINT or SIGTERM) makes it run
#   `pkill -f <launch command>` on every host, matching by command line: fine on dedicated nodes, not on a
#   machine shared with other jobs. The single-node runner has no handler (a signal stops only the runner).
set -euo pipefail

if [ $# -lt 1 ]; then sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; fi

REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"                               # `-m loom.launch.cli` is found from here, locally and on remote hosts
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=$(command -v python3); fi
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export PYTHONUNBUFFERED=1
MASTER_PORT=${MASTER_PORT:-29500}

runner=("$PYTHON" -u -m deepspeed.launcher.runner)
common=(--master_port "$MASTER_PORT" --no_local_rank --module)
[ -n "${NUM_NODES:-}" ] && common+=(--num_nodes "$NUM_NODES")
[ -n "${DS_SSH_PORT:-}" ] && common+=(--ssh_port "$DS_SSH_PORT")
# shellcheck disable=SC2206  # DS_EXTRA_ARGS is a list of words on purpose
extra=(${DS_EXTRA_ARGS:-})
train=(launch.cli train "$@")

gpu_count() {
  command -v nvidia-smi >/dev/null 2>&1 || { echo 0; return; }
  nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
}
hostfile_hosts() { sed -n 's/^[[:space:]]*\([^#[:space:]]\+\)[[:space:]]\+slots=[0-9]\+.*/\1/p' "$HOSTFILE"; }
is_local_host() {
  case "$1" in localhost|127.*|"$(hostname)"|"$(hostname -s)") return 0 ;; esac
  return 1
}

if [ -n "${NODE_RANK:-}" ]; then
  # Every node starts its own ranks; the world comes from the hostfile, this node's place from NODE_RANK
  : "${HOSTFILE:?NODE_RANK needs HOSTFILE}" "${MASTER_ADDR:?NODE_RANK needs MASTER_ADDR}"
  [ -n "${NUM_GPUS:-}" ] && common+=(--num_gpus "$NUM_GPUS")
  exec "${runner[@]}" --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" \
       "${common[@]}" "${extra[@]}" "${train[@]}"
fi

if [ -z "${HOSTFILE:-}" ]; then
  # One node. /dev/null is not a regular file, so the runner ignores its default /job/hostfile and uses
  # local devices; on CPU it needs --num_gpus, or it counts NUMA nodes (usually 1 process).
  if [ -n "${NUM_GPUS:-}" ]; then
    common+=(--num_gpus "$NUM_GPUS")
  elif [ "$(gpu_count)" = 0 ]; then
    common+=(--num_gpus 1)
  fi
  exec "${runner[@]}" --hostfile /dev/null "${common[@]}" "${extra[@]}" "${train[@]}"
fi

[ -f "$HOSTFILE" ] || { echo "run_deepspeed.sh: HOSTFILE $HOSTFILE not found" >&2; exit 2; }
HOSTFILE=$(realpath "$HOSTFILE")
mapfile -t hosts < <(hostfile_hosts)
[ "${#hosts[@]}" -gt 0 ] || { echo "run_deepspeed.sh: no 'host slots=N' lines in $HOSTFILE" >&2; exit 2; }
[ -n "${NUM_GPUS:-}" ] && common+=(--num_gpus "$NUM_GPUS")
if [ -n "${NUM_NODES:-}" ] && [ "$NUM_NODES" -lt "${#hosts[@]}" ]; then hosts=("${hosts[@]:0:$NUM_NODES}"); fi

if [ "${#hosts[@]}" = 1 ] && is_local_host "${hosts[0]}"; then
  # A one-host hostfile is a local launch, but the runner would still ssh to it first
  exec "${runner[@]}" --hostfile "$HOSTFILE" --no_ssh_check --master_addr "${MASTER_ADDR:-127.0.0.1}" \
       "${common[@]}" "${extra[@]}" "${train[@]}"
fi

# Several hosts: the runner starts deepspeed.launcher.launch on each through pdsh (ssh). The remote shells
# start with a bare environment, so the communication settings travel in a .deepspeed_env file.
ENV_FILE=$(mktemp "${TMPDIR:-/tmp}/loom-deepspeed-env.XXXXXX")
trap 'rm -f "$ENV_FILE"' EXIT
{
  for f in "$HOME/.deepspeed_env" ./.deepspeed_env; do [ -f "$f" ] && grep -E '^[A-Za-z_][A-Za-z0-9_]*=' "$f"; done
  for name in $(compgen -e); do
    case "$name" in
      GLOO_SOCKET_IFNAME|NCCL_*|TORCH_NCCL_*|TORCH_DISTRIBUTED_DEBUG|OMP_NUM_THREADS|CUDA_DEVICE_MAX_CONNECTIONS|LOOM_*|HF_*|TOKENIZERS_PARALLELISM)
        printf '%s=%s\n' "$name" "${!name}" ;;
    esac
  done
  for name in ${DS_FORWARD_VARS:-}; do [ -n "${!name+x}" ] && printf '%s=%s\n' "$name" "${!name}"; done
} > "$ENV_FILE" || true
export DS_ENV_FILE=$ENV_FILE            # an absolute name: the runner reads exactly this file
[ "${DS_NO_SSH_CHECK:-0}" = 1 ] && common+=(--no_ssh_check)
# Not exec'd, so that the env file is removed afterwards.
"${runner[@]}" --hostfile "$HOSTFILE" --launcher "${DS_LAUNCHER:-pdsh}" --master_addr "${MASTER_ADDR:-${hosts[0]}}" \
  "${common[@]}" "${extra[@]}" "${train[@]}"
