#!/usr/bin/env bash
# Simulated "hosts" on one Linux machine for multi-node launch tests: each host is a network namespace
# with its own eth0 on a private subnet, its own hostname and its own /etc/hosts.
#
#   netns_hosts.sh up              create <prefix>_sw (the switch) and <prefix>_n1..N (10.99.0.1..N/24)
#   netns_hosts.sh down            stop every process inside those namespaces (by PID) and delete them
#   netns_hosts.sh status          namespaces, addresses, processes
#   netns_hosts.sh exec I CMD...   run CMD on host I (hostname nodeI); execs, so a backgrounded call's $! is CMD
#   netns_hosts.sh ssh-up          an sshd per host (throw-away keys under the state dir) + pdsh, for the
#                                  DeepSpeed multi-node launcher (pdsh -> ssh)
#   netns_hosts.sh ssh-down        stop those sshd processes
#
# Environment:
#   LOOM_NETNS_DIR     state folder (hosts file, ssh keys, logs); default ./netns-local. Also --dir DIR.
#   LOOM_NETNS_PREFIX  namespace name prefix (default loom); use a unique one per concurrent user
#   LOOM_NETNS_NODES   number of hosts (default 2)
#   LOOM_NETNS_SUBNET  first three octets (default 10.99.0)
#
# Isolation: the bridge lives in its own namespace, nothing is attached to the root namespace and there is
# no default route, so no packet from a simulated host can leave the simulated LAN (only the 10.99.0.x
# addresses and each host's loopback are reachable). Needs root (CAP_SYS_ADMIN + CAP_NET_ADMIN), iproute2,
# util-linux (nsenter, unshare) and a kernel with CONFIG_NET_NS, CONFIG_VETH, CONFIG_BRIDGE.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

DIR=${LOOM_NETNS_DIR:-netns-local}
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) DIR=$2; shift 2 ;;
    --dir=*) DIR=${1#--dir=}; shift ;;
    *) break ;;
  esac
done
DIR=$(realpath -m "$DIR")          # absolute: bind mounts and the sshd config refer to it from other cwds
PREFIX=${LOOM_NETNS_PREFIX:-loom}
NODES=${LOOM_NETNS_NODES:-2}
SUBNET=${LOOM_NETNS_SUBNET:-10.99.0}
SW=${PREFIX}_sw
SELF=$(realpath "$0")

