#!/usr/bin/env bash
# Stop the daemons scripts/start_slurm.sh started, by their pid files only (each pid checked
# against the daemon's name; nothing is killed by name).  Jobs are cancelled first.
#   sudo bash scripts/stop_slurm.sh [--purge]    # --purge also deletes the state directory
set -uo pipefail
DIR=${SLURM_STATE_DIR:-/tmp/slurm-ci}
[ "$(id -u)" = 0 ] || { echo "[stop_slurm] ERROR: run as root" >&2; exit 1; }
rc=0

stop() {  # stop NAME PIDFILE: TERM, wait up to 30 s, then KILL that pid
    local name=$1 file=$2 pid i
    [ -s "$file" ] || return 0
    pid=$(cat "$file")
    if [ "$(cat /proc/"$pid"/comm 2>/dev/null)" != "$name" ]; then rm -f "$file"; return 0; fi
    kill -TERM "$pid"
    for ((i = 0; i < 300; i++)); do [ -d /proc/"$pid" ] || break; sleep 0.1; done
    [ -d /proc/"$pid" ] && kill -KILL "$pid" && sleep 0.5
    if [ -d /proc/"$pid" ] && ! grep -q '^State:.*Z' /proc/"$pid"/status; then
        echo "[stop_slurm] $name (pid $pid) still running" >&2; rc=1
    else
        rm -f "$file"; echo "[stop_slurm] stopped $name (pid $pid)"
    fi
}

if scontrol ping 2>/dev/null | grep -q UP; then
    jobs=$(squeue -h -o %A | sort -u)
    # shellcheck disable=SC2086
    [ -n "$jobs" ] && scancel $jobs && for ((i = 0; i < 150; i++)); do [ -z "$(squeue -h)" ] && break; sleep 0.2; done
fi
stop slurmd "$DIR/run/slurmd.pid"
stop slurmctld "$DIR/run/slurmctld.pid"
stop slurmdbd "$DIR/run/slurmdbd.pid"
stop mariadbd "$DIR/run/mariadb.pid"
stop munged "$DIR/run/munged.pid"
[ "${1:-}" = "--purge" ] && rm -rf "$DIR" && echo "[stop_slurm] removed $DIR"
exit $rc
