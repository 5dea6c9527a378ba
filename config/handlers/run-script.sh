#!/bin/sh
# Run one of the device's own scripts, by name: {"operation": "run-script", "args": ["NAME", ...]}
#
# Only scripts installed in $SCRIPTS_DIR (default /etc/iot-jobs-agent/scripts) can run, so a job
# can choose *which* vetted script runs but never supply code. NAME is checked against a strict
# pattern before it is turned into a path; the remaining args are passed to the script as-is.
set -eu
SCRIPTS_DIR=${SCRIPTS_DIR:-/etc/iot-jobs-agent/scripts}

progress() {  # {"progress": N, "step": "..."} on the agent's progress pipe, if it gave us one
    if [ -n "${JOB_PROGRESS_FD:-}" ]; then
        printf '{"progress": "%s", "step": "%s"}\n' "$1" "$2" >&"$JOB_PROGRESS_FD" || true
    fi
}

[ $# -ge 1 ] || { echo "usage: run-script NAME [ARGS...]" >&2; exit 2; }
name=$1; shift
case $name in
    ''|*[!A-Za-z0-9_-]*) echo "invalid script name: $name" >&2; exit 2 ;;
esac
script=$SCRIPTS_DIR/$name
[ -f "$script" ] && [ -x "$script" ] || { echo "no such script: $script" >&2; exit 127; }

progress 10 "running $name"
status=0
"$script" "$@" || status=$?
progress 100 "finished with status $status"
exit $status
