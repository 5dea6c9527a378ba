#!/bin/sh
# Download a file and install it only if its SHA-256 matches:
#   {"operation": "download", "args": ["https://example.com/fw.bin", "<sha256 hex>", "fw.bin"]}
#
# The file lands in $DOWNLOAD_DIR (default /var/lib/iot-jobs-agent/downloads) under the given
# plain file name; it is fetched into the job's work directory first and moved into place
# atomically after the checksum matched, so a half-downloaded or tampered file is never installed.
set -eu
DOWNLOAD_DIR=${DOWNLOAD_DIR:-/var/lib/iot-jobs-agent/downloads}

progress() {
    if [ -n "${JOB_PROGRESS_FD:-}" ]; then
        printf '{"progress": "%s", "step": "%s"}\n' "$1" "$2" >&"$JOB_PROGRESS_FD" || true
    fi
}

[ $# -eq 3 ] || { echo "usage: download URL SHA256 NAME" >&2; exit 2; }
url=$1; want=$2; name=$3
# http and https only: a file:// URL would copy any file the agent can read (the device key) into
# DOWNLOAD_DIR.
case $url in https://?*|http://?*) ;; *) echo "only http:// and https:// URLs are downloaded" >&2; exit 2 ;; esac
printf '%s' "$want" | grep -Eq '^[0-9a-fA-F]{64}$' || { echo "bad sha256: $want" >&2; exit 2; }
case $name in ''|.*|*/*) echo "invalid file name: $name" >&2; exit 2 ;; esac

tmp=${JOB_WORK_DIR:-$(mktemp -d)}/download.part
progress 5 "downloading"
if command -v curl >/dev/null 2>&1; then
    curl --fail --silent --show-error --location --proto '=https,http' --proto-redir '=https,http' \
        -o "$tmp" -- "$url"
elif command -v wget >/dev/null 2>&1; then
    wget -q -O "$tmp" -- "$url"
else
    echo "neither curl nor wget is installed" >&2; exit 127
fi
progress 80 "verifying"
got=$(sha256sum "$tmp" | cut -d' ' -f1)
if [ "$got" != "$(printf '%s' "$want" | tr 'A-F' 'a-f')" ]; then
    # Never print the hash we got: it would tell a job the hash of whatever the URL served.
    echo "sha256 mismatch: the download does not have the expected hash; not installed" >&2
    rm -f "$tmp"
    exit 3
fi
mkdir -p "$DOWNLOAD_DIR"
mv -f "$tmp" "$DOWNLOAD_DIR/$name"
progress 100 "installed $DOWNLOAD_DIR/$name"
echo "installed $DOWNLOAD_DIR/$name sha256=$got"
