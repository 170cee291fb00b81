#!/usr/bin/env bash
# make demo, part 1 (the disk layer): qemu-img/qemu-io make a qcow2 image with a backing file; vblk opens it, prints
# `vblk info` and `vblk map`, and proves its contents equal qemu-img's byte for byte.
# Exits non-zero on any mismatch. Runs in a few seconds, in a temp folder it removes.
set -euo pipefail
cd "$(dirname "$0")/.."
VBLK=(node build/src/cli/main.js)
for t in qemu-img qemu-io; do command -v "$t" >/dev/null || { echo "demo: $t not found (apt-get install qemu-utils)" >&2; exit 1; }; done
dir=$(mktemp -d "${TMPDIR:-/tmp}/vblk-demo.XXXXXX")
trap 'rm -rf "$dir"' EXIT
if [ -t 1 ]; then step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }; else step() { printf '\n== %s\n' "$*"; }; fi

step "qemu-img makes base.qcow2 (64 KiB clusters, 16 MiB) and writes patterns with qemu-io"
qemu-img create -q -f qcow2 "$dir/base.qcow2" 16M
qemu-io -c 'write -P 0x11 0 64k' -c 'write -P 0x22 1M 4k' -c 'write -P 0x33 8M 128k' "$dir/base.qcow2" >/dev/null
step "qemu-img makes top.qcow2 on top of it (backing file, relative name); qemu-io overwrites and zeroes parts"
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$dir/top.qcow2" 24M
qemu-io -c 'write -P 0x44 32k 64k' -c 'write -z 8M 64k' -c 'write -P 0x55 20M 4k' "$dir/top.qcow2" >/dev/null

step "vblk info top.qcow2"
"${VBLK[@]}" info "$dir/top.qcow2"
step "vblk map top.qcow2"
"${VBLK[@]}" map "$dir/top.qcow2"
step "vblk map --output=json top.qcow2 (same as qemu-img map --output=json?)"
"${VBLK[@]}" map --output=json "$dir/top.qcow2" | tee "$dir/map.vblk"
qemu-img map --output=json "$dir/top.qcow2" > "$dir/map.qemu"
if cmp -s "$dir/map.vblk" "$dir/map.qemu"; then echo "map: identical to qemu-img map"; else echo "MISMATCH: vblk map differs from qemu-img map" >&2; diff "$dir/map.vblk" "$dir/map.qemu" >&2 || true; exit 1; fi

step "vblk io -r: read the patterns back through the chain"
if out=$("${VBLK[@]}" io -r -c 'read -P 0x11 0 32k' -c 'read -P 0x44 32k 64k' -c 'read -P 0 96k 32k' \
  -c 'read -P 0x22 1M 4k' -c 'read -P 0 8M 64k' -c 'read -P 0x33 8454144 64k' -c 'read -P 0 16M 4M' -c 'read -P 0x55 20M 4k' "$dir/top.qcow2" 2>&1); then
  grep -v 'ops;' <<<"$out"
  echo "all patterns verified"
else
  echo "$out" >&2
  echo "MISMATCH: a pattern did not read back" >&2
  exit 1
fi

step "vblk convert -O raw vs qemu-img convert -O raw"
"${VBLK[@]}" convert -O raw "$dir/top.qcow2" "$dir/vblk.raw"
qemu-img convert -O raw "$dir/top.qcow2" "$dir/qemu.raw"
if cmp "$dir/vblk.raw" "$dir/qemu.raw"; then
  echo "contents match byte for byte: $(sha256sum < "$dir/vblk.raw" | cut -c1-16)…  ($(stat -c %s "$dir/vblk.raw") bytes)"
else
  echo "MISMATCH: vblk and qemu-img disagree on the contents of top.qcow2" >&2
  exit 1
fi
"${VBLK[@]}" compare "$dir/top.qcow2" "$dir/qemu.raw"
echo
echo "demo OK"
