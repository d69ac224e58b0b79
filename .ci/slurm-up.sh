#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (munged + slurmctld + slurmd as root, no systemd, no
# cgroups, no accounting), so that tests/test_grid.py can submit the grid's units through
# submitit's SlurmExecutor. Idempotent: returns at once when the node is up with this
# configuration. Best effort: CI calls it with `|| true`, and the SLURM test skips, saying why,
# when no node answers. Debian (apt) only; run as root.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
  echo "slurm-up: needs root (installs packages and starts daemons)" >&2; exit 1
fi
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
fi

node_up() { timeout 5 sinfo -h -o %T 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'; }

host=$(hostname -s)
conf="# written by .ci/slurm-up.sh: one node, this machine
ClusterName=psma-ci
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$host CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP"

if [ -f /etc/slurm/slurm.conf ] && [ "$(cat /etc/slurm/slurm.conf)" = "$conf" ] && node_up; then
  exit 0  # already up with this configuration
fi
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
printf '%s\n' "$conf" > /etc/slurm/slurm.conf
for daemon in slurmd slurmctld; do  # ours, from an earlier call: restart with this configuration
  pid=$(cat "/run/$daemon.pid" 2>/dev/null || true)
  if [ -n "$pid" ] && kill "$pid" 2>/dev/null; then
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
done

chown munge:munge /run/munge
[ -s /etc/munge/munge.key ] || mungekey --create --force
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
/usr/sbin/slurmctld
/usr/sbin/slurmd

for _ in $(seq 1 60); do
  if node_up; then exit 0; fi
  sleep 0.5
done
echo "slurm-up: the node did not come up; sinfo says: $(sinfo -h -N -o '%N %T %E' 2>&1)" >&2
tail -n 5 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 1
