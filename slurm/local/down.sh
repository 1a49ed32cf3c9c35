#!/usr/bin/env bash
# Take down the local single-node SLURM cluster started by up.sh: cancel the
# remaining jobs, then stop slurmd, slurmctld and munged by the PIDs in their
# pid files (never by name). Idempotent: nothing running is not an error.
set -euo pipefail

CTLD_PID=/run/slurm/slurmctld.pid
SLURMD_PID=/run/slurm/slurmd.pid
MUNGED_PID=/run/munge/munged.pid
STOP_SECS="${SLURM_DOWN_TIMEOUT:-15}"

step() { printf 'down.sh: %s\n' "$*"; }

# True if pid $1 exists and is not a zombie (an unreaped process has exited).
running() {
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"
    [[ -n "$stat" && "${stat:0:1}" != "Z" ]]
}

# Prints the pid if the pid file names a live process whose command is $2.
live_pid() {
    local pidfile="$1" comm="$2" pid
    [[ -r "$pidfile" ]] || return 1
    pid="$(tr -dc '0-9' <"$pidfile")"
    [[ -n "$pid" ]] || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null || true)" == "$comm" ]] && running "$pid" || return 1
    printf '%s\n' "$pid"
}

[[ "$(id -u)" -eq 0 ]] || { printf 'down.sh: ERROR: must run as root\n' >&2; exit 1; }

# 1. Cancel remaining jobs (bounded), while slurmctld still answers.
if live_pid "$CTLD_PID" slurmctld >/dev/null && timeout 5 scontrol ping >/dev/null 2>&1; then
    jobs="$(timeout 5 squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ' || true)"
    if [[ -n "${jobs// /}" ]]; then
        step "cancelling jobs: ${jobs% }"
        # shellcheck disable=SC2086  # word splitting of the job id list is intended
        timeout 10 scancel $jobs || step "scancel failed or timed out (continuing)"
        deadline=$((SECONDS + STOP_SECS))
        while [[ -n "$(timeout 5 squeue -h -o %A 2>/dev/null || true)" && "$SECONDS" -lt "$deadline" ]]; do
            sleep 0.5
        done
        left="$(timeout 5 squeue -h -o %A 2>/dev/null | tr '\n' ' ' || true)"
        [[ -z "${left// /}" ]] || step "jobs still listed after ${STOP_SECS} s: ${left% } (continuing)"
    else
        step "no jobs to cancel"
    fi
else
    step "slurmctld not answering, no jobs to cancel"
fi

# 2. Stop the daemons by pid: TERM, bounded wait, then KILL.
stop() {
    local pidfile="$1" comm="$2" pid deadline
    if ! pid="$(live_pid "$pidfile" "$comm")"; then
        step "$comm not running"
        return 0
    fi
    step "stopping $comm (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + STOP_SECS))
    while running "$pid" && [[ "$SECONDS" -lt "$deadline" ]]; do
        sleep 0.2
    done
    if running "$pid"; then
        step "$comm (pid $pid) still alive after ${STOP_SECS} s, sending KILL"
        kill -KILL "$pid" 2>/dev/null || true
        deadline=$((SECONDS + 5))
        while running "$pid" && [[ "$SECONDS" -lt "$deadline" ]]; do
            sleep 0.2
        done
    fi
    if running "$pid"; then
        printf 'down.sh: ERROR: %s (pid %s) did not exit\n' "$comm" "$pid" >&2
        return 1
    fi
    rm -f "$pidfile"
}

rc=0
stop "$SLURMD_PID" slurmd || rc=1
stop "$CTLD_PID" slurmctld || rc=1
stop "$MUNGED_PID" munged || rc=1
[[ "$rc" -eq 0 ]] && step "cluster down"
exit "$rc"
