#!/usr/bin/env bash
# Start a single-node Slurm with accounting (slurmdbd + a private MariaDB) on this machine,
# from Debian's packages, without systemd.  Used by the tests' Slurm fixture and .ci/run.
#
#   sudo bash scripts/start_slurm.sh      # idempotent: a working cluster here -> exit 0
#   sudo bash scripts/stop_slurm.sh       # stops what this script started (by pid file)
#
# A cluster that already answers (scontrol ping, an idle node, sacct) is left alone, whoever
# started it.  Environment (optional): SLURM_STATE_DIR (default /tmp/slurm-ci: state, spool,
# logs, pid files, MariaDB data), SLURM_PARTITION (debug), SLURM_CLUSTER (ci), SLURM_WAIT_S (60).
set -Eeuo pipefail

DIR=${SLURM_STATE_DIR:-/tmp/slurm-ci}
PARTITION=${SLURM_PARTITION:-debug}
CLUSTER=${SLURM_CLUSTER:-ci}
WAIT_S=${SLURM_WAIT_S:-60}
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
SOCK=$DIR/mysql-run/mysqld.sock
HOST=$(hostname -s)
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH

say() { echo "[start_slurm] $*"; }
fail() {
    echo "[start_slurm] ERROR: $*" >&2
    for f in "$DIR"/log/*.log; do [ -s "$f" ] && { echo "--- $f" >&2; tail -n 10 "$f" >&2; }; done
    exit 1
}
# until_ok SECONDS WHAT CMD...: retry CMD every 0.2 s
until_ok() {
    local end=$(( $(date +%s) + $1 )) what=$2; shift 2
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$end" ] || fail "no $what after ${WAIT_S}s"
        sleep 0.2
    done
}
cluster_ok() {
    scontrol ping 2>/dev/null | grep -q UP &&
        sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated|completing)' &&
        sacct -n -X -S now-1hour -o JobID >/dev/null 2>&1
}

[ "$(id -u)" = 0 ] || fail "run as root (it installs packages and starts daemons)"
if command -v scontrol >/dev/null && cluster_ok; then
    say "a working cluster is already running: $(sinfo -h -o '%P %D %T' | head -n1)"
    exit 0
fi

# 1. packages (Debian: Slurm, MUNGE, MariaDB for accounting); services must not autostart
missing=()
for pair in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge slurmdbd:slurmdbd \
            mariadbd:mariadb-server; do
    command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; trap 'rm -f /usr/sbin/policy-rc.d' EXIT; }
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/tmp/start_slurm_apt.log 2>&1 ||
        { apt-get update -q >>/tmp/start_slurm_apt.log 2>&1;
          apt-get install -y -q --no-install-recommends "${missing[@]}" >>/tmp/start_slurm_apt.log 2>&1; } ||
        fail "apt-get install failed (see /tmp/start_slurm_apt.log)"
fi
mkdir -p "$DIR"/{state,spool,log,run,mysql,mysql-run} /etc/slurm

# 2. munge (authentication between the daemons and the client tools)
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    [ -s /etc/munge/munge.key ] || { mkdir -p /etc/munge; dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; }
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/log/munge /var/lib/munge
    chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key
    rm -f /run/munge/munge.socket.2*
    runuser -u munge -- munged || fail "munged did not start"
    until_ok "$WAIT_S" munged bash -c 'munge -n | unmunge'
    cp /run/munge/munged.pid "$DIR/run/munged.pid"
fi

# 3. configuration: one node = this machine, one default partition, accounting on
NODE=$(slurmd -C 2>/dev/null | head -n1 | grep -o 'CPUs=.*' | sed 's/ *RealMemory=[0-9]*//' || true)
MEM=$(free -m | awk '/^Mem:/{print int($2 * 0.95)}')
cat > "$CONF" <<CONF
# written by scripts/start_slurm.sh
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
# a job whose parent failed is cancelled, not left pending forever
DependencyParameters=kill_invalid_depend
# a requeued (preempted) job may restart after 10 s, not Slurm's default 120 s
AuthInfo=cred_expire=10
ReturnToService=2
MaxArraySize=10001
# ended jobs leave the controller after 5 min (sacct keeps them); many cancelled array elements
# must not exhaust MaxJobCount on a machine where several test suites share the cluster
MinJobAge=300
MaxJobCount=100000
KillWait=5
MailProg=/bin/true
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=$HOST NodeAddr=127.0.0.1 ${NODE:-CPUs=$(nproc)} RealMemory=$MEM State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
cat > "$DBD_CONF" <<CONF
# written by scripts/start_slurm.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
LogFile=$DIR/log/slurmdbd.log
PidFile=$DIR/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageUser=root
StorageLoc=slurm_acct_db
CONF
chmod 644 "$CONF"; chmod 600 "$DBD_CONF"

# 4. accounting: MariaDB on a private socket (no TCP port), then slurmdbd
chown mysql:mysql "$DIR/mysql" "$DIR/mysql-run"
[ -d "$DIR/mysql/mysql" ] || mariadb-install-db --user=mysql --datadir="$DIR/mysql" --skip-test-db \
    --auth-root-authentication-method=socket >"$DIR/log/mariadb-install.log" 2>&1 || fail "mariadb-install-db failed"
if ! mariadb-admin --socket="$SOCK" ping >/dev/null 2>&1; then
    setsid nohup mariadbd --no-defaults --user=mysql --datadir="$DIR/mysql" --socket="$SOCK" --skip-networking \
        --pid-file="$DIR/mysql-run/mariadb.pid" --log-error="$DIR/log/mariadb.log" >/dev/null 2>&1 </dev/null &
    echo $! > "$DIR/run/mariadb.pid"
    until_ok "$WAIT_S" MariaDB mariadb-admin --socket="$SOCK" ping
fi
sacctmgr -n list cluster >/dev/null 2>&1 || { MYSQL_UNIX_PORT=$SOCK slurmdbd || fail "slurmdbd did not start"; }
until_ok "$WAIT_S" slurmdbd sacctmgr -n list cluster
sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null

# 5. controller and node daemon
[ -f "$DIR/state/clustername" ] && [ "$(cat "$DIR/state/clustername")" != "$CLUSTER" ] && rm -f "$DIR/state/clustername"
scontrol ping 2>/dev/null | grep -q UP || slurmctld || fail "slurmctld did not start"
until_ok "$WAIT_S" slurmctld bash -c 'scontrol ping | grep -q UP'
pgrep -F "$DIR/run/slurmd.pid" slurmd >/dev/null 2>&1 || slurmd || fail "slurmd did not start"
scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
until_ok "$WAIT_S" "idle node" cluster_ok
say "ready: cluster $CLUSTER, partition $PARTITION, node $HOST (logs in $DIR/log)"
