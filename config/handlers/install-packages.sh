#!/bin/sh
# AWS-Install-Application and AWS-Remove-Application (remove-packages.sh is a link to this file):
#   install-packages.sh RUN_AS_USER PACKAGES...      remove-packages.sh RUN_AS_USER PACKAGES...
#
# Device Client's argv: $1 is runAsUser ("" when unset; with a user, the script runs again as
# that user through runuser, never sudo). The templates send their space-separated list as one
# argument; it is split here. Uses whichever of apt-get, dnf, yum, apk or opkg the device has,
# never interactively. A name that starts with '-' (an option in disguise) or holds anything but
# the characters package names use is refused before any package manager runs.
set -euf  # -f: no globbing while the list is split

fail() { code=$1; shift; printf '%s\n' "$*" >&2; exit "$code"; }

case ${0##*/} in
    install-packages.sh) action=install ;;
    remove-packages.sh) action=remove ;;
    *) fail 2 "run this as install-packages.sh or remove-packages.sh" ;;
esac
[ $# -ge 1 ] || fail 2 "usage: ${0##*/} RUN_AS_USER PACKAGES..."
user=$1
shift
if [ -n "$user" ] && [ "$user" != "$(id -un)" ]; then
    id "$user" >/dev/null 2>&1 || fail 2 "runAsUser $user: no such user"
    [ "$(id -u)" -eq 0 ] || fail 2 "cannot run as $user: the agent does not run as root"
    command -v runuser >/dev/null 2>&1 || fail 2 "cannot run as $user: runuser is not installed"
    exec runuser -u "$user" -- "$0" "" "$@"
fi

packages=""
for given in "$@"; do
    for name in $given; do
        case $name in
            -*) fail 2 "refusing package name '$name': it starts with '-'" ;;
            *[!A-Za-z0-9.+_:~=@/-]*) fail 2 "refusing package name '$name': unexpected characters" ;;
        esac
        packages="$packages $name"
    done
done
[ -n "$packages" ] || fail 2 "no packages given"

for manager in apt-get dnf yum apk opkg; do
    command -v "$manager" >/dev/null 2>&1 && break
    manager=""
done
[ -n "$manager" ] || fail 127 "no supported package manager here (apt-get, dnf, yum, apk or opkg)"

echo "$manager: $action$packages"
# $packages is split on purpose (one word per package; globbing is off).
case $manager-$action in
    apt-get-install)
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
            -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold $packages ;;
    apt-get-remove) DEBIAN_FRONTEND=noninteractive apt-get remove -y -q --purge $packages ;;
    dnf-*|yum-*) "$manager" "$action" -y -q $packages ;;
    apk-install) apk add -q $packages ;;
    apk-remove) apk del -q $packages ;;
    opkg-*) opkg "$action" $packages ;;
esac
