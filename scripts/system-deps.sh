#!/usr/bin/env bash
# System packages the tests, the demo and the benchmarks use. Installed only when running as root
# on a Debian-like machine (CI, fresh dev boxes); elsewhere this prints what is missing and the
# tests that need it skip with a reason.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mapfile -t wanted < <(grep -vE '^\s*(#|$)' "$here/apt-packages.txt")
missing=()
for pkg in "${wanted[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "system-deps: missing ${missing[*]} (install them as root; tests that need them will skip)" >&2
  exit 0
fi
echo "system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# --no-install-recommends: nix-bin recommends nix-setup-systemd, which would enable a daemon.
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
