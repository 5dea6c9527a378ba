#!/bin/sh
# Reboot the device as a job: AWS-Reboot (reboot.sh RUN_AS_USER, Device Client's argv), or as a
# YAML handler, {"operation": "reboot"}.
#
# A handler never reboots the machine itself: it exits 194, which asks the agent to (1) record
# the request and the current boot id in its journal, (2) make sure the cloud has heard
# IN_PROGRESS with step "rebooting", (3) run reboot_command. After the restart the agent compares
# boot ids: a new boot completes the step (the job goes on, or ends SUCCEEDED; a YAML handler's
# `verify` command may decide first); the same boot id means the reboot did not happen and the job
# FAILED. The step is never run a second time, so there is no lock file and no reboot loop.
# runAsUser is ignored: the agent reboots.
#
# Any handler can do the same after its own work, e.g. a firmware update that needs a restart.
set -eu
if [ "${JOB_PHASE:-run}" = verify ]; then
    # Configured as this handler's `verify`: runs after the reboot; exit 0 = SUCCEEDED.
    echo "up again since $(uptime -s 2>/dev/null || echo '?')"
    exit 0
fi
echo "reboot requested by job $JOB_ID"
exit 194
