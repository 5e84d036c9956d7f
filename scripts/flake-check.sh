#!/usr/bin/env bash
# Instantiates every output of flake.nix (`nix flake check --no-build`: the packages, the NixOS
# module, the overlay and the VM test in checks) with Debian's nix (2.8), though neither nixpkgs
# nor KVM is here: the flake's nixpkgs input is tests/nix, a stand-in that instantiates and never
# builds (tests/nix/nixpkgs.nix says what it keeps of nixpkgs). Nothing is fetched; the store is a
# private one in a scratch folder. Usage: scripts/flake-check.sh [SOURCE_DIR] (default: this
# checkout's files as a clone has them: tracked, and new files that are not ignored).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
command -v nix >/dev/null || { echo "flake-check: nix missing (Debian package nix-bin)" >&2; exit 2; }
work=$(mktemp -d)
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
src=${1:-}
if [ -z "$src" ]; then
  src="$work/src"
  mkdir -p "$src"
  # Not `path:$repo`: that would copy .venv and every other ignored file into the store.
  git -C "$repo" ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do [ -f "$repo/$f" ] && printf '%s\0' "$f"; done |
    tar -C "$repo" --null -T - -cf - | tar -C "$src" -xf -
fi
export HOME="$work/home" XDG_CACHE_HOME="$work/cache"
mkdir -p "$HOME"
nix --extra-experimental-features 'nix-command flakes' \
  --option build-users-group '' --store "$work/store" \
  flake check --no-build --no-write-lock-file -vv \
  --override-input nixpkgs "path:$src/tests/nix" "path:$src"