log() { printf '[netns %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
ns_of() { echo "${PREFIX}_n$1"; }
ns_exists() { [ -e "/run/netns/$1" ]; }
ns_pids() { ip netns pids "$1" 2>/dev/null || true; }
our_namespaces() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${PREFIX}_(sw|n[0-9]+)$" || true; }

require_root() {
  [ "$(id -u)" = 0 ] || { echo "netns_hosts.sh: needs root (network namespaces, bind mounts)" >&2; exit 77; }
  local tool; for tool in ip nsenter unshare; do
    command -v "$tool" >/dev/null || { echo "netns_hosts.sh: $tool not found (apt-get install iproute2 util-linux)" >&2; exit 77; }
  done
}

# Stop what runs in a namespace: TERM, up to 3 s of grace, then KILL. Processes are found by their
# network namespace (`ip netns pids`), so only what was started inside our namespaces is touched.
stop_ns_processes() {
  local ns=$1 pids
  pids=$(ns_pids "$ns"); [ -n "$pids" ] || return 0
  log "stopping processes in $ns: ${pids//$'\n'/ }"
  # shellcheck disable=SC2086  # a list of PIDs
  kill -TERM $pids 2>/dev/null || true
  for _ in $(seq 1 30); do pids=$(ns_pids "$ns"); [ -n "$pids" ] || return 0; sleep 0.1; done
  # shellcheck disable=SC2086
  kill -KILL $pids 2>/dev/null || true
  for _ in $(seq 1 20); do [ -n "$(ns_pids "$ns")" ] || return 0; sleep 0.1; done
}

down() {
  require_root
  local ns
  for ns in $(our_namespaces); do
    stop_ns_processes "$ns"
    ip netns del "$ns"            # deleting the namespaces also destroys the veth pairs and the bridge
  done
}

up() {
  require_root
  down                             # idempotent: start from a clean slate
  mkdir -p "$DIR/etc" "$DIR/logs"
  {
    echo "127.0.0.1 localhost"
    local i; for i in $(seq 1 "$NODES"); do echo "$SUBNET.$i node$i"; done
  } > "$DIR/etc/hosts"
  # own hostname files: nothing inside the namespaces must resolve to the machine's real name
  ip netns add "$SW"
  ip -n "$SW" link set lo up
  ip -n "$SW" link add br0 type bridge
  ip -n "$SW" link set br0 up
  local i ns
  for i in $(seq 1 "$NODES"); do
    ns=$(ns_of "$i")
    ip netns add "$ns"
    # both ends are created directly inside the namespaces: no interface ever appears in the root namespace
    ip link add eth0 netns "$ns" type veth peer name "sw-n$i" netns "$SW"
    ip -n "$SW" link set "sw-n$i" master br0
    ip -n "$SW" link set "sw-n$i" up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "$SUBNET.$i/24" dev eth0
    ip -n "$ns" link set eth0 up
  done
  log "up: $NODES hosts node1..node$NODES = $SUBNET.1..$NODES (namespaces ${PREFIX}_*)"
}

status() {
  local i ns
  for i in $(seq 1 "$NODES"); do
    ns=$(ns_of "$i")
    if ns_exists "$ns"; then
      echo "node$i: $(ip -n "$ns" -br addr show eth0 2>/dev/null | awk '{print $3}')  pids: $(ns_pids "$ns" | tr '\n' ' ')"
    else
      echo "node$i: down"
    fi
  done
}

# Run a command "on host i". nsenter --net (not `ip netns exec`, which remounts /sys and hides the cgroup
# mounts that slurmd needs) + a private mount and UTS namespace: the hostname becomes nodeI and the hosts
# file maps nodeX -> 10.99.0.X. torchrun's c10d rendezvous needs this: with the machine's shared hostname
# (resolving to 127.0.0.1) node1 would not recognise node1's address as its own and never host the store.
nsexec() {
  require_root
  local i=$1; shift
  [ $# -gt 0 ] || { echo "usage: netns_hosts.sh exec I CMD..." >&2; exit 2; }
  local ns; ns=$(ns_of "$i")
  ns_exists "$ns" || { echo "netns_hosts.sh: host $i is not up ($ns missing); run 'up' first" >&2; exit 1; }
  # shellcheck disable=SC2016  # expanded by the inner sh
  exec nsenter --net="/run/netns/$ns" -- unshare --mount --uts -- sh -c '
    hostname "$0"
    mount --bind "$1/etc/hosts" /etc/hosts
    # ssh client settings only inside the simulated hosts (DeepSpeed calls plain `ssh host ...`)
    if [ -f "$1/ssh/ssh_config" ] && [ -f /etc/ssh/ssh_config ]; then mount --bind "$1/ssh/ssh_config" /etc/ssh/ssh_config; fi
    shift; exec "$@"' "node$i" "$DIR" "$@"
}

ensure_ssh_packages() {
  if [ -x /usr/sbin/sshd ] && command -v pdsh >/dev/null && command -v ssh >/dev/null; then return 0; fi
  log "installing openssh-server pdsh"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends openssh-server openssh-client pdsh >/dev/null
}

ssh_files() {
  mkdir -p "$DIR/ssh" "$DIR/logs"; chmod 700 "$DIR/ssh"
  [ -f "$DIR/ssh/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -f "$DIR/ssh/id_ed25519" -C loom-netns
  [ -f "$DIR/ssh/host_ed25519_key" ] || ssh-keygen -q -t ed25519 -N '' -f "$DIR/ssh/host_ed25519_key" -C loom-netns-host
  cp "$DIR/ssh/id_ed25519.pub" "$DIR/ssh/authorized_keys"; chmod 600 "$DIR/ssh/authorized_keys"
  # key-only root login with throw-away keys; AcceptEnv so launchers may pass variables
  cat > "$DIR/ssh/sshd_config" <<EOF
Port 22
HostKey $DIR/ssh/host_ed25519_key
PidFile none
AuthorizedKeysFile $DIR/ssh/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
AcceptEnv *
EOF
  cat > "$DIR/ssh/ssh_config" <<EOF
Host *
  IdentityFile $DIR/ssh/id_ed25519
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
  BatchMode yes
  ConnectTimeout 5
EOF
}

ssh_up() {
  require_root
  ensure_ssh_packages
  ssh_files
  local i
  for i in $(seq 1 "$NODES"); do
    if "$SELF" --dir "$DIR" exec "$i" ssh -o ConnectTimeout=2 "node$i" true 2>/dev/null; then continue; fi
    # sshd needs /run/sshd: a private tmpfs on /run inside this host's mount namespace only.
    # shellcheck disable=SC2016  # expanded by the inner sh
    # -D keeps sshd in the foreground of this (backgrounded) process so the PID is the daemon's.
    "$SELF" --dir "$DIR" exec "$i" sh -c 'mount -t tmpfs -o mode=755 tmpfs /run && mkdir -m 755 /run/sshd &&
      exec /usr/sbin/sshd -D -f "$0/ssh/sshd_config" -o ListenAddress="$1" -E "$0/logs/sshd-node$2.log"' \
      "$DIR" "$SUBNET.$i" "$i" </dev/null >/dev/null 2>&1 &
  done
  for i in $(seq 1 "$NODES"); do
    local ok=0
    for _ in $(seq 1 50); do
      if "$SELF" --dir "$DIR" exec 1 ssh "node$i" true 2>/dev/null; then ok=1; break; fi
      sleep 0.2
    done
    [ $ok = 1 ] || { log "ssh to node$i failed; see $DIR/logs/sshd-node$i.log"; exit 1; }
  done
  log "sshd up on node1..node$NODES (pdsh -w node1,node2 ... works from inside the hosts)"
}

ssh_down() {
  require_root
  local i ns pid
  for i in $(seq 1 "$NODES"); do
    ns=$(ns_of "$i")
    for pid in $(ns_pids "$ns"); do
      # only the sshd listeners we started (their command line names our config file)
      if tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$DIR/ssh/sshd_config"; then kill -TERM "$pid" 2>/dev/null || true; fi
    done
  done
}

case "${1:-}" in
  up) up ;;
  down) down; log "down: namespaces ${PREFIX}_* removed" ;;
  status) status ;;
  exec) shift; nsexec "$@" ;;
  ssh-up) ssh_up ;;
  ssh-down) ssh_down ;;
  -h|--help|help) usage ;;
  *) usage >&2; exit 2 ;;
esac
