#!/usr/bin/env bash
# Start or stop a one-node Slurm cluster on localhost for the tests (needs root, slurm-wlm, munge).
#   tests/slurm/cluster.sh start DIR   -> writes DIR/slurm.conf, starts munged, slurmctld, slurmd
#   tests/slurm/cluster.sh stop DIR
set -euo pipefail
cmd=$1
dir=$(realpath -m "$2")
conf=$dir/slurm.conf
if [ "$cmd" = stop ]; then
  for pid in "$dir"/slurmd.pid "$dir"/slurmctld.pid; do
    [ -f "$pid" ] && kill "$(cat "$pid")" 2>/dev/null || true
  done
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "needs root" >&2; exit 3; }
for tool in slurmctld slurmd sbatch munged; do
  command -v "$tool" >/dev/null || { echo "$tool not installed (apt-get install slurm-wlm munge)" >&2; exit 3; }
done
mkdir -p "$dir/state" "$dir/spool" "$dir/log"
host=$(hostname -s)
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
cat > "$conf" <<CONF
ClusterName=testcluster
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=${SLURM_TEST_PORT:-6817}
SlurmdPort=$(( ${SLURM_TEST_PORT:-6817} + 1 ))
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
if ! pgrep -x munged >/dev/null; then
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  [ -f /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
  chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
  chmod 400 /etc/munge/munge.key
  if id munge >/dev/null 2>&1; then runuser -u munge -- munged; else munged --force; fi
fi
slurmctld -f "$conf"
slurmd -f "$conf"
for _ in $(seq 1 60); do
  state=$(SLURM_CONF=$conf sinfo -h -o %t 2>/dev/null || true)
  case "$state" in idle*|mix*|alloc*) echo "slurm up: $conf"; exit 0;; esac
  sleep 0.5
done
echo "slurm did not come up; see $dir/log" >&2
exit 4
