#!/usr/bin/env bash
# A one-node Slurm cluster on localhost (munge, slurmctld, slurmd from Debian's packages),
# for tests/test_slurm_real.py and trying scripts/slurm/train.sbatch. Idempotent; as root.
# Usage: scripts/slurm/local_cluster.sh [start|status|stop]   (see docs/slurm.md)
set -euo pipefail

# Everything the cluster writes lives here, nothing in /etc: clients find it through
# SLURM_CONF=$DIR/slurm.conf, which this script prints.
DIR=${RESNET_CIFAR_SLURM_DIR:-/var/tmp/resnet-cifar-slurm}
CONF=$DIR/slurm.conf
NODE=localhost
PACKAGES="munge slurmctld slurmd slurm-client"
export SLURM_CONF=$CONF

die() { echo "local_cluster.sh: error: $*" >&2; exit 1; }
say() { echo "local_cluster.sh: $*" >&2; }

usage() {
  echo "usage: $0 [start|status|stop]  (state in RESNET_CIFAR_SLURM_DIR=$DIR)" >&2
  exit 2
}

check_host() {
  [[ $(id -u) == 0 ]] || die "must run as root (slurmd starts jobs as their users)"
  local missing=()
  for program in munged slurmctld slurmd sbatch; do
    command -v "$program" >/dev/null || missing+=("$program")
  done
  if ((${#missing[@]})); then
    die "${missing[*]} not found: apt-get install $PACKAGES"
  fi
}

# The node's CPUs are the issue's test cluster (2); the machine may have more or fewer, so
# slurmd is told to trust this file (config_overrides) rather than drain the node.
write_config() {
  local cpus=${RESNET_CIFAR_SLURM_CPUS:-2} text
  [[ $cpus =~ ^[1-9][0-9]*$ ]] || die "RESNET_CIFAR_SLURM_CPUS=$cpus is not a CPU count"
  text=$(cat <<EOF
# Written by scripts/slurm/local_cluster.sh; rewritten (and the daemons restarted) when
# that script changes it. One node, localhost, everything as root under $DIR.
ClusterName=resnet-cifar-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire (minimum 5) is also how long a requeued job waits before it may start
# again: 120 s by default, 10 s here to keep the requeue tests short.
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in a container: processes are tracked by their parent chain.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
SlurmdParameters=config_overrides
ReturnToService=2
SchedulerType=sched/builtin
# A requeued job becomes eligible after cred_expire, but only the periodic pass of the
# scheduler (every 60 s by default) then starts it: every 2 s here.
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# SIGTERM to SIGKILL. A stopping trainer needs one more step and one collective save
# (measured 2-4 s with two tasks on two busy cores, docs/slurm.md); 20 s leaves room,
# and anything that ignores the signal is gone soon.
KillWait=20
# A finished job stays visible to squeue/scontrol for a minute: the tests read its state.
MinJobAge=60
# Preemption: a job of partition "high" requeues the jobs of "low" that hold its CPUs,
# after telling their tasks (SIGTERM) and waiting GraceTime.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
JobRequeue=1
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=1000 State=UNKNOWN
PartitionName=low Nodes=$NODE Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=20
PartitionName=high Nodes=$NODE MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
EOF
)
  if [[ -f $CONF && $(cat "$CONF") == "$text" ]]; then
    return 1
  fi
  printf '%s\n' "$text" >"$CONF.new"
  mv "$CONF.new" "$CONF"
  return 0
}

alive() {  # alive PIDFILE: the daemon of that pid file runs.
  [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

start_munge() {
  alive "$DIR/munge/munged.pid" && return
  if [[ ! -s $DIR/munge/munge.key ]]; then
    # A key of our own: the package's /etc/munge/munge.key belongs to the machine.
    head -c 1024 /dev/urandom >"$DIR/munge/munge.key"
  fi
  chmod 0400 "$DIR/munge/munge.key"
  munged --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
    --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" \
    --seed-file="$DIR/munge/munged.seed" --force
  for _ in $(seq 50); do
    munge -n -S "$DIR/munge/munge.socket" 2>/dev/null | unmunge -S "$DIR/munge/munge.socket" \
      >/dev/null 2>&1 && return
    sleep 0.1
  done
  die "munged did not start; see $DIR/log/munged.log"
}

stop_daemon() {  # stop_daemon PIDFILE
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 0
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  die "process $pid ($1) did not stop within 10 s"
}

stop_slurm() {
  stop_daemon "$DIR/run/slurmd.pid"
  stop_daemon "$DIR/run/slurmctld.pid"
}

node_state() {
  sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1
}

is_up() {
  scontrol ping 2>/dev/null | grep -q 'is UP' && [[ $(node_state) =~ ^(idle|mixed|allocated|completing) ]]
}

start() {
  check_host
  mkdir -p "$DIR"/{munge,state,spool,run,log}
  chmod 0700 "$DIR/munge"
  local changed=0
  write_config && changed=1
  if ((changed)) && alive "$DIR/run/slurmctld.pid"; then
    say "slurm.conf changed: restarting the daemons"
    stop_slurm
  fi
  if ((!changed)) && is_up; then
    say "already up: node $NODE $(node_state), $(sinfo -h -o '%P(%a)' | paste -sd' ')"
    echo "export SLURM_CONF=$CONF"
    return
  fi
  start_munge
  alive "$DIR/run/slurmctld.pid" || slurmctld
  alive "$DIR/run/slurmd.pid" || slurmd -N "$NODE"
  for _ in $(seq 150); do
    is_up && break
    # A node that was down (e.g. a daemon killed) comes back once it registers.
    if [[ $(node_state) =~ ^(down|drain|drained|draining) ]]; then
      scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true
    fi
    sleep 0.2
  done
  is_up || die "the cluster did not come up within 30 s (node: $(node_state)); see $DIR/log/"
  say "up: node $NODE $(node_state), $(sinfo -h -o '%P(%a)' | paste -sd' ')"
  echo "export SLURM_CONF=$CONF"
}

case ${1:-start} in
  start) start ;;
  status) check_host; is_up || die "not up (node: $(node_state)); run: $0 start"
          say "up: node $NODE $(node_state)"; echo "export SLURM_CONF=$CONF" ;;
  stop) check_host; stop_slurm; stop_daemon "$DIR/munge/munged.pid"; say "stopped (state kept in $DIR)" ;;
  *) usage ;;
esac
