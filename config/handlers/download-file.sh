#!/bin/sh
# AWS-Download-File: download-file.sh RUN_AS_USER URL FILE_OR_DIRECTORY
#
# Device Client's argv: $1 is runAsUser ("" when unset); with a user, the script runs again as
# that user (runuser, no sudo), so the file is written with that user's rights. Only http and
# https, also after redirects: never file:// or another scheme, which would let a job copy any
# file the agent can read. FILE_OR_DIRECTORY must be absolute; an existing directory receives the
# file under the URL's last path segment. The download goes to a temporary file next to the
# target and is renamed over it only when complete, so a reader never sees half a file; a
# directory is never replaced. HTTP 403 (an expired presigned URL) fails with a reason that says
# so. The URL's query string (a presigned URL's signature and credentials) is never printed.
set -eu

fail() { code=$1; shift; printf '%s\n' "$*" >&2; exit "$code"; }
progress() {
    if [ -n "${JOB_PROGRESS_FD:-}" ]; then
        printf '{"progress": "%s"}\n' "$1" >&"$JOB_PROGRESS_FD" 2>/dev/null || true
    fi
}

[ $# -ge 1 ] || fail 2 "usage: download-file.sh RUN_AS_USER URL FILE_OR_DIRECTORY"
user=$1
shift
if [ -n "$user" ] && [ "$user" != "$(id -un)" ]; then
    id "$user" >/dev/null 2>&1 || fail 2 "runAsUser $user: no such user"
    [ "$(id -u)" -eq 0 ] || fail 2 "cannot run as $user: the agent does not run as root"
    command -v runuser >/dev/null 2>&1 || fail 2 "cannot run as $user: runuser is not installed"
    exec runuser -u "$user" -- "$0" "" "$@"
fi
[ $# -eq 2 ] || fail 2 "usage: download-file.sh RUN_AS_USER URL FILE_OR_DIRECTORY (got $# arguments after the user)"
url=$1
target=$2
shown=${url%%\?*}
case $url in
    http://?*|https://?*) ;;
    *) fail 2 "refusing URL $shown: only http:// and https:// URLs are downloaded" ;;
esac
case $url in
    *[!][:alnum:]._~:/?#@!\&+,=%*[-]*)
        fail 2 "refusing URL $shown: it contains spaces, quotes or shell metacharacters (percent-encode them)" ;;
esac
case $target in
    /*) ;;
    *) fail 2 "refusing file path '$target': it must be absolute" ;;
esac

if [ -d "$target" ]; then
    name=${shown##*/}
    case $name in
        ''|.|..) fail 2 "cannot name the file from $shown: give a file path instead of the directory $target" ;;
    esac
    file=${target%/}/$name
else
    file=$target
fi
[ ! -d "$file" ] || fail 2 "$file is a directory: not replacing it"
dir=$(dirname "$file")
mkdir -p -- "$dir" || fail 1 "cannot create the directory $dir"

tmp=$(mktemp "$dir/.download-file.XXXXXX") || fail 1 "cannot write in $dir"
trap 'rm -f -- "$tmp"' EXIT
trap 'exit 143' TERM
trap 'exit 130' INT
errors=$(mktemp)
trap 'rm -f -- "$tmp" "$errors"' EXIT

progress 10
status=0
if command -v curl >/dev/null 2>&1; then
    code=$(curl --silent --show-error --location --max-redirs 5 --proto '=http,https' \
                --proto-redir '=http,https' --output "$tmp" --write-out '%{http_code}' \
                -- "$url" 2>"$errors") || status=$?
elif command -v wget >/dev/null 2>&1; then
    wget -q -S --max-redirect=5 -O "$tmp" -- "$url" 2>"$errors" || status=$?
    code=$(sed -n 's/^ *HTTP\/[0-9.]* \([0-9][0-9][0-9]\).*/\1/p' "$errors" | tail -n 1)
else
    fail 127 "neither curl nor wget is installed: install one of them"
fi
code=${code:-000}
case $code in
    2??) [ "$status" -eq 0 ] || fail 1 "download of $shown failed: $(tail -n 1 "$errors")" ;;
    403) fail 1 "download of $shown refused: HTTP 403 Forbidden. A presigned URL has expired (or is not valid): create the job again, or give its presignedUrlConfig a longer expiresInSec" ;;
    000) fail 1 "download of $shown failed: $(tail -n 1 "$errors")" ;;
    *) fail 1 "download of $shown failed: HTTP $code" ;;
esac
progress 90

chmod "$(printf '%o' $((0666 & ~$(umask))))" "$tmp"
[ ! -d "$file" ] || fail 2 "$file is a directory: not replacing it"
mv -f -- "$tmp" "$file"
trap - EXIT
rm -f -- "$errors"
printf 'downloaded %s to %s (%s bytes)\n' "$shown" "$file" "$(wc -c < "$file" | tr -d ' ')"
