#!/usr/bin/env bash
# make demo: the main job, in three parts.
#   1. the disk layer: images made by qemu-img/qemu-io read by vblk byte for byte (demo-disk.sh);
#   2. our own KVM harness: a small guest drives the virtio-blk device over virtio-mmio (vblk run);
#   3. a real Linux guest under QEMU uses `vblk serve` over vhost-user-blk as its disk: mkfs.ext4,
#      files, md5, fsck in the guest, then `vblk check` and `qemu-img check` on the host
#      (guest-demo.sh, which prints the final report).
# Exits non-zero if any part fails. Parts 2 and 3 print a clear reason and are skipped when
# /dev/kvm or QEMU is unusable on this machine (the report says so; the exit code stays 0 only
# for a skip, never for a failure).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -t 1 ]; then part() { printf '\n\033[1;36m#### %s\033[0m\n' "$*"; }; else part() { printf '\n#### %s\n' "$*"; }; fi
declare -a SUMMARY=()
failed=0

part "Part 1/3: the disk layer reads what qemu-img writes"
if bash scripts/demo-disk.sh; then SUMMARY+=("disk layer (qcow2 chain vs qemu-img):           PASS"); else SUMMARY+=("disk layer (qcow2 chain vs qemu-img):           FAIL"); failed=1; fi

part "Part 2/3: vblk run — a small guest under /dev/kvm drives virtio-blk over virtio-mmio"
if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
  if node build/src/cli/main.js run; then SUMMARY+=("KVM guest over virtio-mmio (vblk run):          PASS"); else SUMMARY+=("KVM guest over virtio-mmio (vblk run):          FAIL"); failed=1; fi
else
  echo "skipped: /dev/kvm is missing or not usable by this user"
  SUMMARY+=("KVM guest over virtio-mmio (vblk run):          SKIPPED (/dev/kvm unusable)")
fi

part "Part 3/3: a Linux guest uses vblk serve as its disk (vhost-user-blk)"
if command -v qemu-system-x86_64 >/dev/null; then
  if bash scripts/guest-demo.sh; then SUMMARY+=("Linux guest on vblk serve (ext4, fsck, check): PASS"); else SUMMARY+=("Linux guest on vblk serve (ext4, fsck, check): FAIL"); failed=1; fi
else
  echo "skipped: qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"
  SUMMARY+=("Linux guest on vblk serve (ext4, fsck, check): SKIPPED (no QEMU)")
fi

part "Summary"
printf '%s\n' "${SUMMARY[@]}"
if [ "$failed" -ne 0 ]; then echo "demo FAILED"; exit 1; fi
echo "demo OK"
