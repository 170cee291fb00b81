#!/usr/bin/env bash
# Builds build/kvm-guest/{vmlinuz,initramfs.gz}: the nested-KVM guest of scripts/with-kvm.sh.
# A Debian cloud kernel (linux-image-cloud-amd64, as scripts/build-guest.sh fetches it) and an
# initramfs with busybox, the modules that give it a virtio-fs root and /dev/kvm (fuse, virtiofs,
# irqbypass, kvm, kvm-amd: the package has no modules.dep, so they are loaded in that order), and
# an /init that mounts the host's root over virtio-fs, chroots into it and runs the command
# with-kvm.sh wrote (scripts/kvm-guest/init).
#
# Idempotent and cached: nothing is done when the initramfs is newer than this script and its init.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="$ROOT/build/kvm-guest"
INIT="$ROOT/scripts/kvm-guest/init"
STAMP="$OUT/initramfs.gz"
# shellcheck source=lib/debian-kernel.sh
source "$ROOT/scripts/lib/debian-kernel.sh"

if [[ -f "$STAMP" && -f "$OUT/vmlinuz" && "${VBLK_GUEST_REBUILD:-0}" != 1 ]]; then
  if [[ -z "$(find "$0" "$INIT" "$ROOT/scripts/lib/debian-kernel.sh" -newer "$STAMP" -print -quit)" ]]; then exit 0; fi
fi
command -v busybox >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static >/dev/null; }

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
fetch_cloud_kernel "$WORK"

R="$WORK/root"
mkdir -p "$R"/{bin,dev,proc,sys,host}
cp "$(command -v busybox)" "$R/bin/busybox"
copy_modules "$R" virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci fuse virtiofs irqbypass kvm kvm-amd
cp "$INIT" "$R/init"
chmod 0755 "$R/init"
(cd "$R" && find . | busybox cpio -o -H newc 2>/dev/null) | gzip -1 > "$WORK/initramfs.gz"
cp "$VMLINUZ" "$OUT/vmlinuz"
mv "$WORK/initramfs.gz" "$STAMP"
echo "built $OUT (kernel $KVER)"
