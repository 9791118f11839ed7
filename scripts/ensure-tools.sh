#!/usr/bin/env bash
# Make sure the named system tools are on PATH (Debian package names equal the tool names
# used here). As root, missing ones are installed with apt-get; otherwise we stop and say how.
set -euo pipefail

declare -A PACKAGE=([redis-server]=redis-server [nginx]=nginx [wrk]=wrk [cc]=gcc [h2load]=nghttp2-client)

missing=()
for tool in "$@"; do
    command -v "$tool" >/dev/null 2>&1 || [[ -x "/usr/sbin/$tool" ]] || missing+=("${PACKAGE[$tool]:-$tool}")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

if [[ $(id -u) -ne 0 ]]; then
    echo "missing: ${missing[*]}. Install with: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
fi
echo "installing ${missing[*]} with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
