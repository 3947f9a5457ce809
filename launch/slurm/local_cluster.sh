#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for tests (Debian's slurm-wlm + munge, as root).
#
#   launch/slurm/local_cluster.sh start STATE_DIR   # install if needed, start munged/slurmctld/slurmd
#   launch/slurm/local_cluster.sh stop STATE_DIR    # stop exactly the daemons that start started
#
# Exit code 3: cannot run here (not root, or no apt-get to install SLURM).
set -euo pipefail
action=${1:?start or stop}
state=${2:?state directory}
node=$(hostname -s)

start() {
  [ "$(id -u)" = 0 ] || { echo "local SLURM needs root" >&2; exit 3; }
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || { echo "no apt-get to install slurm-wlm and munge" >&2; exit 3; }
    (apt-get install -y --no-install-recommends slurm-wlm munge >/dev/null 2>&1 ||
      { apt-get update >/dev/null 2>&1 && apt-get install -y --no-install-recommends slurm-wlm munge >/dev/null; })
  fi
  mkdir -p "$state"
  getent hosts "$node" >/dev/null || echo "127.0.0.1 $node" >> /etc/hosts
  install -d -o munge -g munge /run/munge /etc/munge
  [ -f /etc/munge/munge.key ] || { mungekey --create >/dev/null 2>&1 || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null; }
  chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
  install -d -o slurm -g slurm /run/slurm /var/spool/slurmctld /var/log/slurm
  install -d /var/spool/slurmd /etc/slurm
  # nproc honours OMP_NUM_THREADS: a test run with OMP_NUM_THREADS=1 got a 1-CPU node, and the
  # 2-task job then waited forever
  cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
  cat > /etc/slurm/slurm.conf <<CONF
ClusterName=localci
SlurmctldHost=$node
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=120
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
KillWait=30
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
  runuser -u munge -- /usr/sbin/munged
  pgrep -u munge -n munged > "$state/munged.pid"
  slurmctld
  slurmd
  for _ in $(seq 100); do
    [ -f /run/slurm/slurmctld.pid ] && [ -f /run/slurm/slurmd.pid ] && [ "$(sinfo -h -o %T 2>/dev/null | head -n1)" = idle ] && break
    sleep 0.2
  done
  cp /run/slurm/slurmctld.pid "$state/slurmctld.pid"
  cp /run/slurm/slurmd.pid "$state/slurmd.pid"
  [ "$(sinfo -h -o %T | head -n1)" = idle ] || { echo "SLURM node did not become idle; see /var/log/slurm" >&2; exit 1; }
}

stop() {
  for daemon in slurmd slurmctld munged; do
    if [ -f "$state/$daemon.pid" ]; then
      kill "$(cat "$state/$daemon.pid")" 2>/dev/null || true
      rm -f "$state/$daemon.pid"
    fi
  done
}

case "$action" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop STATE_DIR" >&2; exit 2 ;;
esac
