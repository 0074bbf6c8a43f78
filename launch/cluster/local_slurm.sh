#!/usr/bin/env bash
# A real Slurm cluster on this one machine, for launch tests: Debian's slurmctld + slurmd + munge, two
# (or more) slurmd "nodes". Everything except the Debian packages lives under one state folder.
#
#   local_slurm.sh [--dir DIR] up            install missing packages, (re)start munged, slurmctld and the
#                                            slurmd nodes; returns when every node is idle
#   local_slurm.sh [--dir DIR] down          cancel remaining jobs, stop the daemons this script started
#                                            (by the PIDs in DIR/state/run, never by name)
#   local_slurm.sh [--dir DIR] status        daemons, sinfo, squeue
#   local_slurm.sh [--dir DIR] wait JOBID [TIMEOUT_S]
#                                            poll scontrol every 0.5 s until the job ends (follows requeues);
#                                            exit 0 if COMPLETED, 1 if it ended otherwise, 124 on timeout
#   local_slurm.sh [--dir DIR] run CMD...    run a Slurm client command (sbatch, squeue, ...) against it
#   local_slurm.sh [--dir DIR] env           print `export SLURM_CONF=...` (eval it to use plain sbatch etc.)
#
# Environment:
#   LOOM_SLURM_DIR          state folder (default ./slurm-local); --dir DIR wins
#   LOOM_SLURM_NODES        number of slurmd nodes, named node1..nodeN (default 2)
#   LOOM_SLURM_CPUS         CPUs each node advertises (default: nproc; the nodes share the real CPUs)
#   LOOM_SLURM_NETNS=1      each slurmd on its own network-namespace host (launch/cluster/netns_hosts.sh,
#                           node_i = 10.99.0.i); client commands then have to go through `run`
#   LOOM_SLURM_PORT         slurmctld port (default: the first free one from 16817 in steps of 20); the
#                           slurmd ports follow it (multiple-slurmd mode)
#   LOOM_SLURM_CRED_EXPIRE  munge credential lifetime in s (default 10). A requeued job cannot restart
#                           before it has passed, so short = fast requeue tests (Slurm's default is 120).
#
# Modes. Default: several slurmd processes on this host (Debian builds Slurm with MULTIPLE_SLURMD), each
# `NodeName=nodeI NodeHostname=<this host> NodeAddr=127.0.0.1 Port=...`. Jobs see SLURM_JOB_NODELIST=node[1-2]
# and SLURMD_NODENAME=node1/node2; node names do not resolve, NodeAddr (scontrol show node) does.
# With LOOM_SLURM_NETNS=1 the nodes have their own addresses and hostnames instead.
#
# Needs root, Debian/Ubuntu (apt) or the packages already installed; no systemd, no cgroups, no accounting.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

BASE=${LOOM_SLURM_DIR:-slurm-local}
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) BASE=$2; shift 2 ;;
    --dir=*) BASE=${1#--dir=}; shift ;;
    *) break ;;
  esac
done
BASE=$(realpath -m "$BASE")            # Slurm and munge need absolute paths in slurm.conf
NODES=${LOOM_SLURM_NODES:-2}
# (nproc would honour OMP_NUM_THREADS, which test environments set to 1)
CPUS=${LOOM_SLURM_CPUS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}
NETNS=${LOOM_SLURM_NETNS:-0}
CRED_EXPIRE=${LOOM_SLURM_CRED_EXPIRE:-10}
HERE=$(cd "$(dirname "$0")" && pwd)
NETNS_SH=$HERE/netns_hosts.sh
ST=$BASE/state
# munged wants every folder above its socket searchable by all users; pytest's and mktemp's folders are
# 0700, so then the socket goes to a folder of its own under /tmp (named after the state folder)
munge_run_dir() {
  local p perms
  p=$(dirname "$BASE")
  while [ "$p" != / ]; do
    if [ -e "$p" ]; then
      perms=$(stat -c %A "$p")
      case "${perms:9:1}" in x|t) ;; *) echo "/tmp/loom-munge-$(printf '%s' "$BASE" | cksum | cut -d' ' -f1)"; return ;; esac
    fi
    p=$(dirname "$p")
  done
  echo "$ST/munge/run"
}
MUNGE_RUN=$(munge_run_dir)
MUNGE_SOCK=$MUNGE_RUN/munge.socket
export SLURM_CONF=$BASE/etc/slurm.conf
# the simulated hosts of NETNS mode live next to the cluster state, with names unique to this folder
export LOOM_NETNS_DIR=$BASE/netns
export LOOM_NETNS_PREFIX=${LOOM_NETNS_PREFIX:-ls$(printf '%s' "$BASE" | cksum | cut -c1-6)}
export LOOM_NETNS_NODES=$NODES

