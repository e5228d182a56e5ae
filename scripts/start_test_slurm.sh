#!/usr/bin/env bash
# A single-node Slurm cluster on localhost, for the tests marked `slurm` (run as root; idempotent).
#
#   bash scripts/start_test_slurm.sh          # start munged, slurmctld and slurmd; wait until the node is idle
#   bash scripts/start_test_slurm.sh --stop   # stop them (the slurm tests then skip)
#
# Needs Debian's `slurm-wlm` and `munge`. No cgroups (containers often lack them): proctrack/linuxproc,
# task/none. No accounting database, so `sacct` is unavailable here, as on some real clusters.
set -euo pipefail

CONF_DIR=/etc/slurm
STATE=/var/spool/slurm-test
NODE=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)

running() { [ -f "$STATE/$1.pid" ] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }
stop() {
    for daemon in slurmd slurmctld; do
        if running $daemon; then
            pid=$(cat "$STATE/$daemon.pid")
            kill "$pid"
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
        rm -f "$STATE/$daemon.pid"
    done
}

if [ "${1:-}" = "--stop" ]; then stop; echo "test Slurm stopped"; exit 0; fi
[ "$(id -u)" = 0 ] || { echo "start_test_slurm.sh: run as root" >&2; exit 1; }
command -v slurmctld >/dev/null && command -v munged >/dev/null \
    || { echo "start_test_slurm.sh: install slurm-wlm and munge first" >&2; exit 1; }

node_idle() { sinfo -h -N -n "$NODE" -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; }
if running slurmctld && running slurmd && node_idle; then echo "test Slurm already up: $(sinfo -h -N -o '%N %t %c CPUs')"; exit 0; fi

# munge: a key readable by the munge user only, then the daemon.
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
[ -s /etc/munge/munge.key ] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi

mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/d" "$STATE/log"
cat >"$CONF_DIR/slurm.conf.new" <<EOF
# Written by scripts/start_test_slurm.sh: one node on localhost for the unipers slurm tests.
ClusterName=unipers-test
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
MinJobAge=300
KillWait=10
InactiveLimit=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
if ! cmp -s "$CONF_DIR/slurm.conf.new" "$CONF_DIR/slurm.conf"; then
    stop  # a changed config needs fresh daemons
    mv "$CONF_DIR/slurm.conf.new" "$CONF_DIR/slurm.conf"
else
    rm "$CONF_DIR/slurm.conf.new"
fi

fail() { echo "start_test_slurm.sh: $1 failed to start; log:" >&2; tail -n 5 "$STATE/log/$1.log" >&2; exit 1; }
running slurmctld || slurmctld -c || fail slurmctld
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done
running slurmd || slurmd || fail slurmd

for _ in $(seq 300); do
    node_idle && { echo "test Slurm up: $(sinfo -h -N -o '%N %t %c CPUs')"; exit 0; }
    # A node left DOWN by an earlier stop comes back on its own (ReturnToService=2); nudge it anyway.
    scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
    sleep 0.2
done
echo "start_test_slurm.sh: node $NODE never became idle; see $STATE/log/" >&2
sinfo -N -l >&2 || true
exit 1
