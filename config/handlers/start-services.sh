#!/bin/sh
# AWS-Start-Application, AWS-Stop-Application and AWS-Restart-Application (stop-services.sh and
# restart-services.sh are links to this file):   start-services.sh RUN_AS_USER SERVICES...
#
# Device Client's argv: $1 is runAsUser ("" when unset; with a user, the script runs again as
# that user through runuser, never sudo). The templates send their space-separated list as one
# argument; it is split here, and every name is checked before systemctl touches anything.
#
# The agent's own service ($IOT_JOBS_AGENT_SERVICE, set by the agent) is special: restarting it
# is handed back to the agent (exit 195) once the other services are done, and the agent journals
# the job, reports it, restarts, and the new agent reports SUCCEEDED: restarting it here would
# kill this job with it. Stopping it is refused (the job could never report); starting it is a
# no-op (it runs).
set -euf  # -f: no globbing while the list is split

fail() { code=$1; shift; printf '%s\n' "$*" >&2; exit "$code"; }

case ${0##*/} in
    start-services.sh) action=start done=started ;;
    stop-services.sh) action=stop done=stopped ;;
    restart-services.sh) action=restart done=restarted ;;
    *) fail 2 "run this as start-services.sh, stop-services.sh or restart-services.sh" ;;
esac
[ $# -ge 1 ] || fail 2 "usage: ${0##*/} RUN_AS_USER SERVICES..."
user=$1
shift
if [ -n "$user" ] && [ "$user" != "$(id -un)" ]; then
    id "$user" >/dev/null 2>&1 || fail 2 "runAsUser $user: no such user"
    [ "$(id -u)" -eq 0 ] || fail 2 "cannot run as $user: the agent does not run as root"
    command -v runuser >/dev/null 2>&1 || fail 2 "cannot run as $user: runuser is not installed"
    exec runuser -u "$user" -- "$0" "" "$@"
fi

agent=${IOT_JOBS_AGENT_SERVICE:-iot-jobs-agent.service}
services=""
own=""
for given in "$@"; do
    for name in $given; do
        case $name in
            -*) fail 2 "refusing service name '$name': it starts with '-'" ;;
            *[!A-Za-z0-9@._:-]*) fail 2 "refusing service name '$name': unexpected characters" ;;
        esac
        case $name in *.*) unit=$name ;; *) unit=$name.service ;; esac
        if [ "$unit" = "$agent" ]; then
            [ "$action" != stop ] || fail 2 "refusing to stop $agent, the agent running this job: it could never report; stop it on the device"
            own=$unit
        else
            services="$services $name"
        fi
    done
done
[ -n "$services$own" ] || fail 2 "no services given"
command -v systemctl >/dev/null 2>&1 || fail 127 "systemctl is not installed: this handler needs systemd"

failed=""
for name in $services; do
    if systemctl "$action" "$name"; then
        echo "$done $name"
    else
        failed="$failed $name"
    fi
done
[ -z "$failed" ] || fail 1 "could not $action:$failed"
if [ -n "$own" ]; then
    case $action in
        start) echo "$own runs already (it is running this job)" ;;
        restart) echo "restarting $own: the agent reports the job once it is back"; exit 195 ;;
    esac
fi