log() { printf '[slurm %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
node_names() { seq -f 'node%g' 1 "$NODES"; }
# Slurm client commands must run where the controller is reachable (inside node1 in NETNS mode)
client() {
  if [ "$NETNS" = 1 ]; then "$NETNS_SH" exec 1 env SLURM_CONF="$SLURM_CONF" "$@"; else "$@"; fi
}

install_packages() {
  local missing=0 bin
  for bin in slurmctld slurmd sbatch scontrol munged mungekey; do command -v "$bin" >/dev/null || missing=1; done
  [ $missing = 1 ] || return 0
  command -v apt-get >/dev/null || { echo "local_slurm.sh: Slurm is not installed and apt-get is unavailable" >&2; exit 77; }
  log "installing slurmctld slurmd slurm-client munge (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # without systemd the postinst scripts cannot start the services; that is fine, we start them ourselves
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

port_busy() { ss -Htln "sport = :$1" 2>/dev/null | grep -q .; }
pick_port() {
  if [ -n "${LOOM_SLURM_PORT:-}" ]; then echo "$LOOM_SLURM_PORT"; return; fi
  [ "$NETNS" = 1 ] && { echo 6817; return; }    # a fresh network namespace has every port free
  local base p free
  for base in $(seq 16817 20 17997); do
    free=1
    for p in $(seq "$base" $((base + NODES))); do port_busy "$p" && { free=0; break; }; done
    [ $free = 1 ] && { echo "$base"; return; }
  done
  echo "local_slurm.sh: no free port range found; set LOOM_SLURM_PORT" >&2; exit 1
}

write_conf() {
  local port=$1 ctld_host ctld_addr mem i
  if [ "$NETNS" = 1 ]; then ctld_host=node1; ctld_addr=10.99.0.1; else ctld_host=$(hostname -s); ctld_addr=127.0.0.1; fi
  mem=$(awk '/^MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
  mkdir -p "$BASE/etc"
  cat > "$SLURM_CONF.tmp" <<EOF
# generated by launch/cluster/local_slurm.sh (nodes=$NODES netns=$NETNS)
ClusterName=loomlocal
SlurmctldHost=$ctld_host($ctld_addr)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
AuthType=auth/munge
CredType=cred/munge
# our own munged socket; cred_expire also bounds how soon a requeued job may start again
AuthInfo=socket=$MUNGE_SOCK,cred_expire=$CRED_EXPIRE
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$ST/ctld
SlurmdSpoolDir=$ST/spool/%n
SlurmctldPidFile=$ST/run/slurmctld.pid
SlurmdPidFile=$ST/run/slurmd-%n.pid
SlurmctldLogFile=$ST/log/slurmctld.log
SlurmdLogFile=$ST/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$BASE/etc/plugstack.conf
# slurmctld refuses to start with the default MailProg missing
MailProg=/bin/true
# no cgroups needed: linuxproc tracks a step's processes by parentage
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
# look at pending jobs every second (defaults: 60 s main loop, 30 s backfill): a requeued job becomes
# eligible when its credential has expired and only a scheduling pass starts it
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# use the CPUs/memory written below even if they differ from what slurmd detects
SlurmdParameters=config_overrides
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
# keep finished jobs visible to scontrol for 5 min (the wait command reads their final state)
MinJobAge=300
Waittime=0
JobRequeue=1
# clusters running side by side on one machine hand out different job ids, so the rendezvous ports the job
# scripts derive from the job id differ too
FirstJobId=$(( ((port - 16817) / 20 % 50) * 1000 + 1 ))
EOF
  for i in $(seq 1 "$NODES"); do
    if [ "$NETNS" = 1 ]; then
      echo "NodeName=node$i NodeAddr=10.99.0.$i CPUs=$CPUS RealMemory=$mem State=UNKNOWN" >> "$SLURM_CONF.tmp"
    else
      echo "NodeName=node$i NodeHostname=$(hostname -s) NodeAddr=127.0.0.1 Port=$((port + i)) CPUs=$CPUS RealMemory=$mem State=UNKNOWN" >> "$SLURM_CONF.tmp"
    fi
  done
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO" >> "$SLURM_CONF.tmp"
  : > "$BASE/etc/plugstack.conf"
  mv "$SLURM_CONF.tmp" "$SLURM_CONF"
}

start_munge() {
  mkdir -p "$ST/munge/etc" "$ST/munge/run" "$ST/munge/log" "$MUNGE_RUN"
  # munged insists: key folder private, socket folder (and its parents) searchable by everyone
  chmod 700 "$ST/munge/etc"; chmod 755 "$BASE" "$ST" "$ST/munge" "$ST/munge/run" "$MUNGE_RUN"
  [ -s "$ST/munge/etc/munge.key" ] || mungekey --create --keyfile="$ST/munge/etc/munge.key"
  alive "$ST/munge/run/munged.pid" && return 0
  rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock"
  munged --key-file="$ST/munge/etc/munge.key" --socket="$MUNGE_SOCK" \
         --pid-file="$ST/munge/run/munged.pid" --log-file="$ST/munge/log/munged.log" \
         --seed-file="$ST/munge/etc/munged.seed"
  munge -S "$MUNGE_SOCK" -n | unmunge -S "$MUNGE_SOCK" >/dev/null
}

slurm_pidfiles() { ls "$ST"/run/slurmctld.pid "$ST"/run/slurmd-*.pid 2>/dev/null || true; }
# PIDs of the Slurm daemons we started, read before stopping them: a daemon removes its pid file while it
# is still shutting down, so the waiting is done on the PIDs themselves
slurm_pids() { local f; for f in $(slurm_pidfiles); do alive "$f" && cat "$f"; done; return 0; }
pids_alive() { local p; for p in "$@"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }

cancel_jobs() {
  alive "$ST/run/slurmctld.pid" || return 0
  local jobs
  jobs=$(client squeue -h -o %i 2>/dev/null || true)
  [ -n "$jobs" ] || return 0
  log "cancelling jobs: ${jobs//$'\n'/ }"
  # shellcheck disable=SC2086  # a list of job ids
  client scancel $jobs 2>/dev/null || true
  for _ in $(seq 1 60); do                      # KillWait=10: the steps get TERM, then KILL
    [ -z "$(client squeue -h -o %i 2>/dev/null || true)" ] && return 0
    sleep 0.5
  done
  log "jobs still listed after 30 s: $(client squeue -h 2>/dev/null | tr '\n' ';')"
}

stop_slurm_daemons() {
  local pids p
  mapfile -t pids < <(slurm_pids)
  [ "${#pids[@]}" -gt 0 ] || return 0
  cancel_jobs
  alive "$ST/run/slurmctld.pid" && { client scontrol shutdown >/dev/null 2>&1 || true; }
  for _ in $(seq 1 50); do pids_alive "${pids[@]}" || return 0; sleep 0.2; done
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done   # fallback: TERM, then KILL
  for _ in $(seq 1 30); do pids_alive "${pids[@]}" || return 0; sleep 0.1; done
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  return 0
}

stop_munge() {
  local f=$ST/munge/run/munged.pid pid
  alive "$f" || return 0
  pid=$(cat "$f")
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}

down() {
  [ -d "$ST" ] || { log "nothing under $BASE"; return 0; }
  stop_slurm_daemons
  stop_munge
  rm -f "$ST"/run/*.pid
  if [ "$MUNGE_RUN" != "$ST/munge/run" ]; then rm -rf "$MUNGE_RUN"; fi
  if [ "$NETNS" = 1 ] || [ -d "$BASE/netns" ]; then "$NETNS_SH" down 2>/dev/null || true; fi
  log "down ($BASE)"
}

up() {
  [ "$(id -u)" = 0 ] || { echo "local_slurm.sh: needs root (daemons run as SlurmUser=root)" >&2; exit 77; }
  install_packages
  stop_slurm_daemons                            # idempotent: restart from a clean slate
  rm -rf "$ST/ctld" "$ST/spool" "$ST/run"
  mkdir -p "$ST/ctld" "$ST/run" "$ST/log"
  local n; for n in $(node_names); do mkdir -p "$ST/spool/$n"; done   # slurmd does not create its spool dir
  local port; port=$(pick_port)
  write_conf "$port"
  start_munge
  if [ "$NETNS" = 1 ]; then
    [ "$NODES" -ge 2 ] || { echo "LOOM_SLURM_NETNS=1 needs LOOM_SLURM_NODES>=2" >&2; exit 2; }
    "$NETNS_SH" up
    # slurmd under nsenter --net (not `ip netns exec`: that remounts /sys and slurmd then finds no cgroup fs)
    "$NETNS_SH" exec 1 slurmctld -f "$SLURM_CONF"
    for n in $(seq 1 "$NODES"); do "$NETNS_SH" exec "$n" slurmd -f "$SLURM_CONF" -N "node$n"; done
  else
    slurmctld -f "$SLURM_CONF"
    for n in $(node_names); do slurmd -f "$SLURM_CONF" -N "$n"; done
  fi
  local idle=0
  for _ in $(seq 1 120); do
    idle=$(client sinfo -h -N -o '%t' 2>/dev/null | grep -c '^idle' || true)
    [ "$idle" = "$NODES" ] && break
    sleep 0.5
  done
  if [ "$idle" != "$NODES" ]; then
    log "only $idle of $NODES nodes became idle; logs under $ST/log"
    tail -n 20 "$ST"/log/*.log >&2 || true
    exit 1
  fi
  log "up: $NODES nodes (netns=$NETNS), slurmctld port $port; export SLURM_CONF=$SLURM_CONF"
}

status() {
  local f
  for f in "$ST"/run/*.pid "$ST"/munge/run/munged.pid; do
    [ -e "$f" ] || continue
    if alive "$f"; then echo "$(basename "$f" .pid): running (pid $(cat "$f"))"; else echo "$(basename "$f" .pid): stopped"; fi
  done
  if alive "$ST/run/slurmctld.pid"; then client sinfo -N; client squeue; else echo "slurmctld not running ($BASE)"; fi
}

wait_job() {
  local id=${1:?usage: local_slurm.sh wait JOBID [TIMEOUT_S]} timeout=${2:-0} start line state
  start=$(date +%s)
  # sbatch --wait polls at 2, 8, then 32 s; this returns within 0.5 s of the end
  while true; do
    line=$(client scontrol show job -o "$id" 2>/dev/null || true)
    state=$(sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p' <<<"$line")
    case "$state" in
      COMPLETED) log "job $id COMPLETED $(grep -o 'Restarts=[0-9]*' <<<"$line")"; return 0 ;;
      FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|PREEMPTED|BOOT_FAIL|DEADLINE|SPECIAL_EXIT)
        log "job $id $state $(grep -o -E '(ExitCode|Reason)=[^ ]*' <<<"$line" | tr '\n' ' ')"; return 1 ;;
      "") log "job $id unknown to slurmctld"; return 1 ;;
    esac
    if [ "$timeout" != 0 ] && [ $(( $(date +%s) - start )) -ge "$timeout" ]; then
      log "job $id still $state after ${timeout} s"; return 124
    fi
    sleep 0.5
  done
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  wait) shift; wait_job "$@" ;;
  run) shift; [ $# -gt 0 ] || { usage >&2; exit 2; }; client "$@" ;;
  env) echo "export SLURM_CONF=$SLURM_CONF" ;;
  -h|--help|help) usage ;;
  *) usage >&2; exit 2 ;;
esac
